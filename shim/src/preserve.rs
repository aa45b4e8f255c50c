//! Rewriting a protobuf message without losing what the shim does not know.
//!
//! The shim reads and edits CRI messages through the `k8s-cri` Rust types,
//! and prost drops every field those types do not have. A newer kubelet's
//! request fields or a newer containerd's answer fields would vanish on the
//! way through. So an edited message is never re-encoded from its Rust type
//! alone: [`rewrite`] decodes the original bytes (`A`), lets the caller edit
//! a copy (`B`), and when `B != A` merges at the wire level
//! ([`merge`]): every field whose encoding is the same in `A` and `B` is
//! copied from the original bytes (so are fields unknown to the Rust types,
//! at any depth); a field that changed is taken from `B`, except that a
//! changed sub-message (or a list of them of unchanged length) is merged
//! recursively, so the unknown fields inside it survive too. Maps and
//! scalars that changed are taken from `B` whole.
//!
//! Which fields are sub-messages comes from the CRI schema itself
//! ([`Schema`], the descriptor set of `proto/cri/api.proto`), never from
//! guessing at bytes. Field order follows the original; a field the edit
//! added goes at the end.

use std::{
    collections::{BTreeMap, HashMap},
    sync::OnceLock,
};

use bytes::{Buf, BufMut, Bytes};
use prost::{
    encoding::{
        decode_key, decode_varint, encode_key, encode_varint, skip_field, DecodeContext, WireType,
    },
    DecodeError, Message,
};

/// A message that cannot be read as protobuf.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed protobuf message")]
    Decode(#[from] DecodeError),
    #[error("a length-delimited field runs past the end of its message")]
    Truncated,
}

/// What the shim needs to know of a message field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldInfo {
    /// The full name of its message type, for message fields.
    message: Option<String>,
    repeated: bool,
    map: bool,
}

/// The CRI message types by full name (`.runtime.v1.PodSandbox`), each with
/// its fields by number.
#[derive(Debug, Default)]
pub(crate) struct Schema {
    messages: HashMap<String, HashMap<u32, FieldInfo>>,
}

impl Schema {
    /// The CRI v1 schema, read once.
    pub(crate) fn cri() -> &'static Schema {
        static CRI: OnceLock<Schema> = OnceLock::new();
        CRI.get_or_init(|| {
            Schema::from_descriptor_set(fast_sandbox_proto::cri::DESCRIPTOR_SET).unwrap_or_else(
                |e| {
                    unreachable!(
                        "the CRI descriptor set built into the binary does not decode: {e}"
                    )
                },
            )
        })
    }

    pub(crate) fn from_descriptor_set(encoded: &[u8]) -> Result<Schema, DecodeError> {
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        let mut schema = Schema::default();
        for file in &set.file {
            let package = file.package();
            let prefix = if package.is_empty() {
                String::new()
            } else {
                format!(".{package}")
            };
            for message in &file.message_type {
                schema.add(&prefix, message);
            }
        }
        Ok(schema)
    }

    fn add(&mut self, prefix: &str, message: &prost_types::DescriptorProto) {
        use prost_types::field_descriptor_proto::{Label, Type};
        let name = format!("{prefix}.{}", message.name());
        let map_entries: Vec<String> = message
            .nested_type
            .iter()
            .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
            .map(|n| format!("{name}.{}", n.name()))
            .collect();
        let fields = message
            .field
            .iter()
            .map(|f| {
                let is_message = f.r#type() == Type::Message;
                let type_name = f.type_name().to_owned();
                let info = FieldInfo {
                    map: is_message && map_entries.contains(&type_name),
                    message: is_message.then_some(type_name),
                    repeated: f.label() == Label::Repeated,
                };
                (u32::try_from(f.number()).unwrap_or(0), info)
            })
            .collect();
        for nested in &message.nested_type {
            self.add(&name, nested);
        }
        self.messages.insert(name, fields);
    }

    fn field(&self, message: &str, number: u32) -> Option<&FieldInfo> {
        self.messages.get(message)?.get(&number)
    }

    /// Whether the schema knows `message`.
    #[cfg(test)]
    fn knows(&self, message: &str) -> bool {
        self.messages.contains_key(message)
    }
}

