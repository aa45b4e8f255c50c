//! The CRD YAML under deploy/crds/ is what the Rust types generate: change
//! `controller/src/crd.rs` and this fails until the YAML is regenerated.

use fast_sandbox_controller::crd;

const REGENERATE: &str =
    "regenerate with `cargo run -p fast-sandbox-controller -- crdgen --out deploy/crds`";

#[test]
fn deploy_crds_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let generated = crd::crd_yaml().expect("the CRDs serialize");
    let mut expected: Vec<&str> = generated.iter().map(|(name, _)| *name).collect();
    expected.sort_unstable();
    let mut committed: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/crds exists")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    committed.sort_unstable();
    assert_eq!(
        committed, expected,
        "deploy/crds holds other files: {REGENERATE}"
    );
    for (name, yaml) in generated {
        let on_disk = std::fs::read_to_string(dir.join(name)).expect("the committed CRD");
        assert!(on_disk == yaml, "deploy/crds/{name} is stale: {REGENERATE}");
    }
}

#[test]
fn committed_crds_parse_as_crds_with_a_status_subresource() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    for (name, yaml) in crd::crd_yaml().expect("the CRDs serialize") {
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.spec.group, crd::GROUP, "{name}");
        let version = &parsed.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage, "{name}");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: status must be a subresource"
        );
    }
}
