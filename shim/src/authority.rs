//! Any `:authority` is accepted, as containerd accepts it.
//!
//! gRPC clients built on kubelet's remote runtime client before kubernetes
//! PR #123463 (kubelet, crictl and critest of 1.26 and others), grpc-python
//! from 1.57, grpc-java and grpcurl send the unix socket's path (or a
//! %-encoded path) as the HTTP/2 `:authority`. That is no URI authority, and
//! the `h2` server under the shim refuses such a request as malformed
//! (RST_STREAM PROTOCOL_ERROR; hyperium/h2#487) before any handler sees it.
//! containerd's Go gRPC server does not look at `:authority` at all.
//!
//! [`Normalized`] sits between the accepted socket and the HTTP/2 server and
//! reads the client's frames. Every header block is decoded (HPACK is
//! stateful, so all of them are) and, while each names a valid authority or
//! none, passed on byte for byte. The first block with an authority `h2`
//! would refuse switches the connection to re-encoding: from then on every
//! block is re-encoded by our own HPACK encoder with such an authority
//! replaced by `localhost` (what gRPC-Go itself sends for unix targets). The
//! first re-encoded block starts with two dynamic table size updates (0, then
//! the default 4096), so the server's decoder drops the entries of the blocks
//! passed on before and its table matches our encoder's.
//!
//! Decoding is the normalizer's whole cost, so a block that leaves the
//! decoder's dynamic table as it was (no literal with indexing, no size
//! update: what gRPC clients send for a method they called before) is
//! decoded once: while the table stays the same, the same bytes decode to
//! the same headers, and the earlier outcome is reused. Any block that
//! changes the table forgets those outcomes.
//!
//! Nothing else changes: other frames pass unchanged, and input that cannot
//! be parsed (a broken HPACK block, a frame sequence HTTP/2 forbids) is
//! logged once per connection at WARN and handed to the server as it came,
//! which then answers it as HTTP/2 says.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hpack_scan::TableEffect;

/// The HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame the server accepts: HTTP/2's default
/// `SETTINGS_MAX_FRAME_SIZE`, which the shim's server keeps.
const MAX_FRAME_SIZE: usize = 16_384;
/// HPACK's default dynamic table size, which the server keeps.
const TABLE_SIZE: usize = 4_096;
/// What replaces an authority the server would refuse.
const REPLACEMENT: &[u8] = b"localhost";
/// How much to read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Decoded blocks kept per connection for reuse: more than the distinct
/// calls a CRI client repeats (kubelet's relist and status polls).
const MEMO_ENTRIES: usize = 16;

/// A client connection whose header blocks carry only authorities the HTTP/2
/// server accepts.
#[derive(Debug)]
pub(crate) struct Normalized<IO> {
    io: IO,
    /// Read from the socket, not yet processed.
    raw: BytesMut,
    /// Processed, not yet read by the server.
    out: BytesMut,
    phase: Phase,
    /// The header block being collected (HEADERS, then CONTINUATIONs).
    pending: Option<Block>,
    hpack: Hpack,
    scratch: Scratch,
    /// Blocks decoded since the decoder's table last changed.
    memo: Vec<Memo>,
    /// What was refused, logged once per connection.
    warned: bool,
    /// Socket EOF seen.
    eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preface,
    Frames,
    /// Unparseable input: the rest goes to the server unchanged.
    Raw,
}

/// A header block being collected.
#[derive(Debug)]
struct Block {
    stream_id: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields, if it had them.
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
    /// The frames as received, to pass on unchanged.
    original: BytesMut,
}

/// One decoded header block: names and values back to back, and where each
/// header starts with its name's and value's lengths.
#[derive(Debug, Default, Clone)]
struct Scratch {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize, usize)>,
    /// An authority was replaced.
    refused: bool,
}

/// A block decoded while the table was as it is now.
#[derive(Debug)]
struct Memo {
    fragment: BytesMut,
    decoded: Scratch,
}

struct Hpack {
    decoder: loona_hpack::Decoder<'static>,
    /// `Some` once the connection re-encodes.
    encoder: Option<loona_hpack::Encoder<'static>>,
}

