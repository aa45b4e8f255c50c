//! `fast-sandbox-node supervise` as the DaemonSet runs it, without root or
//! containerd (the upstream is absent, so the server is up but not ready):
//! the serving process comes back at once after each kill -9, repeated fast
//! crashes back off and a stop ends that wait, SIGTERM stops both
//! processes, orphans are reaped, and a killed supervisor takes its server
//! along.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fast_sandbox_proto::cri::{runtime_service_client::RuntimeServiceClient, VersionRequest};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

const BIN: &str = env!("CARGO_BIN_EXE_fast-sandbox-node");

/// `supervise --min-uptime`'s default: a server killed after running this
/// long is restarted at once; one killed sooner is a fast crash, and the
/// second of those in a row backs off.
const MIN_UPTIME: Duration = Duration::from_secs(1);

/// Polls `done` every 2 ms for at most `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pid"))
}

/// The direct children of `pid` (the supervisor is single-threaded).
fn children(pid: Pid) -> Vec<Pid> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// The one serving process under `supervisor`, once there is one and it
/// is not `not`.
fn serving(supervisor: Pid, not: Option<Pid>) -> Pid {
    let mut found = None;
    wait_until("the serving process", Duration::from_secs(10), || {
        found = children(supervisor).into_iter().find(|p| Some(*p) != not);
        found.is_some()
    });
    found.expect("found")
}

