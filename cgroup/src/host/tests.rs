use std::path::PathBuf;

use super::*;

fn fake(mount: &Path, controllers: Option<&[&str]>) -> Hierarchy {
    Hierarchy::at(mount, controllers)
}

fn leaf_with(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
    dir.to_owned()
}

fn text(path: PathBuf) -> String {
    fs::read_to_string(path).unwrap()
}

fn leaf(path: &str) -> CgroupLeaf {
    CgroupLeaf::parse(path, "test").unwrap()
}

/// Issue 12 item 2: on a v1 memory hierarchy the target asks for the
/// charges of every joining task; other hierarchies are not touched; a
/// kernel without charge moving (no file, `EINVAL`) is no error.
#[test]
fn charges_are_asked_to_move_with_tasks_on_v1_memory_only() {
    let root = tempfile::tempdir().unwrap();
    let memory = fake(&root.path().join("memory"), Some(&["memory"]));
    let cpu = fake(&root.path().join("cpu"), Some(&["cpu", "cpuacct"]));
    let unified = fake(&root.path().join("unified"), None);
    let file = "memory.move_charge_at_immigrate";
    let target = leaf_with(&memory.mount.join("pod/sb"), &[(file, "")]);
    assert_eq!(
        charge_with_tasks(&memory, &target).unwrap(),
        ChargeMove::WithTasks
    );
    assert_eq!(text(target.join(file)), "3");
    for h in [&cpu, &unified] {
        let target = leaf_with(&h.mount.join("pod/sb"), &[]);
        assert_eq!(
            charge_with_tasks(h, &target).unwrap(),
            ChargeMove::NotMemory
        );
        assert!(!target.join(file).exists());
    }
    // No file (a kernel without the knob): writing never creates one.
    let without = leaf_with(&memory.mount.join("pod/other"), &[]);
    assert_eq!(
        charge_with_tasks(&memory, &without).unwrap(),
        ChargeMove::Refused
    );
    assert!(!without.join(file).exists());
    let code = |c| io::Error::from_raw_os_error(c);
    assert!(charge_move_refused(&code(nix::libc::EINVAL)));
    assert!(!charge_move_refused(&code(nix::libc::EIO)));
    assert!(!charge_move_refused(&code(nix::libc::EACCES)));
}

/// What stays charged to an emptied placeholder leaf is reclaimed so it
/// faults back in charged to the pod: v1 `memory.force_empty`, v2
/// `memory.reclaim` of its whole usage. Not while a task is left, and
/// not in hierarchies without the memory controller.
#[test]
fn an_emptied_leaf_is_reclaimed_v1_and_v2() {
    let root = tempfile::tempdir().unwrap();
    let memory = fake(&root.path().join("memory"), Some(&["memory"]));
    let emptied = leaf_with(
        &memory.mount.join("slots/u/sb"),
        &[("cgroup.procs", ""), ("memory.force_empty", "")],
    );
    reclaim_emptied(&memory, &emptied);
    assert_eq!(text(emptied.join("memory.force_empty")), "0");

    let busy = leaf_with(
        &memory.mount.join("slots/u/busy"),
        &[("cgroup.procs", "42\n"), ("memory.force_empty", "")],
    );
    reclaim_emptied(&memory, &busy);
    assert_eq!(text(busy.join("memory.force_empty")), "", "a task is left");

    let unified = fake(&root.path().join("unified"), None);
    let v2 = leaf_with(
        &unified.mount.join("slots/u/sb"),
        &[
            ("cgroup.procs", ""),
            ("memory.current", "8192\n"),
            ("memory.reclaim", ""),
        ],
    );
    reclaim_emptied(&unified, &v2);
    assert_eq!(text(v2.join("memory.reclaim")), "8192");

    let cpu = fake(&root.path().join("cpu"), Some(&["cpu"]));
    let other = leaf_with(
        &cpu.mount.join("slots/u/sb"),
        &[("cgroup.procs", ""), ("memory.force_empty", "")],
    );
    reclaim_emptied(&cpu, &other);
    assert_eq!(text(other.join("memory.force_empty")), "");
}