impl std::fmt::Debug for Hpack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hpack")
            .field("reencoding", &self.encoder.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a connection's input is passed on unparsed.
#[derive(Debug, thiserror::Error)]
enum Unparsed {
    #[error("a HEADERS frame's padding is longer than the frame")]
    Padding,
    #[error("frame type {0:#x} inside a header block (only CONTINUATION may follow HEADERS)")]
    Interleaved(u8),
    #[error("a CONTINUATION frame without a header block")]
    StrayContinuation,
    #[error("header block of stream {stream_id} does not decode: {reason:?}")]
    Hpack {
        stream_id: u32,
        #[source]
        reason: loona_hpack::decoder::DecoderError,
    },
}

/// Whether the HTTP/2 server takes `value` as `:authority`.
pub(crate) fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<IO> Normalized<IO> {
    pub(crate) fn new(io: IO) -> Self {
        Normalized {
            io,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            phase: Phase::Preface,
            pending: None,
            hpack: Hpack {
                decoder: loona_hpack::Decoder::new(),
                encoder: None,
            },
            scratch: Scratch::default(),
            memo: Vec::new(),
            warned: false,
            eof: false,
        }
    }

    /// Moves what `raw` holds in whole units into `out`.
    fn process(&mut self) {
        loop {
            match self.phase {
                Phase::Preface => {
                    if self.raw.len() < PREFACE_LEN {
                        return;
                    }
                    // The server checks the preface itself.
                    self.out.put(self.raw.split_to(PREFACE_LEN));
                    self.phase = Phase::Frames;
                }
                Phase::Frames => {
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return;
                    }
                    let len = usize::from(self.raw[0]) << 16
                        | usize::from(self.raw[1]) << 8
                        | usize::from(self.raw[2]);
                    if self.raw.len() < FRAME_HEADER_LEN + len {
                        return;
                    }
                    let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
                    if let Err(unparsed) = self.frame(frame) {
                        self.give_up(&unparsed);
                    }
                }
                Phase::Raw => {
                    let rest = self.raw.split();
                    self.out.put(rest);
                    return;
                }
            }
        }
    }

    /// From now on the input goes to the server unchanged, whatever was
    /// collected of a header block first.
    fn give_up(&mut self, why: &Unparsed) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(reason = %why, "CRI client connection: passing unparseable HTTP/2 input to the server unchanged");
        }
        if let Some(block) = self.pending.take() {
            self.out.put(block.original);
        }
        self.phase = Phase::Raw;
    }

    fn frame(&mut self, frame: BytesMut) -> Result<(), Unparsed> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        match (self.pending.as_mut(), kind) {
            (None, HEADERS) => {
                let payload = &frame[FRAME_HEADER_LEN..];
                let (pad, start) = if flags & PADDED != 0 {
                    (usize::from(*payload.first().ok_or(Unparsed::Padding)?), 1)
                } else {
                    (0, 0)
                };
                let (priority, start) = if flags & PRIORITY != 0 {
                    let fields = payload.get(start..start + 5).ok_or(Unparsed::Padding)?;
                    let mut p = [0; 5];
                    p.copy_from_slice(fields);
                    (Some(p), start + 5)
                } else {
                    (None, start)
                };
                let end = payload
                    .len()
                    .checked_sub(pad)
                    .filter(|end| *end >= start)
                    .ok_or(Unparsed::Padding)?;
                let block = Block {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: BytesMut::from(&payload[start..end]),
                    original: frame,
                };
                self.pending = Some(block);
                if flags & END_HEADERS != 0 {
                    self.finish()?;
                }
                Ok(())
            }
            (Some(block), CONTINUATION) if stream_id == block.stream_id => {
                block.fragment.put(&frame[FRAME_HEADER_LEN..]);
                block.original.put(frame);
                if flags & END_HEADERS != 0 {
                    self.finish()?;
                }
                Ok(())
            }
            (Some(block), kind) => {
                // Hand the frame to the server with the block: it refuses
                // the sequence as HTTP/2 says.
                block.original.put(frame);
                Err(Unparsed::Interleaved(kind))
            }
            (None, CONTINUATION) => {
                self.out.put(frame);
                Err(Unparsed::StrayContinuation)
            }
            (None, _) => {
                self.out.put(frame);
                Ok(())
            }
        }
    }

    /// A whole header block: passed on, or re-encoded.
    fn finish(&mut self) -> Result<(), Unparsed> {
        let Some(block) = self.pending.take() else {
            return Ok(());
        };
        let effect = crate::hpack_scan::table_effect(&block.fragment);
        let reused = match effect {
            Some(TableEffect::None) => self.memo.iter().position(|m| m.fragment == block.fragment),
            _ => None,
        };
        if reused.is_none() {
            if let Err(reason) = self.decode(&block.fragment) {
                let stream_id = block.stream_id;
                self.pending = Some(block);
                return Err(Unparsed::Hpack { stream_id, reason });
            }
        }
        let decoded = match reused {
            Some(i) => &self.memo[i].decoded,
            None => &self.scratch,
        };
        if self.hpack.encoder.is_none() && !decoded.refused {
            self.out.put(&block.original[..]);
        } else {
            let encoded = reencode(&mut self.hpack.encoder, decoded, block.fragment.len());
            write_block(&mut self.out, &block, &encoded);
        }
        match (effect, reused) {
            (Some(TableEffect::None), None) => {
                if self.memo.len() == MEMO_ENTRIES {
                    self.memo.remove(0);
                }
                self.memo.push(Memo {
                    fragment: block.fragment,
                    decoded: self.scratch.clone(),
                });
            }
            (Some(TableEffect::None), Some(_)) => {}
            // The table changed (or the block is odd): earlier outcomes may
            // name entries that moved.
            _ => self.memo.clear(),
        }
        Ok(())
    }

    /// Decodes `fragment` into the scratch buffer, authorities the server
    /// would refuse replaced. One reused buffer: no allocation per header
    /// on the path every call takes.
    fn decode(&mut self, fragment: &[u8]) -> Result<(), loona_hpack::decoder::DecoderError> {
        let scratch = &mut self.scratch;
        scratch.bytes.clear();
        scratch.spans.clear();
        scratch.refused = false;
        self.hpack.decoder.decode_with_cb(fragment, |name, value| {
            let start = scratch.bytes.len();
            scratch.bytes.extend_from_slice(&name);
            if name.as_ref() == b":authority" && !acceptable(&value) {
                if !scratch.refused {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(&value),
                        "CRI client sends an :authority HTTP/2 servers refuse; reading it as localhost"
                    );
                }
                scratch.refused = true;
                scratch.bytes.extend_from_slice(REPLACEMENT);
                scratch.spans.push((start, name.len(), REPLACEMENT.len()));
            } else {
                scratch.bytes.extend_from_slice(&value);
                scratch.spans.push((start, name.len(), value.len()));
            }
        })
    }
}

