//! The node agent: fast-sandbox's `NodeAgent` gRPC API
//! (`proto/proto/nodeagent.proto`) on its own TCP address, for the
//! controller.
//!
//! - `GetNodeStatus`: pools (free, desired, claimed per exposed handler and
//!   shape), the images in containerd's store, health ([`crate::health`]:
//!   `ready` only once start-up recovery finished and while containerd
//!   answers `Version`), and a generation.
//! - `WatchNodeStatus`: the status at once, then again after every change.
//!   Changes come from [`PoolManager::subscribe`] (every claim, release,
//!   refill, trim and size change), from the image poller and from health
//!   changes; a
//!   `tokio::sync::watch` keeps only the latest, so a slow reader gets the
//!   newest state rather than a backlog.
//! - `SetPoolSize`: a pool's desired free slots, the pool found by its
//!   exposed handler and shape key.
//!
//! The agent serves mutual TLS ([`fast_sandbox_proto::tls`]): its certificate names this node
//! and the controller must present a client certificate from the same CA,
//! or the handshake fails before any handler runs. When a token file is
//! configured (required with `insecure`, development only), every call must
//! also carry `authorization: Bearer <token>` equal to its content
//! (compared in constant time); anything else is answered `Unauthenticated`.
//! `SetPoolSize` keeps the sum of all pools' sizes within `max_slots`.

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use fast_sandbox_proto::{
    cri::{image_service_client::ImageServiceClient, ListImagesRequest},
    nodeagent::{
        node_agent_server::{NodeAgent, NodeAgentServer},
        CachedImage, GetNodeStatusRequest, Health, NodeStatus, PoolStatus, SetPoolSizeRequest,
        SetPoolSizeResponse, WatchNodeStatusRequest,
    },
    shape::ShapeKey,
};
use fast_sandbox_shim::slots::{SeccompShape, Shape};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt as _};
use tonic::{transport::Channel, Request, Response, Status};

pub use fast_sandbox_proto::tls::ServerTls;

use crate::{
    health::{self, HealthState},
    pool::{PoolManager, MAX_POOL_SIZE},
};

/// A bearer token, never printed.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token could not be read.
pub use fast_sandbox_proto::token::TokenFileError as TokenError;

impl Token {
    /// The token in `path`, without surrounding whitespace (a Secret
    /// created with `echo` ends in a newline).
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        fast_sandbox_proto::token::read_token_file(path).map(|t| Token(t.into()))
    }

    /// A token from bytes (tests, and callers that hold it already).
    pub fn new(token: impl AsRef<[u8]>) -> Token {
        Token(token.as_ref().into())
    }

    /// The `authorization` header value that carries this token.
    pub fn bearer(&self) -> String {
        format!(
            "{}{}",
            fast_sandbox_proto::token::BEARER_PREFIX,
            String::from_utf8_lossy(&self.0)
        )
    }

    /// Whether `presented` is this token, in time that depends only on the
    /// token's length, never on where the first difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mut diff = u8::from(presented.len() != self.0.len());
        for (i, b) in self.0.iter().enumerate() {
            diff |= b ^ presented.get(i).copied().unwrap_or(0);
        }
        std::hint::black_box(diff) == 0
    }
}

/// Checks a request's `authorization: Bearer <token>`.
fn authenticate<T>(token: &Token, request: &Request<T>) -> Result<(), Status> {
    let presented = request.metadata().get("authorization").and_then(|v| {
        v.as_bytes()
            .strip_prefix(fast_sandbox_proto::token::BEARER_PREFIX.as_bytes())
    });
    match presented {
        Some(p) if token.matches(p) => Ok(()),
        _ => Err(Status::unauthenticated(
            "a valid `authorization: Bearer <token>` is required",
        )),
    }
}

/// The agent's settings, resolved from `[agent]`.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub address: SocketAddr,
    /// A bearer token every call must carry too.
    pub token_file: Option<PathBuf>,
    /// This node's credential; `None`: cleartext (`insecure`).
    pub tls: Option<fast_sandbox_proto::tls::TlsFiles>,
    /// Most free slots all pools together may be set to.
    pub max_slots: usize,
    /// The Kubernetes node name this node reports.
    pub node_name: String,
    /// How often the image list is re-read from upstream.
    pub image_interval: Duration,
}