fn exists(pid: Pid) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A supervised `serve` without pools, its upstream absent.
struct Supervised {
    child: Child,
    socket: PathBuf,
    upstream: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Supervised {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("cri.sock");
        let upstream = dir.path().join("containerd.sock");
        let admin = free_port();
        let config = dir.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[upstream]\nendpoint = \"unix://{}\"\n[socket]\npath = {:?}\n[admin]\naddress = \"{admin}\"\n",
                upstream.display(),
                socket.display().to_string(),
            ),
        )
        .expect("config");
        let log = dir.path().join("supervisor.log");
        let child = Command::new(BIN)
            .args(["supervise", "--", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn");
        Self {
            child,
            socket,
            upstream,
            admin,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the shim answers CRI: Version comes back with the absent
    /// upstream's error, which only a serving shim can give.
    async fn answers(&self) -> bool {
        let Ok(channel) = fast_sandbox_shim::cri_channel(&self.socket.display().to_string()) else {
            return false;
        };
        let mut request = tonic::Request::new(VersionRequest::default());
        request.set_timeout(Duration::from_millis(500));
        match RuntimeServiceClient::new(channel).version(request).await {
            Ok(_) => false,
            Err(e) => e.message().contains(&self.upstream.display().to_string()),
        }
    }

    /// Time until the shim answers, polling every millisecond.
    async fn until_answering(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        while !self.answers().await {
            assert!(
                start.elapsed() < limit,
                "no CRI answer within {limit:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        start.elapsed()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_is_answered_by_a_new_one_at_once() {
    let mut sup = Supervised::start();
    let supervisor = pid_of(&sup.child);
    sup.until_answering(Duration::from_secs(10)).await;

    // Up, and honest: not ready while containerd does not answer.
    let (status, body) = fast_sandbox_node::admin::fetch(sup.admin, "/healthz")
        .await
        .expect("healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("does not answer Version"), "{body}");
    assert_eq!(
        fast_sandbox_node::admin::get(sup.admin, "/livez")
            .await
            .expect("livez"),
        "ok"
    );

    let mut gaps = Vec::new();
    let mut old = None;
    for _ in 0..10 {
        let pid = serving(supervisor, old);
        // Each kill lands on a server that has run as long as an OOM kill
        // or a panic in service would find it (not a crash loop).
        tokio::time::sleep_until((Instant::now() + MIN_UPTIME).into()).await;
        kill(pid, Signal::SIGKILL).expect("kill -9");
        let killed = Instant::now();
        sup.until_answering(Duration::from_secs(5)).await;
        gaps.push(killed.elapsed());
        old = Some(pid);
    }
    eprintln!("kill -9 → CRI answers again: {gaps:?}");
    assert!(
        p99(gaps.clone()) < Duration::from_millis(200),
        "CRI back within 200 ms of each kill: {gaps:?}"
    );
    let log = sup.log();
    assert_eq!(
        log.matches("the serving process ended; restarting it")
            .count(),
        10,
        "{log}"
    );
    assert!(log.contains("SIGKILL"), "the restart says why: {log}");

    // A killed supervisor takes its server along (no second shim left).
    let pid = serving(supervisor, None);
    sup.child.kill().expect("kill -9 the supervisor");
    sup.child.wait().expect("reaped");
    wait_until(
        "the orphaned server to stop",
        Duration::from_secs(10),
        || {
            !exists(pid)
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_gracefully_then_the_supervisor() {
    let mut sup = Supervised::start();
    let supervisor = pid_of(&sup.child);
    sup.until_answering(Duration::from_secs(10)).await;
    let pid = serving(supervisor, None);
    kill(supervisor, Signal::SIGTERM).expect("SIGTERM");
    let mut status = None;
    wait_until("the supervisor to exit", Duration::from_secs(20), || {
        status = sup.child.try_wait().expect("wait");
        status.is_some()
    });
    let log = sup.log();
    assert!(status.expect("exited").success(), "{log}");
    assert!(!exists(pid), "the server stopped too");
    assert!(!sup.socket.exists(), "a graceful stop removes the socket");
    assert!(log.contains("forwarding the stop signal"), "{log}");
    assert!(
        !log.contains("restarting it"),
        "a stop is not restarted: {log}"
    );
}

/// The delays the log gives for each restart, in order.
fn delays(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("restarting it"))
        .filter_map(|l| l.split("delay=").nth(1))
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn fast_crashes_back_off_and_a_stop_ends_the_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("supervisor.log");
    let missing = dir.path().join("missing.toml");
    let mut child = Command::new(BIN)
        .args([
            "supervise",
            "--backoff-first=50ms",
            "--",
            "serve",
            "--config",
        ])
        .arg(&missing)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("five restarts", Duration::from_secs(20), || {
        delays(&read()).len() >= 5
    });
    // Immediate, then doubling from 50 ms: never a busy loop.
    assert_eq!(
        delays(&read())[..5],
        ["0ns", "50ms", "100ms", "200ms", "400ms"],
        "{}",
        read()
    );
    assert!(
        read().contains("missing.toml"),
        "the server's own error is logged"
    );
    wait_until("the sixth restart", Duration::from_secs(20), || {
        delays(&read()).len() >= 6
    });
    // Now in an 800 ms wait: a stop ends it at once.
    kill(pid_of(&child), Signal::SIGTERM).expect("SIGTERM");
    let asked = Instant::now();
    let mut status = None;
    wait_until("the supervisor to exit", Duration::from_secs(5), || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    assert!(status.expect("exited").success(), "{}", read());
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "stopped during the back-off, not after it: {:?}",
        asked.elapsed()
    );
}

#[test]
fn orphans_of_the_server_are_reaped_and_its_status_is_the_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("orphan.pid");
    // The subshell starts a sleep and exits: the sleep is orphaned.
    let script = format!(
        "(sleep 300 & echo $! > {p}.tmp && mv {p}.tmp {p}); exec sleep 300",
        p = pidfile.display()
    );
    let mut child = Command::new(BIN)
        .args(["supervise", "--program=/bin/sh", "--", "-c", &script])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let supervisor = pid_of(&child);
    wait_until("the orphan's pid", Duration::from_secs(10), || {
        pidfile.exists()
    });
    let orphan = Pid::from_raw(
        std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid"),
    );
    let ppid = || {
        procfs::process::Process::new(orphan.as_raw())
            .and_then(|p| p.stat())
            .map(|s| s.ppid)
    };
    wait_until(
        "the orphan to be handed over",
        Duration::from_secs(10),
        || ppid().is_ok_and(|p| p == supervisor.as_raw()),
    );
    kill(orphan, Signal::SIGKILL).expect("kill the orphan");
    // A zombie would keep its /proc entry.
    wait_until("the orphan to be reaped", Duration::from_secs(10), || {
        !exists(orphan)
    });

    kill(supervisor, Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the server died of the forwarded SIGTERM"
    );
}
