//! Reads the structure of an HPACK header block without decoding it: which
//! representations it holds, not what they say (RFC 7541 §5, §6). Enough to
//! tell whether decoding the block changes the decoder's dynamic table, which
//! decides whether an earlier decoding of the same bytes can be reused
//! (`authority.rs`). No string is Huffman-decoded and nothing is allocated.

/// What decoding a block does to the dynamic table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableEffect {
    /// Only indexed fields and literals without indexing: the table stays as
    /// it was, and the block decodes to the same headers every time the
    /// table is the same.
    None,
    /// A literal with incremental indexing or a table size update.
    Changes,
}

/// The block's effect on the table; `None` when it is not well formed (a
/// truncated integer or string), which only a full decoding can report.
pub(crate) fn table_effect(block: &[u8]) -> Option<TableEffect> {
    let mut rest = block;
    let mut effect = TableEffect::None;
    while let Some(&first) = rest.first() {
        if first & 0x80 != 0 {
            // Indexed header field (§6.1).
            (_, rest) = integer(rest, 7)?;
        } else if first & 0xc0 == 0x40 {
            // Literal with incremental indexing (§6.2.1).
            effect = TableEffect::Changes;
            rest = literal(rest, 6)?;
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update (§6.3).
            effect = TableEffect::Changes;
            (_, rest) = integer(rest, 5)?;
        } else {
            // Literal without indexing or never indexed (§6.2.2, §6.2.3).
            rest = literal(rest, 4)?;
        }
    }
    Some(effect)
}

/// A literal field whose name index has a `prefix`-bit prefix: the name
/// (when the index is 0) and the value skipped.
fn literal(src: &[u8], prefix: u8) -> Option<&[u8]> {
    let (index, mut rest) = integer(src, prefix)?;
    if index == 0 {
        rest = string(rest)?;
    }
    string(rest)
}

/// A string literal (§5.2) skipped.
fn string(src: &[u8]) -> Option<&[u8]> {
    let (len, rest) = integer(src, 7)?;
    rest.get(usize::try_from(len).ok()?..)
}

/// An integer with a `prefix`-bit prefix (§5.1) and what follows it.
/// Values beyond `u32` are refused (no header block needs them).
fn integer(src: &[u8], prefix: u8) -> Option<(u64, &[u8])> {
    let (&first, mut rest) = src.split_first()?;
    let max = (1u64 << prefix) - 1;
    let mut value = u64::from(first) & max;
    if value < max {
        return Some((value, rest));
    }
    let mut shift = 0;
    loop {
        let (&byte, tail) = rest.split_first()?;
        rest = tail;
        value += u64::from(byte & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return None;
        }
        if byte & 0x80 == 0 {
            return Some((value, rest));
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_as_rfc_7541_c1() {
        // C.1.1: 10 in a 5-bit prefix; C.1.2: 1337; C.1.3: 42 at an octet.
        assert_eq!(integer(&[0x0a], 5), Some((10, &[][..])));
        assert_eq!(
            integer(&[0x1f, 0x9a, 0x0a, 0xff], 5),
            Some((1337, &[0xff][..]))
        );
        assert_eq!(integer(&[0x2a], 8), Some((42, &[][..])));
        // Truncated, and too large.
        assert_eq!(integer(&[0x1f, 0x9a], 5), None);
        assert_eq!(
            integer(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 5),
            None
        );
    }

    #[test]
    fn rfc_7541_examples() {
        // C.2.1: literal with indexing, new name.
        let c21 = b"\x40\x0acustom-key\x0dcustom-header";
        assert_eq!(table_effect(c21), Some(TableEffect::Changes));
        // C.2.2: literal without indexing, indexed name.
        let c22 = b"\x04\x0c/sample/path";
        assert_eq!(table_effect(c22), Some(TableEffect::None));
        // C.2.3: literal never indexed, new name.
        let c23 = b"\x10\x08password\x06secret";
        assert_eq!(table_effect(c23), Some(TableEffect::None));
        // C.2.4: indexed field.
        assert_eq!(table_effect(b"\x82"), Some(TableEffect::None));
        // C.4.2: Huffman-coded literal with indexing after indexed fields.
        let c42 = b"\x82\x86\x84\xbe\x58\x86\xa8\xeb\x10\x64\x9c\xbf";
        assert_eq!(table_effect(c42), Some(TableEffect::Changes));
        // Size update.
        assert_eq!(table_effect(b"\x20\x82"), Some(TableEffect::Changes));
        assert_eq!(table_effect(b""), Some(TableEffect::None));
    }

    #[test]
    fn truncated_blocks_are_not_judged() {
        assert_eq!(table_effect(b"\x04\x0c/sample"), None);
        assert_eq!(table_effect(b"\x10\x08password"), None);
        assert_eq!(table_effect(b"\xff"), None);
    }

    #[test]
    fn agrees_with_a_decoder_on_what_changes_the_table() {
        // Blocks from a real encoder: the first names a new header (indexed),
        // the second repeats it (fully indexed now).
        let mut encoder = loona_hpack::Encoder::new();
        let headers = [(&b"grpc-timeout"[..], &b"5S"[..]), (b":path", b"/a")];
        let first = encoder.encode(headers);
        let second = encoder.encode(headers);
        assert_eq!(table_effect(&first), Some(TableEffect::Changes));
        assert_eq!(table_effect(&second), Some(TableEffect::None));
    }
}
