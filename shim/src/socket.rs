//! The shim's own CRI socket: created 0600 (0660 with a configured group),
//! never exposed with looser permissions, never stolen from a live server,
//! and removed on shutdown only if it is still ours.

use std::{
    fs::{self, DirBuilder, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use tokio::net::{UnixListener, UnixStream};

use crate::error::ShimError;

/// How long to wait for a server that may be listening on the socket path.
const LIVENESS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The group allowed to use the socket, by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    Id(u32),
    Name(String),
}

impl From<u32> for SocketGroup {
    fn from(gid: u32) -> Self {
        SocketGroup::Id(gid)
    }
}

impl FromStr for SocketGroup {
    type Err = std::convert::Infallible;

    /// All digits is a gid, anything else a group name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<u32>() {
            Ok(gid) => SocketGroup::Id(gid),
            Err(_) => SocketGroup::Name(s.to_owned()),
        })
    }
}

/// Where the shim serves CRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    pub path: PathBuf,
    /// `None`: owner only (0600). `Some`: the socket is chowned to this group
    /// and made 0660.
    pub group: Option<SocketGroup>,
}

impl SocketConfig {
    pub const DEFAULT_PATH: &'static str = "/run/fast-sandbox/cri.sock";
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from(Self::DEFAULT_PATH),
            group: None,
        }
    }
}

/// Removes the socket file when dropped, unless another instance has since
/// replaced it.
#[derive(Debug)]
pub(crate) struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(err) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %err, "cannot remove CRI socket");
                }
            }
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                "CRI socket was replaced by another instance; leaving it"
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "cannot inspect CRI socket")
            }
        }
    }
}

/// Binds the socket described by `cfg`.
///
/// An existing socket file is replaced only if nothing answers on it; a
/// regular file, directory or symlink at the path is an error. The socket is
/// bound inside a private (0700) directory, given its owner and mode there,
/// then renamed into place, so it is never reachable with looser permissions
/// and a stale file is replaced atomically.
pub(crate) async fn bind(cfg: &SocketConfig) -> Result<(UnixListener, SocketGuard), ShimError> {
    let path = cfg.path.clone();
    check_existing(&path).await?;
    let group = cfg.group.clone();
    let (listener, guard) = tokio::task::spawn_blocking(move || {
        let gid = group.as_ref().map(resolve_group).transpose()?;
        bind_in_place(&path, gid)
    })
    .await
    .map_err(|join| ShimError::BindSocket {
        path: cfg.path.clone(),
        source: io::Error::other(join),
    })??;
    let listener = UnixListener::from_std(listener).map_err(|source| ShimError::BindSocket {
        path: cfg.path.clone(),
        source,
    })?;
    Ok((listener, guard))
}

/// Refuses anything but a stale socket at `path`.
async fn check_existing(path: &Path) -> Result<(), ShimError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ShimError::InspectSocket {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ShimError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(LIVENESS_PROBE_TIMEOUT, UnixStream::connect(path)).await {
        // Something accepts connections there: another instance is serving.
        // A listener too busy to accept within the probe is also alive.
        Ok(Ok(_)) | Err(_) => Err(ShimError::SocketInUse {
            path: path.to_owned(),
        }),
        Ok(Err(err)) => {
            tracing::info!(path = %path.display(), %err, "replacing stale CRI socket");
            Ok(())
        }
    }
}

fn resolve_group(group: &SocketGroup) -> Result<u32, ShimError> {
    match group {
        SocketGroup::Id(gid) => Ok(*gid),
        SocketGroup::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(group.gid.as_raw()),
            Ok(None) => Err(ShimError::UnknownGroup { name: name.clone() }),
            Err(source) => Err(ShimError::LookupGroup {
                name: name.clone(),
                source,
            }),
        },
    }
}