/// One field occurrence on the wire.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    number: u32,
    /// Key and value, as encoded.
    raw: &'a [u8],
    /// The value of a length-delimited field.
    payload: Option<&'a [u8]>,
}

/// The field occurrences of an encoded message, in order.
fn fields(data: &[u8]) -> Result<Vec<Field<'_>>, WireError> {
    let mut out = Vec::new();
    let mut buf = data;
    while buf.has_remaining() {
        let start = data.len() - buf.len();
        let (number, wire_type) = decode_key(&mut buf)?;
        let payload = if wire_type == WireType::LengthDelimited {
            let len =
                usize::try_from(decode_varint(&mut buf)?).map_err(|_| WireError::Truncated)?;
            if len > buf.len() {
                return Err(WireError::Truncated);
            }
            let (payload, rest) = buf.split_at(len);
            buf = rest;
            Some(payload)
        } else {
            skip_field(wire_type, number, &mut buf, DecodeContext::default())?;
            None
        };
        let end = data.len() - buf.len();
        out.push(Field {
            number,
            raw: &data[start..end],
            payload,
        });
    }
    Ok(out)
}

fn by_number<'a>(list: &[Field<'a>]) -> BTreeMap<u32, Vec<Field<'a>>> {
    let mut map: BTreeMap<u32, Vec<Field<'a>>> = BTreeMap::new();
    for f in list {
        map.entry(f.number).or_default().push(*f);
    }
    map
}

fn same(a: Option<&Vec<Field<'_>>>, b: Option<&Vec<Field<'_>>>) -> bool {
    let a = a.map_or(&[][..], Vec::as_slice);
    let b = b.map_or(&[][..], Vec::as_slice);
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.raw == y.raw)
}

/// Appends message field `number` holding `payload`.
pub(crate) fn put_message_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.put_slice(payload);
}

/// `original` (an encoding of message type `message`) with the edit that
/// turned `before` into `after` applied; `before` and `after` are the Rust
/// type's encodings of `original` decoded and of its edited copy.
pub(crate) fn merge(
    schema: &Schema,
    message: &str,
    original: &[u8],
    before: &[u8],
    after: &[u8],
) -> Result<Vec<u8>, WireError> {
    if before == after {
        return Ok(original.to_vec());
    }
    let orig = fields(original)?;
    let before = by_number(&fields(before)?);
    let after = by_number(&fields(after)?);
    let changed: Vec<u32> = before
        .keys()
        .chain(after.keys())
        .copied()
        .filter(|n| !same(before.get(n), after.get(n)))
        .collect();
    let mut out = Vec::with_capacity(original.len() + 64);
    let mut done: Vec<u32> = Vec::new();
    for field in &orig {
        if !changed.contains(&field.number) {
            out.put_slice(field.raw);
        } else if !done.contains(&field.number) {
            done.push(field.number);
            let originals: Vec<Field<'_>> = orig
                .iter()
                .filter(|f| f.number == field.number)
                .copied()
                .collect();
            replace(
                schema,
                message,
                field.number,
                &originals,
                &before,
                &after,
                &mut out,
            )?;
        }
    }
    for number in changed {
        if !done.contains(&number) && !orig.iter().any(|f| f.number == number) {
            replace(schema, message, number, &[], &before, &after, &mut out)?;
            done.push(number);
        }
    }
    Ok(out)
}

/// The payloads of `list`, if every occurrence is length-delimited.
fn payloads<'a>(list: &[Field<'a>]) -> Option<Vec<&'a [u8]>> {
    list.iter().map(|f| f.payload).collect()
}

