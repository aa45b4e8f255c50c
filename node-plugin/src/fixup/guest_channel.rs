//! The hostname channel of a gVisor slot's pause (docs/runtimes.md, "The
//! hostname channel"): the runsc adapter gives a pause whose image asks for
//! it two FIFOs, `hostname.in` (its stdin) and `hostname.out` (its stdout),
//! in the sandbox's adapter directory. A request `hostname SEQ NAME\n`
//! is answered `SEQ ok\n` or `SEQ error TEXT\n` within a millisecond or
//! so, where `runsc exec … --set-hostname` takes 20–50 ms. SEQ is a fresh
//! random token per request, so a late answer to an abandoned request (a
//! timeout, a crash of the node plugin) is never taken for this one.
//!
//! Any failure here is the caller's cue to fall back to the exec: an old
//! adapter or pause has no FIFOs ([`ChannelError::Absent`]), a pause that
//! cannot `sethostname` answers an error.

use std::{path::PathBuf, time::Duration};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::random::NoRandomness;

/// The argument of [`ChannelTemplate`] replaced by the sandbox id.
const SANDBOX_ID: &str = "{sandbox_id}";
/// The FIFOs' names, as the adapter makes them.
const REQUESTS: &str = "hostname.in";
const REPLIES: &str = "hostname.out";
/// Answers to other requests skipped before giving up (each pause answers
/// every request once, and a slot sees two or three in its life).
const MAX_STALE_LINES: usize = 64;

/// The directory of a sandbox's channel: an absolute path with
/// `{sandbox_id}` as one whole component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate(String);

impl ChannelTemplate {
    pub fn new(template: &str) -> Result<Self, String> {
        if !template.starts_with('/') {
            return Err(format!("{template:?} must be an absolute path"));
        }
        if !template.split('/').any(|c| c == SANDBOX_ID) {
            return Err(format!(
                "{template:?} must have {SANDBOX_ID:?} as a path component"
            ));
        }
        Ok(Self(template.to_owned()))
    }

    /// The channel of the runsc adapter whose runsc root is `root`
    /// (`<root>.adapter/<id>`, beside runsc's own state).
    pub fn runsc_adapter(root: &str) -> Self {
        Self(format!(
            "{}.adapter/{SANDBOX_ID}",
            root.trim_end_matches('/')
        ))
    }

