//! Durable claim records: one file per claimed slot, written (renamed into
//! place) *before* kubelet is told the slot's id, so a crash of the node
//! plugin at any later point still knows which pod owns which sandbox.
//!
//! Layout under the state directory:
//! - `token`: the node's secret slot token (0600), created once.
//! - `claims/<sandbox id>.json`: one [`ClaimRecord`] per claimed slot.
//!
//! Writes go to a temporary file that is renamed into place, so a record is
//! either absent or complete. No fsync: the record must survive the node
//! plugin (kill -9 at any point), which the page cache guarantees; a crash
//! of the node itself takes every sandbox with it, and recovery reconciles
//! with upstream (a slot whose record was lost is removed as an orphan,
//! and kubelet recreates the pod's sandbox as it would anyway). Measured:
//! the two fsyncs cost 0.3–1 ms per claim on these VMs, most of the warm
//! claim. A record that does not parse is reported (and ignored) rather
//! than trusted.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use fast_sandbox_proto::cri::PodSandboxConfig;
use serde::{Deserialize, Serialize};

/// Errors of the record store; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("creating state directory {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the claim record of {sandbox_id}")]
    Encode {
        sandbox_id: String,
        source: serde_json::Error,
    },
    #[error("the slot token")]
    Token(#[from] crate::random::NoRandomness),
    #[error("sandbox id {0:?} is not 64 lowercase hex digits")]
    BadId(String),
}

/// What is kept about one claim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClaimRecord {
    pub sandbox_id: String,
    pub pool: String,
    pub exposed_handler: String,
    pub claimed_at_ns: i64,
    /// PID of the slot's pause process when it was claimed.
    pub pause_pid: i32,
    /// The placeholder's cgroup parent the pause was created under.
    pub placeholder_cgroup_parent: String,
    /// The pod's real sandbox config, as kubelet sent it.
    pub config: PodSandboxConfig,
    /// The fix-up's synchronous part (identity: hostname, resolv.conf,
    /// sysctls) has been applied. A record without it is a claim the node
    /// plugin died in the middle of: recovery applies the fix-up then.
    #[serde(default)]
    pub identity_applied: bool,
    /// The pod's own IPs, when the pool rebinds the network at claim.
    #[serde(default)]
    pub network: Option<fast_sandbox_shim::slots::PodIps>,
}

/// A record file that could not be read back.
#[derive(Debug)]
pub struct BadRecord {
    pub path: PathBuf,
    pub error: String,
}

/// The on-disk store.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

/// True for ids containerd generates (64 lowercase hex digits): the only
/// names that may become file names here.
pub fn is_sandbox_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

impl RecordStore {
    /// Opens (creating if needed, 0700) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, RecordError> {
        let dir = state_dir.join("claims");
        for d in [state_dir, dir.as_path()] {
            fs::create_dir_all(d).map_err(|source| RecordError::CreateDir {
                path: d.to_owned(),
                source,
            })?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(|source| {
                RecordError::CreateDir {
                    path: d.to_owned(),
                    source,
                }
            })?;
        }
        Ok(Self { dir })
    }

    fn state_dir(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("/"))
    }

    fn path_of(&self, sandbox_id: &str) -> Result<PathBuf, RecordError> {
        if !is_sandbox_id(sandbox_id) {
            return Err(RecordError::BadId(sandbox_id.to_owned()));
        }
        Ok(self.dir.join(format!("{sandbox_id}.json")))
    }

    /// The node's slot token, created (random, 0600) on first use. It marks
    /// placeholders as ours; a pod cannot guess it.
    pub fn token(&self) -> Result<String, RecordError> {
        let path = self.state_dir().join("token");
        match fs::read_to_string(&path) {
            Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(RecordError::Read { path, source }),
        }
        let token = crate::random::hex(16)?;
        write_atomically(&path, token.as_bytes(), 0o600)?;
        Ok(token)
    }

    /// Writes the record atomically; it survives the node plugin from here on.
    pub fn put(&self, record: &ClaimRecord) -> Result<(), RecordError> {
        let path = self.path_of(&record.sandbox_id)?;
        let json = serde_json::to_vec(record).map_err(|source| RecordError::Encode {
            sandbox_id: record.sandbox_id.clone(),
            source,
        })?;
        write_atomically(&path, &json, 0o600)
    }

    /// Forgets a claim; a missing record is fine.
    pub fn remove(&self, sandbox_id: &str) -> Result<(), RecordError> {
        let path = self.path_of(sandbox_id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Remove { path, source }),
        }
    }

    /// Every record on disk, and the files that could not be read.
    pub fn load(&self) -> Result<(Vec<ClaimRecord>, Vec<BadRecord>), RecordError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| RecordError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A write that never finished: the claim was never answered.
                let _ = fs::remove_file(&path);
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ClaimRecord>(&b).map_err(|e| e.to_string()))
                .and_then(|r| {
                    let stem = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or_default();
                    if stem == r.sandbox_id && is_sandbox_id(stem) {
                        Ok(r)
                    } else {
                        Err(format!(
                            "file name does not match sandbox id {:?}",
                            r.sandbox_id
                        ))
                    }
                });
            match parsed {
                Ok(r) => good.push(r),
                Err(error) => bad.push(BadRecord { path, error }),
            }
        }
        Ok((good, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn record(c: char) -> ClaimRecord {
        ClaimRecord {
            sandbox_id: id(c),
            pool: "fast-runc".into(),
            exposed_handler: "fast-runc".into(),
            claimed_at_ns: 42,
            pause_pid: 7,
            placeholder_cgroup_parent: "/fast-sandbox/x".into(),
            config: PodSandboxConfig {
                hostname: "web-0".into(),
                ..Default::default()
            },
            identity_applied: true,
            network: None,
        }
    }

    #[test]
    fn records_round_trip_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put(&record('a')).unwrap();
        store.put(&record('b')).unwrap();
        let (mut good, bad) = store.load().unwrap();
        good.sort_by(|x, y| x.sandbox_id.cmp(&y.sandbox_id));
        assert_eq!(good, vec![record('a'), record('b')]);
        assert!(bad.is_empty());
        store.remove(&id('a')).unwrap();
        store.remove(&id('a')).unwrap();
        assert_eq!(store.load().unwrap().0, vec![record('b')]);
    }

    #[test]
    fn ids_that_are_not_containerd_ids_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        for bad in [
            "../../etc/passwd",
            "",
            "ABC",
            &id('g'),
            &format!("{}/", id('a')),
        ] {
            let mut r = record('a');
            r.sandbox_id = bad.to_string();
            assert!(matches!(store.put(&r), Err(RecordError::BadId(_))), "{bad}");
            assert!(
                matches!(store.remove(bad), Err(RecordError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn corrupt_and_half_written_records_are_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put(&record('a')).unwrap();
        let claims = dir.path().join("claims");
        fs::write(
            claims.join(format!("{}.json", id('b'))),
            b"{\"sandbox_id\": tru",
        )
        .unwrap();
        fs::write(claims.join(format!("{}.tmp", id('c'))), b"partial").unwrap();
        // A record whose content names another sandbox than its file.
        let mut other = record('d');
        other.sandbox_id = id('e');
        fs::write(
            claims.join(format!("{}.json", id('d'))),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        let (good, bad) = store.load().unwrap();
        assert_eq!(good, vec![record('a')]);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(!claims.join(format!("{}.tmp", id('c'))).exists());
    }

    #[test]
    fn token_is_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let t1 = store.token().unwrap();
        let t2 = RecordStore::open(dir.path()).unwrap().token().unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 32);
        let mode = fs::metadata(dir.path().join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
