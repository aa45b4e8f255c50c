//! A raw fake upstream for byte-level tests: it records every call's gRPC
//! path and request message bytes, and answers each path with scripted
//! message bytes (a stream of them for server-streaming calls). It serves
//! any path, known to the CRI schema or not, and never decodes a message.
//! Also: protobuf wire helpers to build messages carrying field numbers no
//! schema knows, and to read messages back field by field.

use std::{
    collections::HashMap,
    convert::Infallible,
    path::Path,
    sync::{Arc, Mutex},
};

use fast_sandbox_shim::slots::SlotSource;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::{
    bytes::BufMut,
    encoding::{decode_key, decode_varint, encode_key, encode_varint, skip_field, WireType},
};
use tokio::sync::oneshot;
use tonic::{body::Body, codegen::http, transport::Channel, Request, Response, Status};

use super::{listen, raw_call, slots::FakeSlots, upstream_config, RawCodec, Served, ShimUnderTest};

/// How the fake answers one path: message bytes computed from the request's.
type Unary = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

#[derive(Clone)]
enum Reply {
    Unary(Unary),
    Stream(Vec<Vec<u8>>),
}

/// What the fake answers, and what it received.
#[derive(Default)]
pub struct Script {
    replies: Mutex<HashMap<String, Reply>>,
    calls: Mutex<Vec<(String, Vec<u8>)>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("calls", &self.calls.lock().expect("lock").len())
            .finish_non_exhaustive()
    }
}

impl Script {
    /// `path` answers `message`, whatever the request.
    pub fn answer(&self, path: &str, message: Vec<u8>) {
        self.answer_with(path, move |_| message.clone());
    }

    /// `path` answers what `reply` makes of the request's bytes.
    pub fn answer_with(
        &self,
        path: &str,
        reply: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) {
        self.set(path, Reply::Unary(Arc::new(reply)));
    }

    /// `path` streams `messages`, then ends the stream.
    pub fn stream(&self, path: &str, messages: Vec<Vec<u8>>) {
        self.set(path, Reply::Stream(messages));
    }

    fn set(&self, path: &str, reply: Reply) {
        self.replies
            .lock()
            .expect("lock")
            .insert(path.to_owned(), reply);
    }

    /// The request messages `path` received, in order.
    pub fn requests(&self, path: &str) -> Vec<Vec<u8>> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, bytes)| bytes.clone())
            .collect()
    }

    /// The last request message `path` received.
    pub fn last(&self, path: &str) -> Vec<u8> {
        self.requests(path)
            .pop()
            .unwrap_or_else(|| panic!("upstream received no {path}"))
    }

    async fn serve(self: Arc<Self>, request: http::Request<Incoming>) -> http::Response<Body> {
        let path = request.uri().path().to_owned();
        let reply = self.replies.lock().expect("lock").get(&path).cloned();
        let mut grpc = tonic::server::Grpc::new(RawCodec);
        let record = {
            let script = Arc::clone(&self);
            let path = path.clone();
            move |bytes: &[u8]| {
                script
                    .calls
                    .lock()
                    .expect("lock")
                    .push((path.clone(), bytes.to_vec()));
            }
        };
        match reply {
            Some(Reply::Stream(messages)) => {
                let service = tower::service_fn(move |request: Request<Vec<u8>>| {
                    record(request.get_ref());
                    let items = futures::stream::iter(messages.clone().into_iter().map(Ok));
                    async move { Ok::<_, Status>(Response::new(items)) }
                });
                grpc.server_streaming(service, request).await
            }
            reply => {
                let service = tower::service_fn(move |request: Request<Vec<u8>>| {
                    record(request.get_ref());
                    let answer = match &reply {
                        Some(Reply::Unary(reply)) => Ok(Response::new(reply(request.get_ref()))),
                        _ => Err(Status::unimplemented(format!("not scripted: {path}"))),
                    };
                    async move { answer }
                });
                grpc.unary(service, request).await
            }
        }
    }
}

/// Serves `script` as upstream on `path`, on plain hyper so that every
/// path reaches it.
pub fn start_scripted(path: &Path, script: Arc<Script>) -> Served {
    let listener = listen(path).into_inner();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = accepted.expect("accept");
                    let script = Arc::clone(&script);
                    let service = hyper::service::service_fn(move |request| {
                        let script = Arc::clone(&script);
                        async move { Ok::<_, Infallible>(script.serve(request).await) }
                    });
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                _ = &mut stopped => break,
            }
        }
    });
    Served::new(stop, join)
}

/// A scripted upstream and two shims in front of it: one with slots (the
/// handlers of [`super::slots::handlers`], slots from a [`FakeSlots`]),
/// one plain.
#[derive(Debug)]
pub struct ScriptedRig {
    pub dir: tempfile::TempDir,
    pub script: Arc<Script>,
    pub slots: Arc<FakeSlots>,
    pub upstream: Served,
    pub shim: ShimUnderTest,
    pub plain: ShimUnderTest,
}

