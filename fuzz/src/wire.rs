//! The oracle of the `preserve` target: its own reading of protobuf wire
//! data against the CRI descriptor set (independent of the shim's
//! preserve.rs), listing the field occurrences the schema does not know at
//! every depth, and which of them an edit must leave in place.

use std::{
    collections::{BTreeMap, HashMap},
    sync::OnceLock,
};

use prost::{
    encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType},
    Message as _,
};
use prost_types::field_descriptor_proto::{Label, Type};

/// What the oracle needs to know of a field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A message field (not a map), by its type's full name.
    Message { type_name: String, repeated: bool },
    /// Scalars, strings, bytes, enums and maps: compared whole.
    Opaque,
}

/// The CRI message types by full name, each with its fields by number.
#[derive(Debug, Default)]
pub struct Schema {
    messages: HashMap<String, HashMap<u32, Kind>>,
}

impl Schema {
    /// The CRI v1 schema, read once.
    pub fn cri() -> &'static Schema {
        static CRI: OnceLock<Schema> = OnceLock::new();
        CRI.get_or_init(Schema::read)
    }

    fn read() -> Schema {
        let set = prost_types::FileDescriptorSet::decode(fast_sandbox_proto::cri::DESCRIPTOR_SET)
            .expect("the CRI descriptor set decodes");
        let mut schema = Schema::default();
        for file in &set.file {
            let prefix = format!(".{}", file.package());
            for message in &file.message_type {
                schema.add(&prefix, message);
            }
        }
        schema
    }

    fn add(&mut self, prefix: &str, message: &prost_types::DescriptorProto) {
        let name = format!("{prefix}.{}", message.name());
        let maps: Vec<String> = message
            .nested_type
            .iter()
            .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
            .map(|n| format!("{name}.{}", n.name()))
            .collect();
        let fields = message
            .field
            .iter()
            .map(|f| {
                let kind =
                    if f.r#type() == Type::Message && !maps.iter().any(|m| m == f.type_name()) {
                        Kind::Message {
                            type_name: f.type_name().to_owned(),
                            repeated: f.label() == Label::Repeated,
                        }
                    } else {
                        Kind::Opaque
                    };
                (
                    u32::try_from(f.number()).expect("field numbers are positive"),
                    kind,
                )
            })
            .collect();
        for nested in &message.nested_type {
            self.add(&name, nested);
        }
        self.messages.insert(name, fields);
    }

    fn kind(&self, message: &str, number: u32) -> Option<&Kind> {
        self.messages.get(message)?.get(&number)
    }
}

/// One field occurrence.
#[derive(Debug, Clone, Copy)]
pub struct Occurrence<'a> {
    pub number: u32,
    /// Key and value, as encoded.
    pub raw: &'a [u8],
    /// The value of a length-delimited field.
    pub payload: Option<&'a [u8]>,
}

/// The field occurrences of `data`, in order; `None` if it is not a
/// protobuf message.
pub fn occurrences(data: &[u8]) -> Option<Vec<Occurrence<'_>>> {
    let mut buf = data;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = data.len() - buf.len();
        let (number, wire_type) = decode_key(&mut buf).ok()?;
        let payload = if wire_type == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            if len > buf.len() {
                return None;
            }
            let (payload, rest) = buf.split_at(len);
            buf = rest;
            Some(payload)
        } else {
            skip_field(wire_type, number, &mut buf, DecodeContext::default()).ok()?;
            None
        };
        out.push(Occurrence {
            number,
            raw: &data[start..data.len() - buf.len()],
            payload,
        });
    }
    Some(out)
}

/// Unknown field occurrences: the path of field numbers of the message
/// holding each, and its bytes.
pub type Unknowns = Vec<(Vec<u32>, Vec<u8>)>;

/// Every unknown field occurrence of `data` (of type `message`), at every
/// depth of known message fields.
pub fn unknowns(schema: &Schema, message: &str, data: &[u8]) -> Unknowns {
    let mut out = Vec::new();
    collect(schema, message, data, &mut Vec::new(), &mut out);
    out
}

fn collect(schema: &Schema, message: &str, data: &[u8], path: &mut Vec<u32>, out: &mut Unknowns) {
    for o in occurrences(data).unwrap_or_default() {
        match (schema.kind(message, o.number), o.payload) {
            (None, _) => out.push((path.clone(), o.raw.to_vec())),
            (Some(Kind::Message { type_name, .. }), Some(payload)) => {
                path.push(o.number);
                collect(schema, type_name, payload, path, out);
                path.pop();
            }
            _ => {}
        }
    }
}

fn by_number<'a>(data: &'a [u8]) -> BTreeMap<u32, Vec<&'a [u8]>> {
    let mut map: BTreeMap<u32, Vec<&[u8]>> = BTreeMap::new();
    for o in occurrences(data).unwrap_or_default() {
        map.entry(o.number).or_default().push(o.raw);
    }
    map
}

fn payloads_of<'a>(data: &'a [u8], number: u32) -> Vec<&'a [u8]> {
    occurrences(data)
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.number == number)
        .filter_map(|o| o.payload)
        .collect()
}

/// The unknown occurrences of `original` that an edit turning `before`
/// into `after` (the typed message's encodings before and after the edit)
/// must leave in place, per the contract of the shim's preserve.rs: those
/// at the top; those in a sub-message whose known fields the edit did not
/// change; and, recursively, those in a singular sub-message that stays
/// present and in the items of a list whose length stays the same.
pub fn surviving(
    schema: &Schema,
    message: &str,
    original: &[u8],
    before: &[u8],
    after: &[u8],
) -> Unknowns {
    let mut out = Vec::new();
    survive(
        schema,
        message,
        original,
        before,
        after,
        &mut Vec::new(),
        &mut out,
    );
    out
}

fn survive(
    schema: &Schema,
    message: &str,
    original: &[u8],
    before: &[u8],
    after: &[u8],
    path: &mut Vec<u32>,
    out: &mut Unknowns,
) {
    let (b, a) = (by_number(before), by_number(after));
    let mut seen = Vec::new();
    for o in occurrences(original).unwrap_or_default() {
        let Some(kind) = schema.kind(message, o.number) else {
            out.push((path.clone(), o.raw.to_vec()));
            continue;
        };
        let Kind::Message {
            type_name,
            repeated,
        } = kind
        else {
            continue;
        };
        if seen.contains(&o.number) {
            continue;
        }
        seen.push(o.number);
        let originals = payloads_of(original, o.number);
        let (bp, ap) = (payloads_of(before, o.number), payloads_of(after, o.number));
        path.push(o.number);
        if b.get(&o.number) == a.get(&o.number) {
            for p in &originals {
                collect(schema, type_name, p, path, out);
            }
        } else if !repeated && bp.len() == 1 && ap.len() == 1 {
            let joined = originals.concat();
            survive(schema, type_name, &joined, bp[0], ap[0], path, out);
        } else if *repeated && originals.len() == bp.len() && bp.len() == ap.len() {
            for ((o, b), a) in originals.iter().zip(&bp).zip(&ap) {
                survive(schema, type_name, o, b, a, path, out);
            }
        }
        path.pop();
    }
}

/// Whether every element of `part` is in `whole`, counting repeats.
pub fn is_sub_multiset(part: &Unknowns, whole: &Unknowns) -> bool {
    let mut counts: HashMap<&(Vec<u32>, Vec<u8>), i64> = HashMap::new();
    for u in whole {
        *counts.entry(u).or_default() += 1;
    }
    part.iter().all(|u| {
        let count = counts.entry(u).or_default();
        *count -= 1;
        *count >= 0
    })
}
