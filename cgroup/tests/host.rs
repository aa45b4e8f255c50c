//! The cgroup layer on this host's real hierarchies (v1, v2 or hybrid):
//! a child process joins a fresh leaf everywhere, moves to a sibling, is
//! listed there, and the leaves are removed. Needs root; skipped with a
//! note otherwise (CI runs as root and fails instead of skipping).

use std::{
    collections::HashSet,
    process::{Child, Command},
};

use fast_sandbox_cgroup::{mounts, CgroupLeaf, Cgroups, HostCgroups, MoveScope};

/// The cgroups of `pid`, one `(hierarchy, path)` per line of
/// `/proc/<pid>/cgroup`.
fn cgroups_of(pid: u32) -> HashSet<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .expect("/proc/<pid>/cgroup")
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers.to_owned(), path.to_owned()))
        })
        .collect()
}

/// Kills and reaps the child even when an assertion fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_process_joins_moves_and_leaves_on_the_real_hierarchies() {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but not root"
        );
        eprintln!("SKIP a_process_joins_moves_and_leaves_on_the_real_hierarchies: needs root");
        return;
    }
    let hierarchies = mounts::mounted().expect("mounted hierarchies");
    assert!(!hierarchies.is_empty(), "no cgroup hierarchy mounted");
    let child = Reaped(Command::new("sleep").arg("60").spawn().expect("sleep"));
    let pid = child.0.id();
    let base = format!("/fast-sandbox-cgroup-test-{}", std::process::id());
    let leaf = |name: &str| CgroupLeaf::parse(&format!("{base}/{name}"), "test").expect("leaf");
    let (a, b) = (leaf("a"), leaf("b"));
    let cgroups = HostCgroups::default();

    let failed = cgroups.join(pid, &a).expect("join");
    assert!(failed.is_empty(), "join failed in {failed:?}");
    let everywhere = |l: &CgroupLeaf| cgroups_of(pid).iter().all(|(_, p)| p == l.as_str());
    assert!(everywhere(&a), "{:?}", cgroups_of(pid));
    let raw = i32::try_from(pid).expect("pid");
    assert_eq!(cgroups.procs(&a).expect("procs"), [raw]);

    // A retried move (already in `to` everywhere) is done; a move from a
    // leaf the process is not in changes nothing.
    let retried = cgroups.move_pid(raw, &b, &a, MoveScope::Every);
    assert!(retried.is_ok(), "{retried:?}");
    let err = cgroups
        .move_pid(raw, &leaf("c"), &b, MoveScope::Every)
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    assert!(everywhere(&a));
    cgroups
        .move_pid(raw, &a, &b, MoveScope::Every)
        .expect("move");
    assert!(everywhere(&b), "{:?}", cgroups_of(pid));
    assert!(cgroups.procs(&a).expect("procs").is_empty());

    drop(child);
    for l in [&a, &b, &CgroupLeaf::parse(&base, "test").expect("base")] {
        let failed = cgroups.remove(l).expect("remove");
        assert!(failed.is_empty(), "remove {l}: {failed:?}");
    }
    for h in &hierarchies {
        assert!(!h.mount.join(base.trim_start_matches('/')).exists());
    }
}