/// The pool shape key as the controller derives it from a pod: the one
/// encoding both ends share ([`fast_sandbox_proto::shape::ShapeKey`]).
pub fn shape_key(shape: &Shape) -> String {
    let localhost;
    let seccomp = match &shape.seccomp {
        SeccompShape::Unconfined => "unconfined",
        SeccompShape::RuntimeDefault => "runtime-default",
        SeccompShape::Localhost(p) => {
            localhost = format!("localhost/{p}");
            localhost.as_str()
        }
    };
    ShapeKey {
        seccomp,
        run_as_user: shape.run_as_user,
        run_as_group: shape.run_as_group,
        supplemental_groups: &shape.supplemental_groups,
        selinux: shape
            .selinux
            .as_ref()
            .map(|se| [&*se.user, &*se.role, &*se.r#type, &*se.level]),
    }
    .encode()
}

/// What the image poller last saw.
#[derive(Debug, Clone, Default, PartialEq)]
struct Images {
    list: Vec<CachedImage>,
    /// `None` until the first listing; then whether it worked.
    reachable: Option<bool>,
    error: String,
    /// Bumped on every change of the fields above.
    generation: u64,
}

/// The `NodeAgent` service.
#[derive(Debug, Clone)]
pub struct Agent {
    pools: Option<Arc<PoolManager>>,
    images: watch::Receiver<Images>,
    health: watch::Receiver<HealthState>,
    node_name: String,
    boot_id: String,
    stopped: watch::Receiver<bool>,
    max_slots: usize,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Agent {
    fn status(&self) -> NodeStatus {
        let pool_generation = self.pools.as_ref().map_or(0, |p| *p.subscribe().borrow());
        let images = self.images.borrow().clone();
        let (readiness, health_generation) = {
            let health = self.health.borrow();
            (health.readiness(), health.generation)
        };
        let pools = self
            .pools
            .as_ref()
            .map(|m| {
                m.specs()
                    .iter()
                    .zip(m.stats())
                    .map(|(spec, stats)| PoolStatus {
                        name: stats.name,
                        handler: stats.exposed_handler,
                        upstream_handler: stats.upstream_handler,
                        shape: shape_key(&spec.key.shape),
                        free: count(stats.free),
                        desired: count(stats.desired),
                        claimed: count(stats.claimed),
                    })
                    .collect()
            })
            .unwrap_or_default();
        NodeStatus {
            node_name: self.node_name.clone(),
            // Every part only grows, so their sum does.
            generation: pool_generation
                .wrapping_add(images.generation)
                .wrapping_add(health_generation),
            boot_id: self.boot_id.clone(),
            pools,
            health: Some(health_message(readiness, &images)),
            images: images.list,
            observed_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// The agent's `Health`: readiness from [`crate::health`], with the image
/// listing's error added when that is all that fails.
fn health_message(readiness: health::Readiness, images: &Images) -> Health {
    let message = match (readiness.message.is_empty(), images.error.is_empty()) {
        (_, true) => readiness.message,
        (true, false) => images.error.clone(),
        (false, false) => format!("{}; {}", readiness.message, images.error),
    };
    Health {
        ready: readiness.ready,
        upstream_reachable: readiness.upstream_reachable,
        message,
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<NodeStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl NodeAgent for Agent {
    async fn get_node_status(
        &self,
        _request: Request<GetNodeStatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    type WatchNodeStatusStream = StatusStream;

    async fn watch_node_status(
        &self,
        _request: Request<WatchNodeStatusRequest>,
    ) -> Result<Response<Self::WatchNodeStatusStream>, Status> {
        // Capacity 1: while the reader is slow, changes pile up in the
        // watches (which keep only the latest), not here.
        let (tx, rx) = mpsc::channel(1);
        let agent = self.clone();
        let mut pools = self.pools.as_ref().map(|p| p.subscribe());
        let mut images = self.images.clone();
        let mut health = self.health.clone();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            loop {
                if let Some(p) = &mut pools {
                    p.mark_unchanged();
                }
                images.mark_unchanged();
                health.mark_unchanged();
                if tx.send(Ok(agent.status())).await.is_err() {
                    return;
                }
                let pools_changed = async {
                    match &mut pools {
                        Some(p) => p.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = pools_changed => if r.is_err() { return },
                    r = images.changed() => if r.is_err() { return },
                    r = health.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn set_pool_size(
        &self,
        request: Request<SetPoolSizeRequest>,
    ) -> Result<Response<SetPoolSizeResponse>, Status> {
        let req = request.into_inner();
        let size = usize::try_from(req.size).unwrap_or(usize::MAX);
        if size > MAX_POOL_SIZE {
            return Err(Status::invalid_argument(format!(
                "size: {} is more than the maximum of {MAX_POOL_SIZE}",
                req.size
            )));
        }
        let manager = self
            .pools
            .as_ref()
            .ok_or_else(|| Status::not_found("this node has no warm pools configured"))?;
        let pool = manager
            .specs()
            .iter()
            .find(|s| s.exposed_handler == req.handler && shape_key(&s.key.shape) == req.shape)
            .map(|s| s.name.clone())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no pool for handler {:?} and shape {:?} on this node",
                    req.handler, req.shape
                ))
            })?;
        let others: usize = manager
            .specs()
            .iter()
            .zip(manager.stats())
            .filter(|(spec, _)| spec.name != pool)
            .map(|(_, stats)| stats.desired)
            .sum();
        if others.saturating_add(size) > self.max_slots {
            return Err(Status::invalid_argument(format!(
                "size: {size} for pool {pool:?} would make this node's pools hold {} free slots \
                 in all, more than agent.max_slots ({})",
                others.saturating_add(size),
                self.max_slots
            )));
        }
        manager.set_size(&pool, size);
        tracing::info!(pool = %pool, size, "pool size set by the controller");
        let generation = self.status().generation;
        Ok(Response::new(SetPoolSizeResponse { pool, generation }))
    }
}

/// Lists upstream images every `interval` until `stopped`; publishes a new
/// [`Images`] only when something changed.
async fn poll_images(
    channel: Channel,
    interval: Duration,
    timeout: Duration,
    tx: watch::Sender<Images>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut client = ImageServiceClient::new(channel);
    loop {
        let mut request = Request::new(ListImagesRequest { filter: None });
        request.set_timeout(timeout);
        let (list, reachable, error) = match client.list_images(request).await {
            Ok(r) => {
                let mut list: Vec<CachedImage> = r
                    .into_inner()
                    .images
                    .into_iter()
                    .map(|i| CachedImage {
                        repo_tags: i.repo_tags,
                        repo_digests: i.repo_digests,
                        size_bytes: i.size,
                    })
                    .collect();
                list.sort_by(|a, b| {
                    (&a.repo_digests, &a.repo_tags).cmp(&(&b.repo_digests, &b.repo_tags))
                });
                (Some(list), true, String::new())
            }
            Err(e) => (
                None,
                false,
                format!("listing images upstream: {}", e.message()),
            ),
        };
        tx.send_if_modified(|current| {
            let list = list.unwrap_or_else(|| current.list.clone());
            if current.list == list
                && current.reachable == Some(reachable)
                && current.error == error
            {
                return false;
            }
            current.list = list;
            current.reachable = Some(reachable);
            current.error = error;
            current.generation = current.generation.wrapping_add(1);
            true
        });
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// A random id telling this process's generations from a previous one's
/// (the process id and the time when the kernel gives no randomness: it
/// only has to differ from the previous run's).
fn boot_id() -> String {
    crate::random::hex(8).unwrap_or_else(|_| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{:016x}", now as u64 ^ u64::from(std::process::id()))
    })
}

/// What [`bind`] serves.
#[derive(Debug)]
pub struct AgentParts {
    /// The warm pools, if any are configured.
    pub pools: Option<Arc<PoolManager>>,
    /// A CRI channel to upstream, for `ListImages`.
    pub upstream: Channel,
    /// Deadline of one `ListImages`.
    pub upstream_timeout: Duration,
    /// A bearer token every call must carry too.
    pub token: Option<Token>,
    /// Mutual TLS; `None`: cleartext (development only).
    pub tls: Option<ServerTls>,
    /// Most free slots all pools together may be set to.
    pub max_slots: usize,
    pub node_name: String,
    pub image_interval: Duration,
    /// Readiness: recovery finished, upstream reachable.
    pub health: health::Health,
}

/// How binding the agent's address is retried: a node's address may not be
/// assigned yet when the node plugin starts (`Cannot assign requested
/// address`), or a previous process may still hold the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindRetry {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The first wait; each next one doubles, up to `max`.
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BindRetry {
    /// 20 tries over about 80 s.
    fn default() -> Self {
        BindRetry {
            attempts: 20,
            initial: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }
}

/// Whether a failed bind may work later.
fn bind_may_succeed_later(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
    )
}

/// Binds `addr` with `bind`, retrying with `retry`'s backoff while the
/// error may go away (address not assigned yet, port still in use); any
/// other error, or the last try's, is returned at once.
async fn bind_listener<L, F, Fut>(
    addr: SocketAddr,
    retry: BindRetry,
    mut bind: F,
) -> anyhow::Result<L>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = std::io::Result<L>>,
{
    let mut delay = retry.initial;
    let mut attempt = 1;
    loop {
        match bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(error) if bind_may_succeed_later(&error) && attempt < retry.attempts => {
                tracing::warn!(
                    %addr,
                    %error,
                    attempt,
                    of = retry.attempts,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "cannot bind the node agent's address yet; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(retry.max);
                attempt += 1;
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "binding the node agent on {addr} (try {attempt} of {})",
                        retry.attempts
                    )
                })
            }
        }
    }
}

/// Binds `addr` (retrying while it is not assigned yet, [`BindRetry`]) and
/// serves `NodeAgent` until `shutdown` resolves. Returns the bound address
/// (useful with port 0) and the serving future.
pub async fn bind(
    addr: SocketAddr,
    parts: AgentParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = anyhow::Result<()>>)> {
    let listener = bind_listener(addr, BindRetry::default(), tokio::net::TcpListener::bind).await?;
    let bound = listener.local_addr().context("the agent's bound address")?;
    let (stop_tx, stopped) = watch::channel(false);
    let (images_tx, images) = watch::channel(Images::default());
    tokio::spawn(poll_images(
        parts.upstream,
        parts.image_interval,
        parts.upstream_timeout,
        images_tx,
        stopped.clone(),
    ));
    let agent = Agent {
        pools: parts.pools,
        images,
        health: parts.health.subscribe(),
        node_name: parts.node_name,
        boot_id: boot_id(),
        stopped,
        max_slots: parts.max_slots,
    };
    let token = parts.token;
    let service = NodeAgentServer::with_interceptor(agent, move |request: Request<()>| {
        if let Some(token) = &token {
            authenticate(token, &request)?;
        }
        Ok(request)
    });
    let shutdown = async move {
        shutdown.await;
        // Ends the watch streams, or the server would wait for them.
        let _ = stop_tx.send(true);
    };
    let tls = parts.tls;
    let server = async move {
        let server = tonic::transport::Server::builder().add_service(service);
        match tls {
            Some(tls) => {
                let incoming = fast_sandbox_proto::tls::accept(listener, tls, "node agent");
                let incoming = ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
        .context("serving the node agent")
    };
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fast_sandbox_shim::slots::SeLinuxShape;

    #[test]
    fn token_compare() {
        let t = Token::new("s3cret");
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b"S3cret"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert_eq!(t.bearer(), "Bearer s3cret");
    }

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").expect("write");
        assert!(Token::from_file(&path).expect("token").matches(b"abc"));
        std::fs::write(&path, " \n").expect("write");
        let err = Token::from_file(&path).expect_err("empty").to_string();
        assert!(
            err.contains("empty") && err.contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, "a b").expect("write");
        assert!(matches!(
            Token::from_file(&path),
            Err(TokenError::Invalid {
                problem: fast_sandbox_proto::token::TokenProblem::NotAHeaderValue,
                ..
            })
        ));
        let missing = dir.path().join("missing");
        let err = Token::from_file(&missing).expect_err("missing").to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn authentication_needs_the_exact_bearer_token() {
        let token = Token::new("tok");
        let with = |value: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = value {
                r.metadata_mut()
                    .insert("authorization", v.parse().expect("header value"));
            }
            authenticate(&token, &r).map_err(|s| s.code())
        };
        assert_eq!(with(Some("Bearer tok")), Ok(()));
        for bad in [
            None,
            Some("Bearer tok2"),
            Some("tok"),
            Some("Basic tok"),
            Some("Bearer "),
        ] {
            assert_eq!(with(bad), Err(tonic::Code::Unauthenticated), "{bad:?}");
        }
    }

    type Binding = Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpListener>>>>;

    /// A binder that fails with `errors` first, then binds 127.0.0.1:0.
    fn flaky(
        errors: Vec<std::io::ErrorKind>,
    ) -> (
        Arc<std::sync::Mutex<u32>>,
        impl FnMut(SocketAddr) -> Binding,
    ) {
        let calls = Arc::new(std::sync::Mutex::new(0u32));
        let counted = calls.clone();
        let mut errors = errors.into_iter();
        let bind = move |_addr: SocketAddr| {
            *counted.lock().expect("lock") += 1;
            let next = errors.next();
            Box::pin(async move {
                match next {
                    Some(kind) => Err(std::io::Error::from(kind)),
                    None => tokio::net::TcpListener::bind("127.0.0.1:0").await,
                }
            }) as Binding
        };
        (calls, bind)
    }

    const FAST: BindRetry = BindRetry {
        attempts: 4,
        initial: Duration::from_millis(1),
        max: Duration::from_millis(4),
    };

    #[tokio::test]
    async fn binding_waits_for_the_address_to_be_assigned() {
        use std::io::ErrorKind::{AddrInUse, AddrNotAvailable};
        let addr: SocketAddr = "10.1.2.3:9465".parse().expect("addr");
        let (calls, bind) = flaky(vec![AddrNotAvailable, AddrInUse]);
        let listener = bind_listener(addr, FAST, bind)
            .await
            .expect("bound on the 3rd try");
        assert!(listener.local_addr().expect("addr").ip().is_loopback());
        assert_eq!(*calls.lock().expect("lock"), 3);

        // Bounded: after `attempts` tries the last error is returned, naming
        // the address and the tries.
        let (calls, bind) = flaky(vec![AddrNotAvailable; 10]);
        let error = bind_listener(addr, FAST, bind).await.expect_err("gives up");
        assert_eq!(*calls.lock().expect("lock"), 4);
        let text = format!("{error:#}");
        assert!(
            text.contains("10.1.2.3:9465") && text.contains("try 4 of 4"),
            "{text}"
        );

        // An error that cannot go away is not retried.
        let (calls, bind) = flaky(vec![std::io::ErrorKind::PermissionDenied]);
        assert!(bind_listener(addr, FAST, bind).await.is_err());
        assert_eq!(*calls.lock().expect("lock"), 1);
    }

    #[test]
    fn shape_keys_use_the_controllers_encoding() {
        assert_eq!(shape_key(&Shape::default()), "seccomp=unconfined");
        let shape = Shape {
            seccomp: SeccompShape::Localhost("p.json".into()),
            run_as_user: Some(1000),
            run_as_group: Some(1001),
            supplemental_groups: vec![5, 6],
            selinux: Some(SeLinuxShape {
                user: "u".into(),
                role: "r".into(),
                r#type: "t".into(),
                level: "l".into(),
            }),
        };
        assert_eq!(
            shape_key(&shape),
            "seccomp=localhost/p.json;uid=1000;gid=1001;groups=5,6;selinux=u:r:t:l"
        );
        let rd = Shape {
            seccomp: SeccompShape::RuntimeDefault,
            ..Shape::default()
        };
        assert_eq!(shape_key(&rd), "seccomp=runtime-default");
    }
}