/// A new v1 cpuset cgroup has empty `cpus`/`mems` and refuses tasks until
/// they are set: they are copied down from the parent on the way (from the
/// runsc adapter's former `init_cpuset` test).
#[test]
fn cpuset_values_are_copied_down() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("cpuset.cpus"), "0-1\n").unwrap();
    fs::write(root.path().join("cpuset.mems"), "0\n").unwrap();
    let mid = root.path().join("kubepods");
    let c1 = mid.join("c1");
    fs::create_dir_all(&c1).unwrap();
    for d in [&mid, &c1] {
        fs::write(d.join("cpuset.cpus"), "\n").unwrap();
        fs::write(d.join("cpuset.mems"), "").unwrap();
    }
    fs::write(mid.join("cpuset.cpus"), "1\n").unwrap();
    let h = fake(root.path(), Some(&["cpuset"]));
    create_leaf(&h, &leaf("/kubepods/c1")).unwrap();
    assert_eq!(fs::read_to_string(mid.join("cpuset.cpus")).unwrap(), "1\n");
    assert_eq!(fs::read_to_string(mid.join("cpuset.mems")).unwrap(), "0");
    assert_eq!(fs::read_to_string(c1.join("cpuset.cpus")).unwrap(), "1");
    assert_eq!(fs::read_to_string(c1.join("cpuset.mems")).unwrap(), "0");
}

/// Joining writes the pid into the leaf of every hierarchy (creating it),
/// and a hierarchy that refuses is reported by path while the others are
/// still joined; removal takes the empty leaves away, a missing one is
/// fine, and `procs` reads the union.
#[test]
fn join_procs_and_remove_across_hierarchies() {
    let root = tempfile::tempdir().unwrap();
    let unified = fake(&root.path().join("unified"), None);
    let cpu = fake(&root.path().join("cpu"), Some(&["cpu"]));
    // A file where the hierarchy's directory should be: creation fails.
    let broken = fake(&root.path().join("broken"), Some(&["pids"]));
    fs::create_dir_all(&unified.mount).unwrap();
    fs::create_dir_all(&cpu.mount).unwrap();
    fs::write(&broken.mount, "").unwrap();
    let all = [unified.clone(), cpu.clone(), broken.clone()];
    let c = leaf("/kubepods/pod1/c1");
    // The kernel makes `cgroup.procs` with the directory; a fake tree has
    // it already.
    for h in [&unified, &cpu] {
        leaf_with(&h.mount.join("kubepods/pod1/c1"), &[("cgroup.procs", "")]);
    }
    let failed = join(&all, 42, &c);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        matches!(&failed[0], CgroupError::Create { .. }),
        "{}",
        failed[0]
    );
    assert!(failed[0].path().unwrap().starts_with(&broken.mount));
    for h in [&unified, &cpu] {
        assert_eq!(text(h.mount.join("kubepods/pod1/c1/cgroup.procs")), "42");
    }
    fs::write(cpu.mount.join("kubepods/pod1/c1/cgroup.procs"), "7\n42\n").unwrap();
    assert_eq!(procs(&all[..2], &c).unwrap(), [7, 42]);
    assert!(procs(&all[..2], &leaf("/gone")).unwrap().is_empty());

    // cgroupfs removes a leaf with its files; a plain directory needs them gone.
    for h in [&unified, &cpu] {
        fs::remove_file(h.mount.join("kubepods/pod1/c1/cgroup.procs")).unwrap();
    }
    assert!(remove(&all[..2], &c).is_empty());
    assert!(!unified.mount.join("kubepods/pod1/c1").exists());
    assert!(remove(&all[..2], &c).is_empty(), "already gone");
    let failed = remove(&all[..2], &leaf("/kubepods"));
    assert_eq!(failed.len(), 2, "not empty: {failed:?}");
}
