//! Security invariants of the pools, without root or containerd.
//!
//! Handler isolation: the real pool manager, over a fake upstream, hands a
//! claim only a slot created with the claim's upstream handler and for its
//! exposed handler, whatever other pools hold.
//!
//! Names from requests never become paths outside the node plugin's state
//! directory, and links planted there are never followed for a write or a
//! removal. The claim record store is the one place a sandbox id becomes a
//! file name (`<state_dir>/claims/<id>.json`); the fix-ups' paths in
//! containerd's state dir and the cgroup paths are checked by the unit
//! tests of `fixup::plan` and `fixup::real`.

use std::{fs, os::unix::fs::symlink, path::Path, time::Duration};

use fast_sandbox_node::pool::{
    records::{is_sandbox_id, ClaimRecord, RecordError, RecordStore},
    PoolManager,
};
use fast_sandbox_proto::cri::PodSandboxConfig;
use fast_sandbox_shim::slots::{Claim, NoSlot, PoolKey, Shape, SlotSource};
use fast_sandbox_tests::fake_cri::PoolRig;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn record(id: &str) -> ClaimRecord {
    ClaimRecord {
        sandbox_id: id.into(),
        pool: "fast-runc".into(),
        exposed_handler: "fast-runc".into(),
        claimed_at_ns: 1,
        pause_pid: 7,
        placeholder_cgroup_parent: "/fast-sandbox-slots/x".into(),
        config: PodSandboxConfig::default(),
        identity_applied: true,
        network: None,
    }
}

/// Every file under `dir`, recursively, with its contents.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path);
            } else {
                let contents = fs::read(&path).unwrap_or_default();
                out.push((path.display().to_string(), contents));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn ids_from_requests_that_are_not_containerd_ids_never_become_paths() {
    let root = tempfile::tempdir().expect("tempdir");
    let state = root.path().join("state");
    let store = RecordStore::open(&state).expect("store");
    let outside = root.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let before = snapshot(root.path());
    let nul = format!("{}\0", &ID[..63]);
    let upper = ID.to_uppercase();
    let traversal = format!("../../outside/{}", &ID[14..]);
    for bad in [
        "",
        ".",
        "..",
        "../outside/x",
        traversal.as_str(),
        "/etc/passwd",
        nul.as_str(),
        upper.as_str(),
        &ID[1..],
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeg",
    ] {
        assert!(!is_sandbox_id(bad), "{bad:?}");
        let err = store.put(&record(bad)).expect_err(bad);
        assert!(matches!(err, RecordError::BadId(_)), "{bad:?}: {err}");
        let err = store.remove(bad).expect_err(bad);
        assert!(matches!(err, RecordError::BadId(_)), "{bad:?}: {err}");
    }
    assert_eq!(snapshot(root.path()), before, "nothing was written");
}

#[test]
fn a_planted_link_is_replaced_or_refused_never_followed() {
    let root = tempfile::tempdir().expect("tempdir");
    let state = root.path().join("state");
    let store = RecordStore::open(&state).expect("store");
    let claims = state.join("claims");
    let victim = root.path().join("victim");
    fs::write(&victim, b"precious").expect("write");

    // The record's own name is a link: the write replaces the link.
    let json = claims.join(format!("{ID}.json"));
    symlink(&victim, &json).expect("symlink");
    store.put(&record(ID)).expect("put");
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
    assert!(!fs::symlink_metadata(&json).expect("stat").is_symlink());
    let (good, bad) = store.load().expect("load");
    assert_eq!(good, [record(ID)]);
    assert!(bad.is_empty());

    // Removing a record that became a link removes the link only.
    fs::remove_file(&json).expect("rm");
    symlink(&victim, &json).expect("symlink");
    store.remove(ID).expect("remove");
    assert!(fs::symlink_metadata(&json).is_err(), "the link is gone");
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");

    // The temporary file of the atomic write is a link: refused (O_NOFOLLOW).
    let tmp = claims.join(format!("{ID}.tmp"));
    symlink(&victim, &tmp).expect("symlink");
    let err = store.put(&record(ID)).expect_err("a linked temporary file");
    assert!(matches!(err, RecordError::Write { .. }), "{err}");
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
    // Loading sweeps the unfinished write: the link, not its target.
    let (good, bad) = store.load().expect("load");
    assert!(good.is_empty() && bad.is_empty(), "{good:?} {bad:?}");
    assert!(fs::symlink_metadata(&tmp).is_err(), "the link is gone");
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
}

fn key(upstream: &str) -> PoolKey {
    PoolKey {
        upstream_handler: upstream.into(),
        shape: Shape::default(),
    }
}

fn claim(exposed: &str, upstream: &str) -> Claim {
    Claim {
        exposed_handler: exposed.into(),
        key: key(upstream),
        config: PodSandboxConfig::default(),
    }
}

#[tokio::test]
async fn a_pool_only_serves_its_own_runtime_and_handler() {
    // No refill while the test runs: each claim's effect stays visible.
    let rig = PoolRig::builder()
        .pool("fast-runc", "fast-runc", key("runc"), 1)
        .pool("fast-gvisor", "fast-gvisor", key("runsc"), 3)
        .start()
        .await;
    let (cri, manager) = (&rig.cri, &rig.manager);
    let mut changes = manager.subscribe();
    let full = |m: &PoolManager| m.stats().iter().all(|s| s.free == s.desired);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !full(manager) {
            changes.changed().await.expect("manager alive");
        }
    })
    .await
    .expect("both pools fill");
    let handler_of = |id: &str| {
        cri.state()
            .sandboxes
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.runtime_handler.clone())
            .expect("a sandbox upstream")
    };

    // A runc claim gets the one runc slot, then none: never a runsc one.
    let slot = manager
        .claim(&claim("fast-runc", "runc"))
        .await
        .expect("claim")
        .expect("a runc slot");
    assert_eq!(handler_of(&slot.sandbox_id), "runc");
    let again = manager
        .claim(&claim("fast-runc", "runc"))
        .await
        .expect("claim");
    assert_eq!(
        again.err(),
        Some(NoSlot::PoolEmpty),
        "runsc slots are free, but not runc's"
    );

    // Keys and handlers that do not belong together find no pool at all.
    for (exposed, upstream) in [
        ("fast-runc", "runsc"),
        ("fast-gvisor", "runc"),
        ("runc", "runc"),
    ] {
        let answer = manager
            .claim(&claim(exposed, upstream))
            .await
            .expect("claim");
        assert_eq!(answer.err(), Some(NoSlot::NoPool), "{exposed} → {upstream}");
    }
    let gvisor = manager
        .claim(&claim("fast-gvisor", "runsc"))
        .await
        .expect("claim")
        .expect("a runsc slot");
    assert_eq!(handler_of(&gvisor.sandbox_id), "runsc");
    let stats = manager.stats();
    let claimed: Vec<(&str, usize, usize)> = stats
        .iter()
        .map(|s| (s.name.as_str(), s.free, s.claimed))
        .collect();
    assert_eq!(claimed, [("fast-runc", 0, 1), ("fast-gvisor", 2, 1)]);
}
