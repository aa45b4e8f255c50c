//! Message bytes as they are: the codec of every call the shim handles
//! itself, so a message is decoded only where the shim must read it and
//! never re-encoded from a Rust type (preserve.rs).

use bytes::{Buf, BufMut, Bytes};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

/// A tonic codec whose messages are their protobuf bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

#[derive(Debug)]
pub(crate) struct RawEncoder;

#[derive(Debug)]
pub(crate) struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// tonic's answer to a message that does not decode (what the shim answered
/// when tonic decoded every request itself).
pub(crate) fn decode_status(err: &dyn std::error::Error) -> Status {
    Status::internal(format!("failed to decode Protobuf message: {err}"))
}
