//! Leader election between controller replicas against a mocked API server
//! (kube-rs `tower-test`): one Lease served with real resourceVersion
//! semantics (a stale update gets 409), one client per replica. Time is
//! Tokio's paused clock, so lease expiry is measured exactly and nothing
//! sleeps in real time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fast_sandbox_controller::leader::{self, Elector, LeaseConfig, Shutdown};
use futures::FutureExt;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "fast-sandbox-system";

/// The API server's one Lease.
#[derive(Debug, Default)]
struct LeaseServer {
    lease: Option<Value>,
    version: u64,
    /// Replicas whose requests fail (500), as if cut off from the API.
    cut_off: HashSet<String>,
    /// When each holder last wrote the Lease (the paused clock).
    written: Vec<(String, Instant)>,
}

type Shared = Arc<Mutex<LeaseServer>>;

fn lock(server: &Shared) -> std::sync::MutexGuard<'_, LeaseServer> {
    server.lock().unwrap_or_else(PoisonError::into_inner)
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

/// Answers one request of `replica` against the Lease.
fn answer(
    server: &Shared,
    replica: &str,
    method: &Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let mut s = lock(server);
    if s.cut_off.contains(replica) {
        return (500, status(500, "InternalError"));
    }
    assert!(
        path.starts_with(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
        )),
        "{method} {path}"
    );
    let current_version = s.version.to_string();
    let store = |s: &mut LeaseServer, mut lease: Value| {
        s.version += 1;
        lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
        let holder = lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        s.written.push((holder, Instant::now()));
        s.lease = Some(lease.clone());
        lease
    };
    match (method.as_str(), &s.lease) {
        ("GET", None) => (404, status(404, "NotFound")),
        ("GET", Some(lease)) => (200, lease.clone()),
        ("POST", Some(_)) => (409, status(409, "AlreadyExists")),
        ("POST", None) => (201, store(&mut s, body)),
        ("PUT", Some(_)) if body["metadata"]["resourceVersion"] == json!(current_version) => {
            (200, store(&mut s, body))
        }
        ("PUT", _) => (409, status(409, "Conflict")),
        (m, _) => panic!("unexpected {m} {path}"),
    }
}

/// Serves `replica`'s client until it is dropped.
async fn serve(server: Shared, replica: String, mut handle: Handle) {
    handle.allow(u64::MAX);
    while let Some((request, respond)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let bytes = request.into_body().collect_bytes().await.expect("a body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON")
        };
        let (code, answer) = answer(&server, &replica, &method, &path, body);
        respond.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&answer).expect("JSON")))
                .expect("a response"),
        );
    }
}

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig::new(NS, identity)
}

