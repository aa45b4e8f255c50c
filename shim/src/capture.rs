//! Capture mode: every CRI call through the shim written as one JSON line,
//! for recording what a real client (kubelet, crictl) sends and replaying it
//! in tests. Off unless configured ([`crate::Shim::with_capture`]).
//!
//! Each line: `seq`, `method` (gRPC path), `authority` (as the server read
//! it), `start_unix_ms`, `elapsed_us`, `request` (JSON of the compiled CRI
//! type, `null` if it does not decode or the method is unknown),
//! `request_pb` (base64 of the message bytes exactly as received),
//! `response`, `response_pb` (`null` on error and for streams), `code`
//! (gRPC code) and `message`.
//!
//! Lines are written by a thread of their own, so a slow disk never holds a
//! CRI call; if it falls 1,024 lines behind, lines are dropped and counted.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::methods::Method;

const BACKLOG: usize = 1024;

/// Where captured calls go.
#[derive(Debug, Clone)]
pub struct Capture {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    lines: mpsc::SyncSender<String>,
    seq: AtomicU64,
    dropped: AtomicU64,
}

/// One call, as the server saw it.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub(crate) path: &'a str,
    pub(crate) method: Option<&'static Method>,
    pub(crate) authority: Option<&'a str>,
    pub(crate) started: SystemTime,
    pub(crate) elapsed: Duration,
    pub(crate) request: &'a [u8],
    pub(crate) response: Option<&'a Bytes>,
    pub(crate) code: i32,
    pub(crate) message: &'a str,
}

impl Capture {
    /// Appends to `path` (created 0600 if missing).
    pub fn open(path: &Path) -> std::io::Result<Capture> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode_0600()
            .open(path)?;
        let (lines, rx) = mpsc::sync_channel::<String>(BACKLOG);
        std::thread::Builder::new()
            .name("cri-capture".into())
            .spawn(move || write_lines(file, &rx))?;
        Ok(Capture {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                lines,
                seq: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn record(&self, call: &Call<'_>) {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let decoded = |bytes: &[u8], response: bool| {
            call.method
                .and_then(|m| (m.json)(bytes, response))
                .unwrap_or(Value::Null)
        };
        let start_unix_ms = call
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = json!({
            "seq": seq,
            "method": call.path,
            "authority": call.authority,
            "start_unix_ms": u64::try_from(start_unix_ms).unwrap_or(u64::MAX),
            "elapsed_us": u64::try_from(call.elapsed.as_micros()).unwrap_or(u64::MAX),
            "request": decoded(call.request, false),
            "request_pb": b64(call.request),
            "response": call.response.map_or(Value::Null, |r| decoded(r, true)),
            "response_pb": call.response.map(|r| b64(r)),
            "code": call.code,
            "message": call.message,
        });
        if self.inner.lines.try_send(line.to_string()).is_err() {
            let dropped = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, path = %self.inner.path.display(), "CRI capture falls behind; lines dropped");
            }
        }
    }
}

fn write_lines(file: File, rx: &mpsc::Receiver<String>) {
    let mut out = BufWriter::new(file);
    while let Ok(line) = rx.recv() {
        // Whatever else is queued goes in the same write; then flush, so a
        // crash loses no call that was answered a moment before.
        let written = writeln!(out, "{line}")
            .and_then(|()| rx.try_iter().try_for_each(|next| writeln!(out, "{next}")))
            .and_then(|()| out.flush());
        if let Err(err) = written {
            tracing::error!(error = %err, "cannot write the CRI capture; capture stops");
            return;
        }
    }
    let _ = out.flush();
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}
