//! The hostname channel of a pod's pause (docs/runtimes.md, "The hostname
//! channel"): two FIFOs in the container's adapter directory, handed to
//! `runsc create` of the sandbox container as the pause's stdin and stdout,
//! on which fast-sandbox's pause (`hack/pause/pause.c`) serves `hostname
//! SEQ NAME` requests. The node plugin writes a claimed slot's hostname
//! there instead of running `runsc exec` (20–50 ms) per claim.
//!
//! Only for a sandbox container whose image says its pause speaks the
//! protocol ([`MARKER_ENV`] in its environment): any other pause keeps
//! containerd's stdio and its spec, and the node plugin, finding no FIFO,
//! falls back to its exec. gVisor grants a spec's capabilities to a uid-0
//! process only, so the spec is rewritten to start the pause as uid 0 with
//! `CAP_SYS_ADMIN` (for `sethostname`) plus `CAP_SETUID`/`CAP_SETGID` (to
//! become the image's user, named in [`USER_ENV`]); the pause drops all but
//! `CAP_SYS_ADMIN` before it reads anything.

use std::{
    fs::{File, OpenOptions},
    path::Path,
};

use serde_json::{json, Value};

use crate::{
    error::AdapterError,
    state::{self, ContainerDir},
};

/// In the image's environment: the pause serves the hostname channel.
pub const MARKER_ENV: &str = "FAST_SANDBOX_PAUSE_CHANNEL=hostname";
/// Set by the adapter: the `UID:GID` the pause becomes.
pub const USER_ENV: &str = "FAST_SANDBOX_PAUSE_USER";
/// The FIFO the node plugin writes requests to (the pause's stdin).
pub const REQUESTS: &str = "hostname.in";
/// The FIFO the pause answers on (its stdout).
pub const REPLIES: &str = "hostname.out";

/// The capabilities a channel pause starts with.
const CAPS: [&str; 3] = ["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"];

/// The pause's stdin and stdout, each a FIFO opened read-write (so neither
/// end ever sees EOF or EPIPE while the sandbox holds them).
#[derive(Debug)]
pub struct Channel {
    pub requests: File,
    pub replies: File,
}

/// Whether `spec` (a bundle's `config.json`) runs a pause that serves the
/// channel.
pub fn wanted(spec: &Value) -> bool {
    spec.pointer("/process/env")
        .and_then(Value::as_array)
        .is_some_and(|env| env.iter().any(|e| e.as_str() == Some(MARKER_ENV)))
}

/// Rewrites `spec` for a channel pause: uid 0 with [`CAPS`] only, the
/// image's user in [`USER_ENV`]. Fails on a spec without `process`.
pub fn rewrite(spec: &mut Value) -> Result<(), String> {
    let process = spec
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or("no process in the spec")?;
    let user = process.get("user").cloned().unwrap_or_else(|| json!({}));
    let uid = user.get("uid").and_then(Value::as_u64).unwrap_or(0);
    let gid = user.get("gid").and_then(Value::as_u64).unwrap_or(0);
    process.insert("user".into(), json!({ "uid": 0, "gid": 0 }));
    let env = process
        .entry("env")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or("process.env is not a list")?;
    env.retain(|e| {
        !e.as_str()
            .is_some_and(|e| e.starts_with(&format!("{USER_ENV}=")))
    });
    env.push(json!(format!("{USER_ENV}={uid}:{gid}")));
    process.insert(
        "capabilities".into(),
        json!({ "bounding": CAPS, "effective": CAPS, "permitted": CAPS }),
    );
    Ok(())
}