fn bind_in_place(
    path: &Path,
    gid: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, SocketGuard), ShimError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|source| ShimError::CreateSocketDir {
            path: parent.to_owned(),
            source,
        })?;

    let staging = Staging::create(parent.join(format!(".fs-{}.tmp", std::process::id())))?;
    let temp = staging.dir.join("s");
    let listener =
        std::os::unix::net::UnixListener::bind(&temp).map_err(|source| ShimError::BindSocket {
            path: path.to_owned(),
            source,
        })?;
    let permissions = |source| ShimError::SocketPermissions {
        path: path.to_owned(),
        source,
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&temp, None, Some(gid)).map_err(permissions)?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    fs::set_permissions(&temp, Permissions::from_mode(mode)).map_err(permissions)?;
    fs::rename(&temp, path).map_err(|source| ShimError::BindSocket {
        path: path.to_owned(),
        source,
    })?;
    drop(staging);

    let meta = fs::symlink_metadata(path).map_err(|source| ShimError::InspectSocket {
        path: path.to_owned(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ShimError::BindSocket {
            path: path.to_owned(),
            source,
        })?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// A private directory to bind in, removed with whatever is left in it.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn create(dir: PathBuf) -> Result<Self, ShimError> {
        // Left over from a crashed run that had our pid: nothing in it is live.
        if fs::symlink_metadata(&dir).is_ok() {
            fs::remove_dir_all(&dir).map_err(|source| ShimError::RemoveStaleSocket {
                path: dir.clone(),
                source,
            })?;
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ShimError::CreateSocketDir {
                path: dir.clone(),
                source,
            })?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(path = %self.dir.display(), %err, "cannot remove staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn creates_owner_only_socket_and_removes_it_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/cri.sock");
        let cfg = SocketConfig {
            path: path.clone(),
            group: None,
        };
        let (listener, guard) = bind(&cfg).await.expect("bind");
        assert!(fs::symlink_metadata(&path)
            .expect("stat")
            .file_type()
            .is_socket());
        assert_eq!(mode(&path), 0o600);
        // Only the socket remains: the staging directory is gone.
        let entries: Vec<_> = fs::read_dir(path.parent().expect("parent"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("cri.sock")]);
        // It is really listening.
        UnixStream::connect(&path).await.expect("connect");
        drop(listener);
        drop(guard);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn group_socket_is_0660_and_chowned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        let gid = nix::unistd::getegid().as_raw();
        let cfg = SocketConfig {
            path: path.clone(),
            group: Some(SocketGroup::Id(gid)),
        };
        let (_listener, _guard) = bind(&cfg).await.expect("bind");
        assert_eq!(mode(&path), 0o660);
        assert_eq!(fs::symlink_metadata(&path).expect("stat").gid(), gid);
    }

    #[tokio::test]
    async fn unknown_group_name_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SocketConfig {
            path: dir.path().join("cri.sock"),
            group: Some(SocketGroup::Name("no-such-group-fast-sandbox".into())),
        };
        let err = bind(&cfg).await.expect_err("unknown group");
        assert!(matches!(err, ShimError::UnknownGroup { .. }), "{err}");
        assert!(!cfg.path.exists());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let old_ino = fs::symlink_metadata(&path).expect("stat").ino();
        let cfg = SocketConfig {
            path: path.clone(),
            group: None,
        };
        let (_listener, _guard) = bind(&cfg).await.expect("bind over stale socket");
        assert_ne!(fs::symlink_metadata(&path).expect("stat").ino(), old_ino);
        assert_eq!(mode(&path), 0o600);
    }

    #[tokio::test]
    async fn live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        let _live = std::os::unix::net::UnixListener::bind(&path).expect("live");
        let cfg = SocketConfig {
            path: path.clone(),
            group: None,
        };
        let err = bind(&cfg).await.expect_err("in use");
        assert!(matches!(err, ShimError::SocketInUse { .. }), "{err}");
    }

    #[tokio::test]
    async fn regular_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        fs::write(&path, b"precious").expect("write");
        let cfg = SocketConfig {
            path: path.clone(),
            group: None,
        };
        let err = bind(&cfg).await.expect_err("regular file");
        assert!(matches!(err, ShimError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).expect("still there"), b"precious");
    }

    #[tokio::test]
    async fn replaced_socket_is_left_alone_by_the_old_guard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cri.sock");
        let cfg = SocketConfig {
            path: path.clone(),
            group: None,
        };
        let (old_listener, old_guard) = bind(&cfg).await.expect("first");
        drop(old_listener); // the old instance stops accepting...
        let (_new_listener, _new_guard) = bind(&cfg).await.expect("second");
        drop(old_guard); // ...and exits after the new one took over
        assert!(path.exists(), "the new instance's socket must survive");
    }

    #[test]
    fn group_parses_id_or_name() {
        assert_eq!("1000".parse(), Ok(SocketGroup::Id(1000)));
        assert_eq!("kube".parse(), Ok(SocketGroup::Name("kube".into())));
    }
}
