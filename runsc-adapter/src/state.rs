//! What the adapter remembers per container between invocations, under
//! `<runsc root>.adapter/<id>/` (beside runsc's own root, never inside it):
//! `state.json` (the waiter and the container's cgroup) and `start`, the
//! FIFO on which the waiter waits for `start` (gone once started).

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::AdapterError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub waiter_pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: tells the waiter from a process that
    /// reused its PID.
    pub waiter_start_time: u64,
    /// The OCI `cgroupsPath`, when it is a cgroupfs path.
    pub cgroups_path: Option<String>,
    pub terminal: bool,
    /// The sandbox process, for a pod's first container (runsc copies its
    /// network namespace at `start`); absent in older state files.
    #[serde(default)]
    pub sandbox_pid: Option<u32>,
}

/// The adapter's directory for runsc root `root`.
pub fn adapter_root(root: Option<&str>) -> PathBuf {
    match root {
        Some(r) => PathBuf::from(format!("{}.adapter", r.trim_end_matches('/'))),
        None => PathBuf::from("/run/fast-sandbox-runsc"),
    }
}

#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub dir: PathBuf,
}

impl ContainerDir {
    pub fn new(adapter_root: &Path, id: &str) -> Result<Self, AdapterError> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(AdapterError::Usage(format!("invalid container id {id:?}")));
        }
        Ok(Self {
            dir: adapter_root.join(id),
        })
    }

    pub fn fifo(&self) -> PathBuf {
        self.dir.join("start")
    }

    /// Where `runsc create` of a pod's first container writes the
    /// sandbox's PID.
    pub fn sandbox_pid_file(&self) -> PathBuf {
        self.dir.join("sandbox.pid")
    }

    /// The PID in [`Self::sandbox_pid_file`], if runsc wrote one.
    pub fn sandbox_pid(&self) -> Option<u32> {
        fs::read_to_string(self.sandbox_pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn save(&self, state: &ContainerState) -> Result<(), AdapterError> {
        let bytes = serde_json::to_vec(state).map_err(|e| AdapterError::Spec {
            path: self.state_file(),
            source: e,
        })?;
        write_atomic(&self.state_file(), &bytes)
    }

    pub fn load(&self) -> Result<ContainerState, AdapterError> {
        let path = self.state_file();
        let bytes = fs::read(&path).map_err(|e| AdapterError::io("read", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| AdapterError::Spec { path, source: e })
    }

    pub fn remove(&self) -> Result<(), AdapterError> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(AdapterError::io("remove", &self.dir, e))
            }
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(|e| AdapterError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| AdapterError::io("rename", path, e))
}

/// Field 22 (start time) of a `/proc/<pid>/stat` line.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of process `pid`, if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

impl ContainerState {
    /// True while the recorded waiter process (not a PID reuse) is alive.
    pub fn waiter_alive(&self) -> bool {
        start_time(self.waiter_pid) == Some(self.waiter_start_time) && !is_zombie(self.waiter_pid)
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
    }

    #[test]
    fn state_round_trips_and_ids_are_checked() {
        let root = tempfile::tempdir().unwrap();
        let dir = ContainerDir::new(root.path(), "abc").unwrap();
        fs::create_dir_all(&dir.dir).unwrap();
        let st = ContainerState {
            waiter_pid: 42,
            waiter_start_time: 7,
            cgroups_path: Some("/kubepods/x".into()),
            terminal: true,
            sandbox_pid: Some(9),
        };
        dir.save(&st).unwrap();
        assert_eq!(dir.load().unwrap(), st);
        dir.remove().unwrap();
        dir.remove().unwrap();
        assert!(ContainerDir::new(root.path(), "../x").is_err());
        assert!(ContainerDir::new(root.path(), "").is_err());
    }

    #[test]
    fn state_files_without_a_sandbox_pid_still_load() {
        let root = tempfile::tempdir().unwrap();
        let dir = ContainerDir::new(root.path(), "old").unwrap();
        fs::create_dir_all(&dir.dir).unwrap();
        fs::write(
            dir.dir.join("state.json"),
            r#"{"waiter_pid":1,"waiter_start_time":2,"cgroups_path":null,"terminal":false}"#,
        )
        .unwrap();
        assert_eq!(dir.load().unwrap().sandbox_pid, None);
        assert_eq!(dir.sandbox_pid(), None);
        fs::write(dir.sandbox_pid_file(), "4242\n").unwrap();
        assert_eq!(dir.sandbox_pid(), Some(4242));
    }

    #[test]
    fn adapter_root_is_beside_runscs_root() {
        assert_eq!(
            adapter_root(Some("/run/x/runsc/k8s.io/")),
            PathBuf::from("/run/x/runsc/k8s.io.adapter")
        );
    }
}
