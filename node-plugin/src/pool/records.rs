//! Durable claim records: one file per claimed slot, written (renamed into
//! place) *before* kubelet is told the slot's id, so a crash of the node
//! plugin at any later point still knows which pod owns which sandbox.
//!
//! Layout under the state directory:
//! - `token`: the node's secret slot token (0600), created once.
//! - `claims/<sandbox id>.json`: one [`ClaimRecord`] per claimed slot.
//!
//! A copy of each record is kept in the sandbox's own directory in
//! containerd (`<containerd root>/io.containerd.grpc.v1.cri/sandboxes/<id>/`
//! [`COPY_NAME`]), which containerd removes with the sandbox: if `claims/`
//! is lost, recovery rebuilds the records from the copies instead of
//! taking claimed sandboxes for free slots.
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
    /// containerd's directory of sandbox directories, where each record's
    /// copy lives; `None`: no copies.
    copies: Option<PathBuf>,
}

/// File name of a record's copy in its sandbox's containerd directory.
pub const COPY_NAME: &str = "fast-sandbox-claim.json";

/// containerd's CRI directory of sandbox directories under its root.
pub fn sandboxes_dir(containerd_root: &Path) -> PathBuf {
    containerd_root.join("io.containerd.grpc.v1.cri/sandboxes")
}

/// A public name of the instance whose slot token is `token` (12 hex
/// digits of a SHA-256 over it): it names the instance's placeholder
/// cgroup root, visible to every process on the host, and does not give
/// the token away.
pub fn instance_id(token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("fast-sandbox instance\0{token}"));
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn remove_if_present(path: &Path) -> Result<(), RecordError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
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
        Ok(Self { dir, copies: None })
    }

    /// Also keeps a copy of each record in its sandbox's directory under
    /// `sandboxes` ([`sandboxes_dir`]).
    #[must_use]
    pub fn with_copies(mut self, sandboxes: PathBuf) -> Self {
        self.copies = Some(sandboxes);
        self
    }

    /// Where the copy of `sandbox_id`'s record lives (the id is checked).
    fn copy_of(&self, sandbox_id: &str) -> Result<Option<PathBuf>, RecordError> {
        if !is_sandbox_id(sandbox_id) {
            return Err(RecordError::BadId(sandbox_id.to_owned()));
        }
        Ok(self
            .copies
            .as_ref()
            .map(|d| d.join(sandbox_id).join(COPY_NAME)))
    }

    /// The copy of `sandbox_id`'s record, if there is a readable one that
    /// names that sandbox.
    pub fn read_copy(&self, sandbox_id: &str) -> Result<Option<ClaimRecord>, RecordError> {
        let Some(path) = self.copy_of(sandbox_id)? else {
            return Ok(None);
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        match serde_json::from_slice::<ClaimRecord>(&bytes) {
            Ok(r) if r.sandbox_id == sandbox_id => Ok(Some(r)),
            Ok(_) | Err(_) => Ok(None),
        }
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
        write_atomically(&path, &json, 0o600)?;
        // The copy is the second line of defence (a lost `claims/`): its
        // failure is logged, not a failed claim.
        if let Some(copy) = self.copy_of(&record.sandbox_id)? {
            if let Err(e) = write_atomically(&copy, &json, 0o600) {
                tracing::warn!(sandbox = %record.sandbox_id, error = %crate::blocking::chain(&e),
                    "writing the copy of a claim record in the sandbox's directory failed");
            }
        }
        Ok(())
    }

    /// Forgets a claim (record and copy); a missing record is fine.
    pub fn remove(&self, sandbox_id: &str) -> Result<(), RecordError> {
        let path = self.path_of(sandbox_id)?;
        if let Some(copy) = self.copy_of(sandbox_id)? {
            remove_if_present(&copy)?;
        }
        remove_if_present(&path)
    }

    /// Removes every record, its copy, the token and the state directories
    /// themselves (uninstall). Copies of sandboxes already removed are gone
    /// with their directory.
    pub fn remove_all(&self) -> Result<(), RecordError> {
        let (good, bad) = self.load()?;
        for id in good.iter().map(|r| r.sandbox_id.as_str()).chain(
            bad.iter()
                .filter_map(|b| b.path.file_stem().and_then(|s| s.to_str())),
        ) {
            if is_sandbox_id(id) {
                self.remove(id)?;
            }
        }
        for b in &bad {
            remove_if_present(&b.path)?;
        }
        remove_if_present(&self.state_dir().join("token"))?;
        for d in [self.dir.as_path(), self.state_dir()] {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RecordError::Remove {
                        path: d.to_owned(),
                        source,
                    })
                }
            }
        }
        Ok(())
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

    /// The record format of the release before copies existed (upgrade):
    /// a record it wrote loads unchanged.
    #[test]
    fn records_of_the_previous_release_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let old = format!(
            r#"{{"sandbox_id":"{id}","pool":"fast-runc","exposed_handler":"fast-runc","claimed_at_ns":42,"pause_pid":7,"placeholder_cgroup_parent":"/fast-sandbox/x","config":{{"metadata":null,"hostname":"web-0","log_directory":"","dns_config":null,"port_mappings":[],"labels":{{}},"annotations":{{}},"linux":null,"windows":null}},"identity_applied":true,"network":null}}"#,
            id = id('a')
        );
        fs::write(dir.path().join(format!("claims/{}.json", id('a'))), old).unwrap();
        let (good, bad) = store.load().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(good, vec![record('a')]);
    }

    #[test]
    fn copies_follow_their_record_and_survive_a_lost_claims_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sandboxes = dir.path().join("sandboxes");
        fs::create_dir_all(sandboxes.join(id('a'))).unwrap();
        let store = RecordStore::open(&dir.path().join("state"))
            .unwrap()
            .with_copies(sandboxes.clone());
        store.put(&record('a')).unwrap();
        // A sandbox without a directory (removed meanwhile): no copy, and
        // the record itself is still written.
        store.put(&record('b')).unwrap();
        assert_eq!(store.load().unwrap().0.len(), 2);
        fs::remove_dir_all(dir.path().join("state/claims")).unwrap();
        assert_eq!(store.read_copy(&id('a')).unwrap(), Some(record('a')));
        assert_eq!(store.read_copy(&id('b')).unwrap(), None);
        store.remove(&id('a')).unwrap();
        assert!(!sandboxes.join(id('a')).join(COPY_NAME).exists());
        assert_eq!(store.read_copy(&id('a')).unwrap(), None);
    }

    #[test]
    fn remove_all_leaves_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = RecordStore::open(&state).unwrap();
        store.token().unwrap();
        store.put(&record('a')).unwrap();
        fs::write(state.join(format!("claims/{}.json", id('b'))), b"junk").unwrap();
        store.remove_all().unwrap();
        assert!(!state.exists());
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