/// A replica: its elector running, and whether it leads.
struct Replica {
    leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Elector>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn start(server: &Shared, identity: &str) -> Replica {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(serve(server.clone(), identity.to_owned(), handle));
    let client = Client::new(service, NS);
    let elector = Elector::new(client, config(identity)).expect("a valid config");
    let (tx, leading) = watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(elector.run(tx, stopped.map(|_| ())));
    Replica {
        leading,
        task,
        stop: Some(stop),
    }
}

/// Waits (on the paused clock, bounded) until `replica` leads or not.
async fn until(replica: &mut Replica, leads: bool) -> Instant {
    tokio::time::timeout(
        Duration::from_secs(120),
        replica.leading.wait_for(|l| *l == leads),
    )
    .await
    .expect("leadership settled in time")
    .expect("the elector runs");
    Instant::now()
}

fn last_write_by(server: &Shared, holder: &str) -> Instant {
    lock(server)
        .written
        .iter()
        .rev()
        .find(|(h, _)| h == holder)
        .map(|(_, at)| *at)
        .expect("a write by the holder")
}

fn holder(server: &Shared) -> (String, i64) {
    let s = lock(server);
    let spec = &s.lease.as_ref().expect("a lease")["spec"];
    (
        spec["holderIdentity"].as_str().unwrap_or("").to_owned(),
        spec["leaseTransitions"].as_i64().unwrap_or(-1),
    )
}

/// Replica a takes the lease, then b starts: three lease durations
/// later a still leads (it renews) and b waits.
async fn a_leads_then_b_joins(server: &Shared) -> (Replica, Replica) {
    let mut a = start(server, "a");
    until(&mut a, true).await;
    let b = start(server, "b");
    tokio::time::sleep(config("a").lease_duration * 3).await;
    assert!(*a.leading.borrow() && !*b.leading.borrow());
    assert_eq!(holder(server), ("a".to_owned(), 0));
    (a, b)
}

#[tokio::test(start_paused = true)]
/// b takes over no sooner than the lease duration after a's last renewal
/// (b's clock), and no later than two attempts after that.
async fn one_leader_and_failover_within_the_lease_duration_when_it_stops_renewing() {
    let server = Shared::default();
    let lease = config("a").lease_duration;
    let retry = config("a").retry_period;
    let (a, mut b) = a_leads_then_b_joins(&server).await;
    // a crashes: no release, no more renewals.
    a.task.abort();
    let _ = a.task.await;
    let last_renewal = last_write_by(&server, "a");
    let took_over = until(&mut b, true).await;
    let after = took_over - last_renewal;
    assert!(
        after >= lease && after <= lease + 2 * retry,
        "b took over {after:?} after a's last renewal (lease {lease:?})"
    );
    assert_eq!(holder(&server), ("b".to_owned(), 1));
    drop(b.stop.take());
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_from_the_api_steps_down_before_another_takes_over() {
    let server = Shared::default();
    let cfg = config("a");
    let (mut a, mut b) = a_leads_then_b_joins(&server).await;
    lock(&server).cut_off.insert("a".to_owned());
    let last_renewal = last_write_by(&server, "a");
    let stepped_down = until(&mut a, false).await;
    let took_over = until(&mut b, true).await;
    assert!(
        stepped_down - last_renewal <= cfg.renew_deadline + cfg.retry_period,
        "a led {:?} without renewing",
        stepped_down - last_renewal
    );
    assert!(
        stepped_down < took_over,
        "two leaders: b took over before a stepped down"
    );
    assert!(took_over - last_renewal >= cfg.lease_duration);
    // a, back in touch, follows.
    lock(&server).cut_off.clear();
    tokio::time::sleep(cfg.lease_duration).await;
    assert!(!*a.leading.borrow() && *b.leading.borrow());
    assert_eq!(holder(&server), ("b".to_owned(), 1));
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_the_next_attempt() {
    let server = Shared::default();
    let cfg = config("a");
    let (mut a, mut b) = a_leads_then_b_joins(&server).await;
    let _ = a.stop.take().expect("running").send(());
    let mut elector = a.task.await.expect("the elector stopped");
    assert!(elector.is_leader());
    elector.release().await.expect("released");
    let released = Instant::now();
    let took_over = until(&mut b, true).await;
    assert!(
        took_over - released <= cfg.retry_period,
        "b took a released lease after {:?}",
        took_over - released
    );
    assert_eq!(holder(&server), ("b".to_owned(), 1));
}

#[tokio::test(start_paused = true)]
async fn the_leaders_work_runs_only_while_it_leads() {
    let (tx, rx) = watch::channel(false);
    let (end, ended) = tokio::sync::oneshot::channel::<()>();
    let shutdown: Shutdown = ended.map(|_| ()).boxed().shared();
    // (started, stopped) runs of the work.
    let (runs, mut seen) = watch::channel((0u32, 0u32));
    let runs = Arc::new(runs);
    let counted = runs.clone();
    let leading = tokio::spawn(leader::lead(rx, shutdown, move |stop| {
        let counted = counted.clone();
        async move {
            counted.send_modify(|r| r.0 += 1);
            stop.await;
            counted.send_modify(|r| r.1 += 1);
        }
    }));
    let settled = |expected: (u32, u32)| {
        let mut seen = seen.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|r| *r == expected))
                .await
                .unwrap_or_else(|_| panic!("work runs {expected:?}"))
                .expect("counted");
        }
    };
    tx.send(true).expect("lead");
    settled((1, 0)).await;
    tx.send(false).expect("lose");
    settled((1, 1)).await;
    tx.send(true).expect("lead again");
    settled((2, 1)).await;
    end.send(()).expect("shut down");
    leading.await.expect("lead returns on shutdown");
    assert_eq!(*seen.borrow_and_update(), (2, 2));
}