    pub fn render(&self, sandbox_id: &str) -> PathBuf {
        PathBuf::from(
            self.0
                .split('/')
                .map(|c| if c == SANDBOX_ID { sandbox_id } else { c })
                .collect::<Vec<_>>()
                .join("/"),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why the channel did not set the hostname.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No `hostname.in`: the sandbox's pause or adapter predates the channel.
    #[error("no hostname channel at {0}")]
    Absent(PathBuf),
    #[error("the hostname {0:?} cannot be sent (a newline or NUL in it)")]
    BadName(String),
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the pause through {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pause did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{path} ended, or held only answers to other requests")]
    NoAnswer { path: PathBuf },
    #[error("the pause refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Random(#[from] NoRandomness),
}

/// Asks the pause behind the channel in `dir` to set `hostname`; `Ok` once
/// it answered that it did.
pub async fn set_hostname(
    dir: PathBuf,
    hostname: &str,
    deadline: Duration,
) -> Result<(), ChannelError> {
    if hostname.contains(['\n', '\0']) {
        return Err(ChannelError::BadName(hostname.to_owned()));
    }
    let requests = dir.join(REQUESTS);
    let replies = dir.join(REPLIES);
    if !requests.exists() {
        return Err(ChannelError::Absent(dir));
    }
    let token = crate::random::hex(8)?;
    let line = format!("hostname {token} {hostname}\n");
    tokio::time::timeout(deadline, exchange(requests, replies, &token, &line))
        .await
        .map_err(|_| ChannelError::Timeout(deadline))?
}

/// Opens the answers first (so ours cannot be missed), writes the request
/// (one write under PIPE_BUF: atomic), reads answers until ours.
async fn exchange(
    requests: PathBuf,
    replies: PathBuf,
    token: &str,
    line: &str,
) -> Result<(), ChannelError> {
    use tokio::net::unix::pipe;
    let open = |path: &PathBuf| {
        let path = path.clone();
        move |source| ChannelError::Open { path, source }
    };
    let rx = pipe::OpenOptions::new()
        .open_receiver(&replies)
        .map_err(open(&replies))?;
    // ENXIO when nothing holds the FIFO for reading: the sandbox is gone.
    let mut tx = pipe::OpenOptions::new()
        .open_sender(&requests)
        .map_err(open(&requests))?;
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| ChannelError::Io { path, source }
    };
    tx.write_all(line.as_bytes()).await.map_err(io(&requests))?;
    let mut answers = BufReader::new(rx).lines();
    for _ in 0..MAX_STALE_LINES {
        let Some(answer) = answers.next_line().await.map_err(io(&replies))? else {
            break;
        };
        let Some(rest) = answer.strip_prefix(token).and_then(|r| r.strip_prefix(' ')) else {
            continue;
        };
        return match rest {
            "ok" => Ok(()),
            _ => Err(ChannelError::Refused(
                rest.strip_prefix("error ").unwrap_or(rest).to_owned(),
            )),
        };
    }
    Err(ChannelError::NoAnswer { path: replies })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_needs_an_absolute_path_and_the_id_as_a_component() {
        assert!(ChannelTemplate::new("run/x/{sandbox_id}").is_err());
        assert!(ChannelTemplate::new("/run/x-{sandbox_id}").is_err());
        let t = ChannelTemplate::new("/run/x/{sandbox_id}/ch").expect("valid");
        assert_eq!(t.render("abc"), PathBuf::from("/run/x/abc/ch"));
        assert_eq!(
            ChannelTemplate::runsc_adapter("/run/containerd/runc/k8s.io/").render("abc"),
            PathBuf::from("/run/containerd/runc/k8s.io.adapter/abc")
        );
    }

    /// A pause stand-in on real FIFOs: answers each request with `answer`
    /// (`None`: the token echoed with "ok"), after one stale line.
    fn fake_pause(
        dir: &std::path::Path,
        answer: Option<&'static str>,
    ) -> std::thread::JoinHandle<String> {
        use std::io::{BufRead as _, Write as _};
        for name in [REQUESTS, REPLIES] {
            nix::unistd::mkfifo(
                &dir.join(name),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .expect("mkfifo");
        }
        let rw = |name| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(name))
                .expect("open")
        };
        let (input, mut output) = (rw(REQUESTS), rw(REPLIES));
        std::thread::spawn(move || {
            let mut line = String::new();
            std::io::BufReader::new(input)
                .read_line(&mut line)
                .expect("read");
            let token = line.split(' ').nth(1).expect("token").to_owned();
            let reply =
                answer.map_or_else(|| format!("{token} ok\n"), |a| format!("{token} {a}\n"));
            output
                .write_all(format!("0000 ok\n{reply}").as_bytes())
                .expect("write");
            line
        })
    }

    #[tokio::test]
    async fn the_pause_gets_the_name_and_its_answer_is_awaited_past_a_stale_one() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pause = fake_pause(tmp.path(), None);
        set_hostname(tmp.path().into(), "web-0", Duration::from_secs(5))
            .await
            .expect("set");
        let request = pause.join().expect("pause");
        assert!(
            request.starts_with("hostname ") && request.ends_with(" web-0\n"),
            "{request:?}"
        );
    }

    #[tokio::test]
    async fn a_refusal_carries_the_pause_s_text() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pause = fake_pause(
            tmp.path(),
            Some("error sethostname: Operation not permitted"),
        );
        let err = set_hostname(tmp.path().into(), "web-0", Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, ChannelError::Refused(t) if t == "sethostname: Operation not permitted"),
            "{err}"
        );
        pause.join().expect("pause");
    }

    #[tokio::test]
    async fn no_fifo_is_absent_and_a_silent_pause_times_out() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = set_hostname(tmp.path().into(), "web-0", Duration::from_secs(5))
            .await
            .expect_err("absent");
        assert!(matches!(err, ChannelError::Absent(_)), "{err}");

        // FIFOs held open by someone who never answers (an old pause).
        for name in [REQUESTS, REPLIES] {
            nix::unistd::mkfifo(
                &tmp.path().join(name),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .expect("mkfifo");
        }
        let _held: Vec<_> = [REQUESTS, REPLIES]
            .map(|n| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(tmp.path().join(n))
                    .expect("open")
            })
            .into();
        let err = set_hostname(tmp.path().into(), "web-0", Duration::from_millis(50))
            .await
            .expect_err("silent");
        assert!(matches!(err, ChannelError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn a_fifo_nobody_reads_fails_at_once_and_a_bad_name_is_not_sent() {
        let tmp = tempfile::tempdir().expect("tmp");
        for name in [REQUESTS, REPLIES] {
            nix::unistd::mkfifo(
                &tmp.path().join(name),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .expect("mkfifo");
        }
        let err = set_hostname(tmp.path().into(), "web-0", Duration::from_secs(5))
            .await
            .expect_err("no reader");
        assert!(matches!(err, ChannelError::Open { .. }), "{err}");
        let err = set_hostname(tmp.path().into(), "a\nhostname x b", Duration::from_secs(5))
            .await
            .expect_err("bad name");
        assert!(matches!(err, ChannelError::BadName(_)), "{err}");
    }
}