impl ScriptedRig {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream_path = dir.path().join("upstream.sock");
        let script = Arc::new(Script::default());
        let upstream = start_scripted(&upstream_path, Arc::clone(&script));
        let slots = Arc::new(FakeSlots::default());
        let (shim, plain) = super::slots::start_shims(
            dir.path(),
            &upstream_config(&upstream_path),
            Arc::clone(&slots) as Arc<dyn SlotSource>,
        )
        .await;
        ScriptedRig {
            dir,
            script,
            slots,
            upstream,
            shim,
            plain,
        }
    }

    /// Both shims, named for assertion messages.
    pub fn shims(&self) -> [(&'static str, Channel); 2] {
        [
            ("with slots", self.shim.channel()),
            ("plain", self.plain.channel()),
        ]
    }

    /// Calls `path` with `request` through `channel`: the answer's bytes,
    /// after checking that upstream received `request`'s very bytes.
    pub async fn call(&self, channel: Channel, path: &'static str, request: &[u8]) -> Vec<u8> {
        let answer = raw_call(channel, path, request.to_vec())
            .await
            .unwrap_or_else(|status| panic!("{path}: {status:?}"));
        assert_eq!(
            self.script.last(path),
            request,
            "{path}: upstream received other bytes than sent"
        );
        answer
    }

    pub async fn stop(self) {
        super::slots::stop_shims(self.shim, self.plain).await;
        self.upstream.stop().await;
    }
}

/// Fields numbered `tag`, `tag + 1`, `tag + 2` (and `tag + 3`) that no CRI
/// message has, one of each wire type: length-delimited, varint, 64-bit
/// (and 32-bit).
pub fn unknown(tag: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    let text = format!("unknown-{tag}");
    encode_varint(text.len() as u64, &mut out);
    out.put_slice(text.as_bytes());
    encode_key(tag + 1, WireType::Varint, &mut out);
    encode_varint(u64::from(tag) * 1_000_003, &mut out);
    encode_key(tag + 2, WireType::SixtyFourBit, &mut out);
    out.put_u64_le(u64::from(tag) << 40 | 0xfeed);
    encode_key(tag + 3, WireType::ThirtyTwoBit, &mut out);
    out.put_u32_le(tag);
    out
}

/// `message` encoded, then [`unknown`]`(tag)`.
pub fn with_unknown(message: &impl prost::Message, tag: u32) -> Vec<u8> {
    let mut out = message.encode_to_vec();
    out.extend(unknown(tag));
    out
}

/// `message` with length-delimited field `number` holding `payload`
/// appended (a sub-message the typed value left out, unknown fields in it).
pub fn nest(mut message: Vec<u8>, number: u32, payload: &[u8]) -> Vec<u8> {
    encode_key(number, WireType::LengthDelimited, &mut message);
    encode_varint(payload.len() as u64, &mut message);
    message.put_slice(payload);
    message
}

/// One field occurrence of an encoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireField {
    pub number: u32,
    /// Key and value as encoded.
    pub raw: Vec<u8>,
    /// The value of a length-delimited field.
    pub payload: Option<Vec<u8>>,
}

/// The field occurrences of `message`, in order.
pub fn wire_fields(message: &[u8]) -> Vec<WireField> {
    let mut buf = message;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = message.len() - buf.len();
        let (number, wire_type) = decode_key(&mut buf).expect("a field key");
        let payload = if wire_type == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut buf).expect("a length")).expect("len");
            let (payload, rest) = buf.split_at(len);
            buf = rest;
            Some(payload.to_vec())
        } else {
            skip_field(wire_type, number, &mut buf, Default::default()).expect("a field");
            None
        };
        out.push(WireField {
            number,
            raw: message[start..message.len() - buf.len()].to_vec(),
            payload,
        });
    }
    out
}

/// The payloads of field `number` of `message`, in order.
pub fn payloads(message: &[u8], number: u32) -> Vec<Vec<u8>> {
    wire_fields(message)
        .into_iter()
        .filter(|f| f.number == number)
        .filter_map(|f| f.payload)
        .collect()
}

/// The payload of singular field `number` of `message`.
pub fn payload(message: &[u8], number: u32) -> Vec<u8> {
    let mut all = payloads(message, number);
    assert_eq!(all.len(), 1, "field {number} occurs once");
    all.remove(0)
}

/// The occurrences of `message` whose numbers are not in `except`, as
/// encoded: what must reach the other side byte for byte.
pub fn untouched(message: &[u8], except: &[u32]) -> Vec<Vec<u8>> {
    wire_fields(message)
        .into_iter()
        .filter(|f| !except.contains(&f.number))
        .map(|f| f.raw)
        .collect()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A server-streaming call of `path` through `channel` with message bytes
/// as they are: every message of the answer.
pub async fn raw_stream(
    channel: Channel,
    path: &'static str,
    payload: Vec<u8>,
) -> Result<Vec<Vec<u8>>, Status> {
    use futures::TryStreamExt as _;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.server_streaming(Request::new(payload), path, RawCodec)
        .await?
        .into_inner()
        .try_collect()
        .await
}