/// For the sandbox container of `bundle`: when its pause serves the
/// channel, makes the two FIFOs in `dir`, rewrites the spec and returns
/// the pause's stdio. `None` (nothing changed) for any other pause.
pub fn prepare(bundle: &Path, dir: &ContainerDir) -> Result<Option<Channel>, AdapterError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| AdapterError::io("read", &path, e))?;
    let mut spec: Value = serde_json::from_slice(&bytes).map_err(|e| AdapterError::Spec {
        path: path.clone(),
        source: e,
    })?;
    if !wanted(&spec) {
        return Ok(None);
    }
    rewrite(&mut spec).map_err(|why| AdapterError::BadSpec {
        path: path.clone(),
        why,
    })?;
    let channel = Channel {
        requests: fifo(&dir.dir.join(REQUESTS))?,
        replies: fifo(&dir.dir.join(REPLIES))?,
    };
    let bytes = serde_json::to_vec(&spec).map_err(|e| AdapterError::Spec {
        path: path.clone(),
        source: e,
    })?;
    state::write_atomic(&path, &bytes)?;
    Ok(Some(channel))
}

/// Makes a FIFO (0600) at `path` and opens it read-write.
fn fifo(path: &Path) -> Result<File, AdapterError> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| AdapterError::io("mkfifo", path, e.into()))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| AdapterError::io("open", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": { "uid": 65535, "gid": 65534, "additionalGids": [65534] },
                "args": ["/pause"],
                "env": ["PATH=/bin", MARKER_ENV],
                "capabilities": { "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"] },
                "noNewPrivileges": true
            },
            "hostname": "placeholder",
            "annotations": { "x": "y" }
        })
    }

    #[test]
    fn only_a_pause_that_says_it_serves_the_channel_gets_one() {
        assert!(wanted(&pause_spec()));
        let mut other = pause_spec();
        other["process"]["env"] = json!(["PATH=/bin", "FAST_SANDBOX_PAUSE_CHANNEL=other"]);
        assert!(!wanted(&other));
        assert!(!wanted(&json!({ "process": {} })));
    }

    #[test]
    fn rewrite_starts_the_pause_as_root_with_three_caps_and_names_its_user() {
        let mut spec = pause_spec();
        rewrite(&mut spec).expect("rewrite");
        assert_eq!(spec["process"]["user"], json!({ "uid": 0, "gid": 0 }));
        assert_eq!(
            spec["process"]["env"],
            json!([
                "PATH=/bin",
                MARKER_ENV,
                "FAST_SANDBOX_PAUSE_USER=65535:65534"
            ])
        );
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(spec["process"]["capabilities"][set], json!(CAPS), "{set}");
        }
        assert!(spec["process"]["capabilities"].get("ambient").is_none());
        // Everything else survives.
        assert_eq!(spec["process"]["noNewPrivileges"], json!(true));
        assert_eq!(spec["annotations"], json!({ "x": "y" }));
        // A second rewrite (a retried create) keeps one user entry.
        let before = spec["process"]["env"].clone();
        spec["process"]["user"] = json!({ "uid": 65535, "gid": 65534 });
        rewrite(&mut spec).expect("again");
        assert_eq!(spec["process"]["env"], before);
    }

    #[test]
    fn rewrite_refuses_a_spec_without_a_process() {
        let err = rewrite(&mut json!({ "ociVersion": "1.0.2" })).expect_err("no process");
        assert!(err.contains("process"), "{err}");
    }

    #[test]
    fn prepare_makes_two_fifos_only_for_a_channel_pause() {
        use std::os::unix::fs::FileTypeExt as _;
        let tmp = tempfile::tempdir().expect("tmp");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir(&bundle).expect("bundle");
        let dir = ContainerDir::new(tmp.path(), "sb").expect("dir");
        std::fs::create_dir(&dir.dir).expect("dir");

        let mut plain = pause_spec();
        plain["process"]["env"] = json!(["PATH=/bin"]);
        std::fs::write(bundle.join("config.json"), plain.to_string()).expect("write");
        assert!(prepare(&bundle, &dir).expect("plain").is_none());
        assert!(!dir.dir.join(REQUESTS).exists());

        std::fs::write(bundle.join("config.json"), pause_spec().to_string()).expect("write");
        let channel = prepare(&bundle, &dir).expect("prepare").expect("a channel");
        for name in [REQUESTS, REPLIES] {
            let meta = std::fs::metadata(dir.dir.join(name)).expect(name);
            assert!(meta.file_type().is_fifo(), "{name}");
        }
        let written: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        assert_eq!(written["process"]["user"]["uid"], json!(0));
        drop(channel);
    }
}
