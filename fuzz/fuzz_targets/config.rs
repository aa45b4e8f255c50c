//! The node plugin's config file, from arbitrary text, exactly as
//! `fast-sandbox-node serve --config` reads it: TOML → `FileConfig` →
//! `pool_specs`, `fixup_mechanisms`, `agent_settings` and
//! `Settings::resolve`. Never panics; an error has a message; accepted
//! pools satisfy what `pool_specs` promises.

#![no_main]

use std::collections::HashMap;

use fast_sandbox_node::config::{
    agent_settings, fixup_mechanisms, pool_specs, FileConfig, HumanDuration, Overrides, Settings,
    MAX_POOL_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Durations are also parsed from flags and the environment.
    if let Ok(d) = text.parse::<HumanDuration>() {
        assert!(!d.to_string().is_empty());
    }
    let file: FileConfig = match toml::from_str(text) {
        Ok(file) => file,
        Err(err) => {
            assert!(!err.to_string().is_empty());
            return;
        }
    };
    match pool_specs(&file.pools) {
        Ok(specs) => {
            assert_eq!(specs.len(), file.pools.len());
            let mut upstream_of: HashMap<&str, &str> = HashMap::new();
            for (i, spec) in specs.iter().enumerate() {
                assert!(spec.size <= MAX_POOL_SIZE);
                assert!(!spec.key.upstream_handler.is_empty());
                assert!(
                    !spec.name.is_empty()
                        && spec.name.len() <= 40
                        && spec
                            .name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                    "pool names are safe in paths and labels: {:?}",
                    spec.name
                );
                assert!(
                    specs[..i].iter().all(|s| s.name != spec.name),
                    "unique names"
                );
                // One exposed handler, one upstream handler.
                let upstream = upstream_of
                    .entry(spec.exposed_handler.as_str())
                    .or_insert(spec.key.upstream_handler.as_str());
                assert_eq!(*upstream, spec.key.upstream_handler);
                let groups = &spec.key.shape.supplemental_groups;
                assert!(groups.windows(2).all(|w| w[0] < w[1]));
            }
        }
        Err(err) => assert!(!format!("{err:#}").is_empty()),
    }
    match fixup_mechanisms(&file.pools) {
        // One mechanism per upstream handler named by a pool.
        Ok(mechanisms) => assert!(file
            .pools
            .iter()
            .all(|p| mechanisms.contains_key(&p.upstream))),
        Err(err) => assert!(!format!("{err:#}").is_empty()),
    }
    // A node name from the flag, so the host's name is not read; no host
    // IP override, so the address is the file's own.
    match agent_settings(&file.agent, Some("node-0".to_owned()), None) {
        Ok(Some(agent)) => assert_eq!(agent.node_name, "node-0"),
        Ok(None) => assert!(file.agent.address.as_deref().is_none_or(str::is_empty)),
        Err(err) => assert!(!format!("{err:#}").is_empty()),
    }
    let settings = Settings::resolve(file, Overrides::default());
    assert!(
        !settings.slots.cgroup_root_of("t").is_empty() || text.contains("placeholder_cgroup_root")
    );
});