/// A decoded block encoded by the connection's own encoder, created (with
/// the table size updates that empty the server's table) on first use.
fn reencode(
    encoder: &mut Option<loona_hpack::Encoder<'static>>,
    decoded: &Scratch,
    size_hint: usize,
) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(size_hint + 16);
    let encoder = match encoder {
        Some(encoder) => encoder,
        None => {
            // Empty the server's table, then give it back its size.
            encode_size_update(0, &mut encoded);
            encode_size_update(TABLE_SIZE, &mut encoded);
            encoder.insert(loona_hpack::Encoder::new())
        }
    };
    for &(start, name_len, value_len) in &decoded.spans {
        let name = &decoded.bytes[start..start + name_len];
        let value = &decoded.bytes[start + name_len..start + name_len + value_len];
        encoder
            .encode_header_into((name, value), &mut encoded)
            .unwrap_or_else(|never: io::Error| unreachable!("writing to a Vec: {never}"));
    }
    encoded
}

/// An HPACK dynamic table size update (RFC 7541 §6.3).
fn encode_size_update(size: usize, dst: &mut Vec<u8>) {
    let mut encoded = loona_hpack::encoder::encode_integer(size, 5);
    encoded[0] |= 0x20;
    dst.extend_from_slice(&encoded);
}

/// `block` re-encoded as `fragment`: a HEADERS frame (keeping END_STREAM and
/// the priority fields, without padding) and as many CONTINUATION frames as
/// the server's frame size needs.
fn write_block(out: &mut BytesMut, block: &Block, fragment: &[u8]) {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first = fragment.len().min(MAX_FRAME_SIZE - priority.len());
    let (head, mut rest) = fragment.split_at(first);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(
        out,
        priority.len() + head.len(),
        HEADERS,
        flags,
        block.stream_id,
    );
    out.put_slice(priority);
    out.put_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME_SIZE);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, block.stream_id);
        out.put_slice(chunk);
    }
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.put_slice(&len[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

impl<IO: AsyncRead + Unpin> AsyncRead for Normalized<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A truncated frame goes to the server as it came.
                let rest = this.raw.split();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.out.put(rest);
                continue;
            }
            this.raw.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {
                    this.process();
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Normalized<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for Normalized<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let mut head = BytesMut::new();
        frame_header(&mut head, payload.len(), kind, flags, stream_id);
        out.extend_from_slice(&head);
        out.extend_from_slice(payload);
    }

    /// A gRPC request's headers as a client encodes them.
    fn request_headers(authority: Option<&str>, path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut h = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
        ];
        if let Some(a) = authority {
            h.push((b":authority".to_vec(), a.as_bytes().to_vec()));
        }
        h.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        h.push((b"te".to_vec(), b"trailers".to_vec()));
        h
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Client bytes: preface, empty SETTINGS, then one HEADERS frame per
    /// request (odd stream ids from 1) with END_STREAM.
    fn client_bytes(authorities: &[Option<&str>]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        let mut out = PREFACE.to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        for (i, authority) in authorities.iter().enumerate() {
            let block = encode(
                &mut encoder,
                &request_headers(*authority, &format!("/svc/M{i}")),
            );
            let id = u32::try_from(2 * i + 1).unwrap_or(1);
            frame(&mut out, HEADERS, END_HEADERS | END_STREAM, id, &block);
        }
        out
    }

    /// What `input` becomes through [`Normalized`].
    async fn normalized(input: &[u8]) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client
            .write_all(input)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(client);
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut Normalized::new(server), &mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    /// The requests an `h2` server accepts from `input` through
    /// [`Normalized`]: (path, authority).
    async fn accepted(input: Vec<u8>, requests: usize) -> Vec<(String, Option<String>)> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            client
                .write_all(&input)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            // Keep the client open (and drain the server's frames) until
            // the server has read everything.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        });
        let mut conn = h2::server::handshake(Normalized::new(server))
            .await
            .unwrap_or_else(|e| panic!("handshake: {e}"));
        let mut seen = Vec::new();
        while seen.len() < requests {
            match conn.accept().await {
                Some(Ok((request, _respond))) => seen.push((
                    request.uri().path().to_owned(),
                    request.uri().authority().map(ToString::to_string),
                )),
                Some(Err(e)) => panic!("request refused: {e}"),
                None => break,
            }
        }
        writer.abort();
        seen
    }

    #[test]
    fn acceptable_authorities_are_what_h2_takes() {
        for ok in ["localhost", "localhost:80", "127.0.0.1:10010", "[::1]:1"] {
            assert!(acceptable(ok.as_bytes()), "{ok}");
        }
        for refused in [
            "/run/containerd/containerd.sock",
            "%2Frun%2Fcri.sock",
            "a b",
            "",
        ] {
            assert!(!acceptable(refused.as_bytes()), "{refused:?}");
        }
    }

    #[tokio::test]
    async fn valid_or_absent_authorities_pass_byte_for_byte() {
        let input = client_bytes(&[Some("localhost"), None, Some("localhost"), Some("h:1")]);
        assert_eq!(normalized(&input).await, input);
    }

    #[tokio::test]
    async fn a_socket_path_authority_is_read_as_localhost() {
        let path = "/run/fast-sandbox/cri.sock";
        let seen = accepted(client_bytes(&[Some(path), Some(path)]), 2).await;
        assert_eq!(
            seen,
            vec![
                ("/svc/M0".to_owned(), Some("localhost".to_owned())),
                ("/svc/M1".to_owned(), Some("localhost".to_owned())),
            ]
        );
    }

    /// Blocks passed on before the switch filled the server's dynamic table;
    /// blocks after it must decode against the re-encoder's table, including
    /// headers the client indexed before the switch.
    #[tokio::test]
    async fn switching_mid_connection_keeps_the_tables_in_step() {
        let authorities = [Some("localhost"), Some("/x.sock"), Some("localhost"), None];
        let seen = accepted(client_bytes(&authorities), 4).await;
        let paths: Vec<_> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/svc/M0", "/svc/M1", "/svc/M2", "/svc/M3"]);
        let authorities: Vec<_> = seen.iter().map(|(_, a)| a.as_deref()).collect();
        assert_eq!(
            authorities,
            [
                Some("localhost"),
                Some("localhost"),
                Some("localhost"),
                None
            ]
        );
    }

    /// A block repeated byte for byte is decoded once while the table stays
    /// the same; after the table changes, the same bytes mean other headers
    /// and are decoded again. Here `0xbe` (dynamic entry 62) is `/svc/A`,
    /// then `/svc/B` once the third block inserts that path; every block
    /// is re-encoded (its authority is a socket path), so a stale reuse
    /// would send `/svc/A` four times.
    #[tokio::test]
    async fn repeated_blocks_are_decoded_again_after_the_table_changes() {
        let bad = b"\x01\x09/bad.sock";
        let insert = |path: &[u8]| {
            let mut b = vec![0x83, 0x86, 0x44, u8::try_from(path.len()).unwrap_or(0)];
            b.extend_from_slice(path);
            b.extend_from_slice(bad);
            b
        };
        let mut repeated = vec![0x83, 0x86, 0xbe];
        repeated.extend_from_slice(bad);
        let mut out = PREFACE.to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        for (id, block) in [
            (1, insert(b"/svc/A")),
            (3, repeated.clone()),
            (5, insert(b"/svc/B")),
            (7, repeated.clone()),
            (9, repeated),
        ] {
            frame(&mut out, HEADERS, END_HEADERS | END_STREAM, id, &block);
        }
        let seen = accepted(out, 5).await;
        let paths: Vec<_> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/svc/A", "/svc/A", "/svc/B", "/svc/B", "/svc/B"]);
        assert!(seen.iter().all(|(_, a)| a.as_deref() == Some("localhost")));
    }

    /// HEADERS with padding and priority, continued by CONTINUATION frames,
    /// and a block longer than one frame once re-encoded.
    #[tokio::test]
    async fn padded_prioritised_and_continued_blocks() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut headers = request_headers(Some("/a.sock"), "/svc/Big");
        headers.push((b"x-big".to_vec(), vec![b'v'; 3 * MAX_FRAME_SIZE]));
        let block = encode(&mut encoder, &headers);
        let mut out = PREFACE.to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        let (first, rest) = block.split_at(100);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0, 0, 0]);
        frame(
            &mut out,
            HEADERS,
            PADDED | PRIORITY | END_STREAM,
            1,
            &payload,
        );
        let mut chunks = rest.chunks(MAX_FRAME_SIZE).peekable();
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            frame(&mut out, CONTINUATION, flags, 1, chunk);
        }
        let seen = accepted(out, 1).await;
        assert_eq!(
            seen,
            vec![("/svc/Big".to_owned(), Some("localhost".to_owned()))]
        );
    }

    #[tokio::test]
    async fn unparseable_input_reaches_the_server_unchanged() {
        let mut input = PREFACE.to_vec();
        frame(&mut input, 0x4, 0, 0, &[]);
        // An indexed field beyond both tables.
        frame(&mut input, HEADERS, END_HEADERS, 1, &[0xff, 0x7f]);
        frame(&mut input, 0x0, END_STREAM, 1, b"data");
        assert_eq!(normalized(&input).await, input);
        // A CONTINUATION without a block, then a normal request: unchanged.
        let mut input = PREFACE.to_vec();
        frame(&mut input, CONTINUATION, END_HEADERS, 1, &[0x82]);
        input.extend_from_slice(&client_bytes(&[Some("/x.sock")])[PREFACE_LEN..]);
        assert_eq!(normalized(&input).await, input);
    }
}