/// Writes the new occurrences of changed field `number`.
fn replace(
    schema: &Schema,
    message: &str,
    number: u32,
    originals: &[Field<'_>],
    before: &BTreeMap<u32, Vec<Field<'_>>>,
    after: &BTreeMap<u32, Vec<Field<'_>>>,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let empty = Vec::new();
    let b = before.get(&number).unwrap_or(&empty);
    let a = after.get(&number).unwrap_or(&empty);
    let sub = schema
        .field(message, number)
        .filter(|info| !info.map)
        .and_then(|info| info.message.as_deref().map(|m| (m, info.repeated)));
    if let (Some((sub, repeated)), Some(o), Some(bp), Some(ap)) =
        (sub, payloads(originals), payloads(b), payloads(a))
    {
        if !repeated && !o.is_empty() && bp.len() == 1 && ap.len() == 1 {
            // Several occurrences of a singular message merge into one.
            let joined: Vec<u8> = o.concat();
            let merged = merge(schema, sub, &joined, bp[0], ap[0])?;
            put_message_field(out, number, &merged);
            return Ok(());
        }
        if repeated && o.len() == bp.len() && bp.len() == ap.len() {
            for ((o, b), a) in o.iter().zip(&bp).zip(&ap) {
                let merged = merge(schema, sub, o, b, a)?;
                put_message_field(out, number, &merged);
            }
            return Ok(());
        }
    }
    for f in a {
        out.put_slice(f.raw);
    }
    Ok(())
}

/// Decodes `original` as `M`, lets `edit` change it, and encodes the result
/// keeping everything `edit` did not change ([`merge`]). Returns the bytes
/// (`original` itself when nothing changed) and what `edit` returned.
pub(crate) fn rewrite<M, R>(
    message: &str,
    original: &Bytes,
    edit: impl FnOnce(&mut M) -> R,
) -> Result<(Bytes, R), WireError>
where
    M: Message + Default + Clone + PartialEq,
{
    let decoded = M::decode(original.as_ref())?;
    let mut edited = decoded.clone();
    let result = edit(&mut edited);
    if edited == decoded {
        return Ok((original.clone(), result));
    }
    let merged = merge(
        Schema::cri(),
        message,
        original,
        &decoded.encode_to_vec(),
        &edited.encode_to_vec(),
    )?;
    Ok((Bytes::from(merged), result))
}

/// Like [`rewrite`] for the repeated message field `items` (number) of a
/// list answer: `edit` sees each item (of type `item` in the schema) and
/// keeps it (`true`) or drops it. Every other field, and each kept item's
/// fields that `edit` did not change, stay as in `original`.
pub(crate) fn rewrite_items<M>(
    item: &str,
    items: u32,
    original: &Bytes,
    mut edit: impl FnMut(&mut M) -> bool,
) -> Result<Bytes, WireError>
where
    M: Message + Default + Clone + PartialEq,
{
    let mut out = Vec::with_capacity(original.len());
    let mut unchanged = true;
    for field in fields(original)? {
        let Some(payload) = field.payload.filter(|_| field.number == items) else {
            out.put_slice(field.raw);
            continue;
        };
        let decoded = M::decode(payload)?;
        let mut edited = decoded.clone();
        if !edit(&mut edited) {
            unchanged = false;
            continue;
        }
        if edited == decoded {
            out.put_slice(field.raw);
            continue;
        }
        unchanged = false;
        let merged = merge(
            Schema::cri(),
            item,
            payload,
            &decoded.encode_to_vec(),
            &edited.encode_to_vec(),
        )?;
        put_message_field(&mut out, items, &merged);
    }
    Ok(if unchanged {
        original.clone()
    } else {
        Bytes::from(out)
    })
}

/// The encoded items (repeated message field `items`) of a message, in
/// order: to copy entries between messages ([`put_message_field`]).
pub(crate) fn items(original: &[u8], items: u32) -> Result<Vec<&[u8]>, WireError> {
    Ok(fields(original)?
        .into_iter()
        .filter(|f| f.number == items)
        .filter_map(|f| f.payload)
        .collect())
}

#[cfg(test)]
mod tests {
    use fast_sandbox_proto::cri;

    use super::*;

    /// An unknown field (number 990+) of each wire type.
    fn unknown(tag: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(tag, WireType::LengthDelimited, &mut out);
        encode_varint(5, &mut out);
        out.put_slice(b"extra");
        encode_key(tag + 1, WireType::Varint, &mut out);
        encode_varint(7, &mut out);
        encode_key(tag + 2, WireType::SixtyFourBit, &mut out);
        out.put_u64_le(9);
        out
    }

    fn status_response() -> cri::PodSandboxStatusResponse {
        cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "abc".into(),
                metadata: Some(cri::PodSandboxMetadata {
                    name: "slot-1".into(),
                    uid: "u1".into(),
                    namespace: "fast-sandbox".into(),
                    attempt: 0,
                }),
                labels: [("fast-sandbox.io/slot".to_owned(), "unclaimed".to_owned())].into(),
                network: Some(cri::PodSandboxNetworkStatus {
                    ip: "10.0.0.2".into(),
                    additional_ips: vec![],
                }),
                ..Default::default()
            }),
            info: [("info".to_owned(), "{}".to_owned())].into(),
            ..Default::default()
        }
    }

    /// `status_response` with unknown fields at the top, in `status`, and
    /// in `status.metadata` and `status.network`.
    fn with_unknowns() -> Bytes {
        let r = status_response();
        let status = r.status.clone().unwrap_or_default();
        let mut meta = status.metadata.clone().unwrap_or_default().encode_to_vec();
        meta.extend(unknown(900));
        let mut network = status.network.clone().unwrap_or_default().encode_to_vec();
        network.extend(unknown(910));
        let mut inner = cri::PodSandboxStatus {
            metadata: None,
            network: None,
            ..status
        }
        .encode_to_vec();
        put_message_field(&mut inner, 2, &meta);
        put_message_field(&mut inner, 5, &network);
        inner.extend(unknown(920));
        let mut top = cri::PodSandboxStatusResponse { status: None, ..r }.encode_to_vec();
        put_message_field(&mut top, 1, &inner);
        top.extend(unknown(930));
        Bytes::from(top)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn schema_knows_the_cri_types_and_their_message_fields() {
        let schema = Schema::cri();
        for name in [
            ".runtime.v1.PodSandboxStatusResponse",
            ".runtime.v1.PodSandbox",
            ".runtime.v1.PodSandboxStats",
            ".runtime.v1.ContainerEventResponse",
            ".runtime.v1.RunPodSandboxRequest",
            ".runtime.v1.StatusResponse",
        ] {
            assert!(schema.knows(name), "{name}");
        }
        let status = schema.field(".runtime.v1.PodSandboxStatus", 2);
        assert_eq!(
            status.and_then(|f| f.message.as_deref()),
            Some(".runtime.v1.PodSandboxMetadata")
        );
        let labels = schema.field(".runtime.v1.PodSandboxStatus", 7);
        assert!(labels.is_some_and(|f| f.map), "{labels:?}");
    }

    #[test]
    fn nothing_changed_is_the_original_bytes() {
        let original = with_unknowns();
        let (out, ()) = rewrite::<cri::PodSandboxStatusResponse, _>(
            ".runtime.v1.PodSandboxStatusResponse",
            &original,
            |_| (),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, original);
    }

    #[test]
    fn unknown_fields_survive_an_edit_at_every_depth() {
        let original = with_unknowns();
        let (out, ()) = rewrite::<cri::PodSandboxStatusResponse, _>(
            ".runtime.v1.PodSandboxStatusResponse",
            &original,
            |r| {
                let status = r.status.as_mut().unwrap_or_else(|| unreachable!());
                status.metadata = Some(cri::PodSandboxMetadata {
                    name: "web".into(),
                    uid: "pod-uid".into(),
                    namespace: "default".into(),
                    attempt: 1,
                });
                status.labels = [("app".to_owned(), "web".to_owned())].into();
                if let Some(n) = status.network.as_mut() {
                    n.ip = "10.0.0.9".into();
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for tag in [900, 910, 920, 930] {
            assert!(contains(&out, &unknown(tag)), "unknown fields {tag}.. lost");
        }
        let decoded = cri::PodSandboxStatusResponse::decode(out.as_ref()).unwrap_or_default();
        let status = decoded.status.unwrap_or_default();
        assert_eq!(status.metadata.unwrap_or_default().name, "web");
        assert_eq!(status.labels.get("app").map(String::as_str), Some("web"));
        assert!(!status.labels.contains_key("fast-sandbox.io/slot"));
        assert_eq!(status.network.unwrap_or_default().ip, "10.0.0.9");
        assert_eq!(decoded.info.get("info").map(String::as_str), Some("{}"));
    }

    #[test]
    fn cleared_and_added_fields() {
        let original = with_unknowns();
        let (out, ()) = rewrite::<cri::PodSandboxStatusResponse, _>(
            ".runtime.v1.PodSandboxStatusResponse",
            &original,
            |r| {
                r.info.clear();
                let status = r.status.as_mut().unwrap_or_else(|| unreachable!());
                status.network = None;
                status.runtime_handler = "fast-runc".into();
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let decoded = cri::PodSandboxStatusResponse::decode(out.as_ref()).unwrap_or_default();
        assert!(decoded.info.is_empty());
        let status = decoded.status.unwrap_or_default();
        assert!(status.network.is_none());
        assert_eq!(status.runtime_handler, "fast-runc");
        // The network's unknown fields went with it; the others stay.
        assert!(!contains(&out, &unknown(910)));
        for tag in [900, 920, 930] {
            assert!(contains(&out, &unknown(tag)), "{tag}");
        }
    }

    #[test]
    fn list_items_are_dropped_or_edited_keeping_unknowns() {
        let item = |id: &str| {
            let mut raw = cri::PodSandbox {
                id: id.into(),
                runtime_handler: "runc".into(),
                ..Default::default()
            }
            .encode_to_vec();
            raw.extend(unknown(950));
            raw
        };
        let mut list = Vec::new();
        for id in ["keep", "drop", "edit"] {
            put_message_field(&mut list, 1, &item(id));
        }
        list.extend(unknown(960));
        let list = Bytes::from(list);
        let out = rewrite_items::<cri::PodSandbox>(".runtime.v1.PodSandbox", 1, &list, |p| {
            if p.id == "edit" {
                p.runtime_handler = "fast-runc".into();
            }
            p.id != "drop"
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let decoded = cri::ListPodSandboxResponse::decode(out.as_ref()).unwrap_or_default();
        let ids: Vec<_> = decoded.items.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["keep", "edit"]);
        assert_eq!(decoded.items[1].runtime_handler, "fast-runc");
        let raw_items = items(&out, 1).unwrap_or_default();
        assert_eq!(raw_items.len(), 2);
        for raw in raw_items {
            assert!(contains(raw, &unknown(950)));
        }
        assert!(contains(&out, &unknown(960)));
        // Nothing edited or dropped: the very bytes.
        let same = rewrite_items::<cri::PodSandbox>(".runtime.v1.PodSandbox", 1, &list, |_| true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(same, list);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &[0xff_u8; 8][..],
            &[0x0a, 0x80, 0x80, 0x80, 0x80, 0x01][..],
            &[0x0f][..],
        ] {
            let bad = Bytes::copy_from_slice(bad);
            assert!(rewrite::<cri::PodSandboxStatusResponse, _>(
                ".runtime.v1.PodSandboxStatusResponse",
                &bad,
                |_| ()
            )
            .is_err());
        }
    }
}
