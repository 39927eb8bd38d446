//! Header blocks (HPACK, RFC 7541), one decoder and one encoder per hop.
//!
//! The proxy decodes every header block it receives, from the client and
//! from the runtime, and encodes every block it sends with its own encoder
//! for that peer (see [`super::relay`]): the two hops never share HPACK
//! state, so the proxy can answer calls itself, refuse streams or drop a
//! runtime's block without desynchronising anyone's dynamic table.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// An owned header list in wire order.
pub type HeaderList = Vec<(Bytes, Bytes)>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer overflows")]
    Overflow,
    #[error("table index {0} does not exist")]
    BadIndex(usize),
    #[error("invalid Huffman string")]
    Huffman,
    #[error("table size update to {0} exceeds the allowed maximum")]
    TableTooLarge(usize),
    #[error("table size update after the first field")]
    LateSizeUpdate,
}

/// The dynamic table size every HTTP/2 peer starts with
/// (SETTINGS_HEADER_TABLE_SIZE), and the largest the proxy uses or allows.
pub const DEFAULT_TABLE: usize = 4096;

/// A decoded header block.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The fields, in wire order; empty once `size` passed the limit.
    pub fields: HeaderList,
    /// The block's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC
    /// 9113 §6.5.2: name, value and 32 octets a field).
    pub size: usize,
    /// `size` passed the limit given to [`Decoder::decode_limited`]: the
    /// fields were not kept (the block was still decoded to the end, so the
    /// dynamic table stays in step with the peer's encoder).
    pub too_large: bool,
}

/// Decodes one direction of a connection's header blocks (RFC 7541).
pub struct Decoder {
    /// Newest first, as HPACK indexes it. Fields share their bytes with
    /// the entries they come from (and with the static table's).
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    /// The table size the peer's encoder currently uses.
    max: usize,
    /// The most the peer may set it to: what the proxy advertised as its
    /// SETTINGS_HEADER_TABLE_SIZE.
    allowed: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE,
            allowed: DEFAULT_TABLE,
        }
    }
}

impl Decoder {
    /// Decode a complete header block (HEADERS plus CONTINUATION fragments).
    pub fn decode(&mut self, block: &[u8]) -> Result<HeaderList, DecodeError> {
        Ok(self.decode_limited(block, usize::MAX)?.fields)
    }

    /// Decode a complete header block, keeping its fields only while their
    /// size stays within `limit`.
    pub fn decode_limited(&mut self, block: &[u8], limit: usize) -> Result<Decoded, DecodeError> {
        let mut out = Decoded {
            fields: Vec::with_capacity(10),
            ..Decoded::default()
        };
        self.fields(block, |name, value| {
            out.size = out.size.saturating_add(name.len() + value.len() + 32);
            if out.size > limit {
                if !out.too_large {
                    out.too_large = true;
                    out.fields = Vec::new();
                }
            } else {
                out.fields.push((name.clone(), value.clone()));
            }
        })?;
        Ok(out)
    }

    /// Decode a complete header block, handing each field to `field` in
    /// order instead of collecting them.
    pub fn visit(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        self.fields(block, |name, value| field(name, value))
    }

    fn fields(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&Bytes, &Bytes),
    ) -> Result<(), DecodeError> {
        let mut fields = 0;
        let mut at = 0;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                // Indexed field (§6.1).
                let (index, n) = integer(&block[at..], 7)?;
                at += n;
                let (name, value) = self.entry(index)?;
                field(&name, &value);
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first
                // field, and never above what the proxy advertised.
                if fields > 0 {
                    return Err(DecodeError::LateSizeUpdate);
                }
                let (size, n) = integer(&block[at..], 5)?;
                at += n;
                if size > self.allowed {
                    return Err(DecodeError::TableTooLarge(size));
                }
                self.max = size;
                self.evict(0);
                continue;
            } else {
                // Literal with incremental indexing (§6.2.1), without
                // indexing (§6.2.2) or never indexed (§6.2.3).
                let (indexing, prefix) = if b & 0x40 != 0 { (true, 6) } else { (false, 4) };
                let (index, n) = integer(&block[at..], prefix)?;
                at += n;
                let name = if index == 0 {
                    let (name, n) = string(&block[at..])?;
                    at += n;
                    name
                } else {
                    self.entry(index)?.0
                };
                let (value, n) = string(&block[at..])?;
                at += n;
                field(&name, &value);
                if indexing {
                    self.insert(name, value);
                }
            }
            fields += 1;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(Bytes, Bytes), DecodeError> {
        match index {
            0 => Err(DecodeError::BadIndex(0)),
            1..=61 => Ok((
                Bytes::from_static(STATIC_NAMES[index - 1]),
                Bytes::from_static(static_value(index)),
            )),
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(DecodeError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let entry = name.len() + value.len() + 32;
        self.evict(entry);
        // An entry larger than the whole table empties it and is not added.
        if entry <= self.max {
            self.table.push_front((name, value));
            self.size += entry;
        }
    }

    /// Evict until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

/// RFC 7541 §5.1 integer with an N-bit prefix: (value, bytes used).
fn integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, usize), DecodeError> {
    let max = (1usize << prefix_bits) - 1;
    let first = usize::from(*buf.first().ok_or(DecodeError::Truncated)?) & max;
    if first < max {
        return Ok((first, 1));
    }
    let mut value = max;
    let mut shift = 0;
    for (i, b) in buf.iter().enumerate().skip(1) {
        if shift > 28 {
            return Err(DecodeError::Overflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError::Truncated)
}

/// RFC 7541 §5.2 string literal: (octets, bytes used).
fn string(buf: &[u8]) -> Result<(Bytes, usize), DecodeError> {
    let huffman = buf.first().ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let (len, n) = integer(buf, 7)?;
    let raw = buf.get(n..n + len).ok_or(DecodeError::Truncated)?;
    let value = if huffman {
        let mut out = Vec::with_capacity(len * 8 / 5 + 1);
        httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FiveBits)
            .map_err(|_| DecodeError::Huffman)?;
        // The decoder lets zero padding through; RFC 7541 §5.2 allows only
        // the most significant bits of the EOS code (all ones), fewer than
        // 8. So `raw` must be exactly the decoded codes plus such padding.
        if !padded_with_eos(raw, &out) {
            return Err(DecodeError::Huffman);
        }
        Bytes::from(out)
    } else {
        Bytes::copy_from_slice(raw)
    };
    Ok((value, n + len))
}

/// Whether the Huffman string `raw`, which decoded to `decoded`, is its
/// codes followed by fewer than 8 padding bits, all ones (RFC 7541 §5.2):
/// the one encoding of `decoded`.
fn padded_with_eos(raw: &[u8], decoded: &[u8]) -> bool {
    let table = &httlib_huffman::encoder::table::ENCODE_TABLE;
    let bits: usize = decoded
        .iter()
        .map(|&b| usize::from(table[usize::from(b)].0))
        .sum();
    if raw.len() != bits.div_ceil(8) {
        return false;
    }
    let pad = raw.len() * 8 - bits;
    let mask = ((1u16 << pad) - 1) as u8;
    raw.last().is_none_or(|&last| last & mask == mask)
}

/// Encodes one direction of a connection's header blocks. Repeated fields
/// (the method path, content type, user agent of a CRI client's calls; the
/// status and content type of answers) become one-byte table references.
/// The proxy is the only encoder toward that peer on its connection, so the
/// table here mirrors the peer's decoder exactly.
pub struct Encoder {
    /// Newest first, as HPACK indexes it.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    /// The table size in use: the peer's SETTINGS_HEADER_TABLE_SIZE, at most
    /// [`DEFAULT_TABLE`]. It only ever shrinks.
    max: usize,
    /// The peer lowered its table size: the next block must open with a
    /// dynamic table size update (RFC 7541 §4.2).
    pending_update: bool,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            table: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE,
            pending_update: false,
        }
    }
}

/// Fields whose value changes on every call are never worth a table entry.
fn never_index(name: &[u8]) -> bool {
    name == b"grpc-timeout" || name == b"grpc-message" || name.ends_with(b"-bin")
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE.
    pub fn set_peer_max(&mut self, size: u32) {
        let size = (size as usize).min(DEFAULT_TABLE);
        if size < self.max {
            self.max = size;
            self.evict(0);
            self.pending_update = true;
        }
    }

    /// Encode `headers` as one header block.
    pub fn encode(&mut self, out: &mut BytesMut, headers: &HeaderList) {
        if self.pending_update {
            self.pending_update = false;
            put_integer(out, self.max, 5, 0x20);
        }
        for (name, value) in headers {
            self.field(out, name, value);
        }
    }

    fn field(&mut self, out: &mut BytesMut, name: &Bytes, value: &Bytes) {
        if let Some(i) = static_full(name, value) {
            put_integer(out, i, 7, 0x80);
            return;
        }
        if let Some(pos) = self.table.iter().position(|(n, v)| v == value && n == name) {
            put_integer(out, STATIC_NAMES.len() + 1 + pos, 7, 0x80);
            return;
        }
        let name_index = STATIC_NAMES.iter().position(|n| *n == name).map(|i| i + 1);
        let entry = name.len() + value.len() + 32;
        if never_index(name) || entry > self.max / 4 {
            // Literal without indexing (§6.2.2).
            match name_index {
                Some(i) => put_integer(out, i, 4, 0x00),
                None => {
                    out.extend_from_slice(&[0x00]);
                    put_string(out, name);
                }
            }
            put_string(out, value);
            return;
        }
        // Literal with incremental indexing (§6.2.1).
        match name_index {
            Some(i) => put_integer(out, i, 6, 0x40),
            None => {
                out.extend_from_slice(&[0x40]);
                put_string(out, name);
            }
        }
        put_string(out, value);
        self.evict(entry);
        self.table.push_front((name.clone(), value.clone()));
        self.size += entry;
    }

    /// Evict until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

/// HPACK's static table (RFC 7541 Appendix A), names only; index = position + 1.
const STATIC_NAMES: [&[u8]; 61] = [
    b":authority",
    b":method",
    b":method",
    b":path",
    b":path",
    b":scheme",
    b":scheme",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b"accept-charset",
    b"accept-encoding",
    b"accept-language",
    b"accept-ranges",
    b"accept",
    b"access-control-allow-origin",
    b"age",
    b"allow",
    b"authorization",
    b"cache-control",
    b"content-disposition",
    b"content-encoding",
    b"content-language",
    b"content-length",
    b"content-location",
    b"content-range",
    b"content-type",
    b"cookie",
    b"date",
    b"etag",
    b"expect",
    b"expires",
    b"from",
    b"host",
    b"if-match",
    b"if-modified-since",
    b"if-none-match",
    b"if-range",
    b"if-unmodified-since",
    b"last-modified",
    b"link",
    b"location",
    b"max-forwards",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"range",
    b"referer",
    b"refresh",
    b"retry-after",
    b"server",
    b"set-cookie",
    b"strict-transport-security",
    b"transfer-encoding",
    b"user-agent",
    b"vary",
    b"via",
    b"www-authenticate",
];

/// Values of the static table's entries (most are empty).
fn static_value(index: usize) -> &'static [u8] {
    match index {
        2 => b"GET",
        3 => b"POST",
        4 => b"/",
        5 => b"/index.html",
        6 => b"http",
        7 => b"https",
        8 => b"200",
        9 => b"204",
        10 => b"206",
        11 => b"304",
        12 => b"400",
        13 => b"404",
        14 => b"500",
        16 => b"gzip, deflate",
        _ => b"",
    }
}

/// Static entries with values that a gRPC request can match exactly.
fn static_full(name: &[u8], value: &[u8]) -> Option<usize> {
    match (name, value) {
        (b":method", b"GET") => Some(2),
        (b":method", b"POST") => Some(3),
        (b":path", b"/") => Some(4),
        (b":scheme", b"http") => Some(6),
        (b":scheme", b"https") => Some(7),
        (b":status", b"200") => Some(8),
        _ => None,
    }
}

/// Look up the first header called `name`.
pub fn get<'a>(list: &'a HeaderList, name: &[u8]) -> Option<&'a [u8]> {
    list.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_ref())
}

/// Encode headers as "literal without indexing, new name" (RFC 7541 §6.2.2),
/// without Huffman coding.
pub fn encode<'a>(out: &mut BytesMut, headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
    for (name, value) in headers {
        out.reserve(2 + name.len() + value.len() + 10);
        out.extend_from_slice(&[0x00]);
        put_string(out, name);
        put_string(out, value);
    }
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1 integer with an N-bit prefix.
fn put_integer(out: &mut BytesMut, mut value: usize, prefix_bits: u8, first_byte_flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.extend_from_slice(&[first_byte_flags | value as u8]);
        return;
    }
    out.extend_from_slice(&[first_byte_flags | max as u8]);
    value -= max;
    while value >= 128 {
        out.extend_from_slice(&[(value % 128 + 128) as u8]);
        value /= 128;
    }
    out.extend_from_slice(&[value as u8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_roundtrips_long_values() {
        let long = vec![b'x'; 300];
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/runtime.v1.RuntimeService/Version"),
            (b"x-long", &long),
        ];
        let mut out = BytesMut::new();
        encode(&mut out, headers.iter().copied());
        let decoded = Decoder::default().decode(&out).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(
            get(&decoded, b":path"),
            Some(&b"/runtime.v1.RuntimeService/Version"[..])
        );
        assert_eq!(get(&decoded, b"x-long"), Some(&long[..]));
    }

    #[test]
    fn encoder_indexes_repeats_and_can_drop_its_table() {
        let headers: HeaderList = vec![
            (
                Bytes::from_static(b":path"),
                Bytes::from_static(b"/runtime.v1.RuntimeService/Version"),
            ),
            (
                Bytes::from_static(b"user-agent"),
                Bytes::from_static(b"kubelet"),
            ),
        ];
        let mut many = headers.clone();
        many.push((Bytes::from_static(b":method"), Bytes::from_static(b"POST")));
        many.push((
            Bytes::from_static(b"grpc-timeout"),
            Bytes::from_static(b"1999m"),
        ));
        many.push((Bytes::from_static(b"x-custom"), Bytes::from_static(b"v")));
        for _ in 0..3 {
            let mut b = BytesMut::new();
            Encoder::default().encode(&mut b, &many);
            assert_eq!(Decoder::default().decode(&b).unwrap(), many);
        }
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut first = BytesMut::new();
        enc.encode(&mut first, &headers);
        let mut second = BytesMut::new();
        enc.encode(&mut second, &headers);
        assert_eq!(second.len(), 2, "repeats are table references");
        assert_eq!(dec.decode(&first).unwrap(), headers);
        assert_eq!(dec.decode(&second).unwrap(), headers);
        let mut third = BytesMut::new();
        enc.set_peer_max(0);
        enc.encode(&mut third, &headers);
        assert_eq!(third[0], 0x20);
        assert_eq!(dec.decode(&third).unwrap(), headers);
    }

    #[test]
    fn encoder_and_decoder_stay_in_sync_through_evictions() {
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        for i in 0..500u32 {
            let headers: HeaderList = vec![
                (Bytes::from_static(b":method"), Bytes::from_static(b"POST")),
                (
                    Bytes::from_static(b":path"),
                    Bytes::from(format!("/svc/M{}", i % 37)),
                ),
                (
                    Bytes::from(format!("x-key-{}", i % 11)),
                    Bytes::from(vec![b'v'; (i % 300) as usize]),
                ),
                (
                    Bytes::from_static(b"grpc-timeout"),
                    Bytes::from(format!("{i}m")),
                ),
            ];
            let mut b = BytesMut::new();
            if i == 400 {
                enc.set_peer_max(1024);
            }
            enc.encode(&mut b, &headers);
            assert_eq!(dec.decode(&b).unwrap(), headers, "block {i}");
        }
    }

    /// RFC 7541 Appendix C.4: requests with Huffman coding, one connection.
    #[test]
    fn rfc7541_c4_huffman_requests() {
        let mut dec = Decoder::default();
        let first = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        let list = dec.decode(&first).unwrap();
        assert_eq!(
            list,
            vec![
                (Bytes::from_static(b":method"), Bytes::from_static(b"GET")),
                (Bytes::from_static(b":scheme"), Bytes::from_static(b"http")),
                (Bytes::from_static(b":path"), Bytes::from_static(b"/")),
                (
                    Bytes::from_static(b":authority"),
                    Bytes::from_static(b"www.example.com")
                ),
            ]
        );
        let second = hex("828684be5886a8eb10649cbf");
        let list = dec.decode(&second).unwrap();
        assert_eq!(get(&list, b":authority"), Some(&b"www.example.com"[..]));
        assert_eq!(get(&list, b"cache-control"), Some(&b"no-cache"[..]));
    }

    /// An independent encoder (with its own dynamic table) must be understood.
    #[test]
    fn decodes_an_independent_encoder() {
        let mut theirs = loona_hpack::Encoder::new();
        let mut dec = Decoder::default();
        for i in 0..200 {
            let fields: HeaderList = vec![
                (Bytes::from_static(b":method"), Bytes::from_static(b"POST")),
                (
                    Bytes::from_static(b":path"),
                    Bytes::from(format!("/runtime.v1.RuntimeService/M{}", i % 7)),
                ),
                (
                    Bytes::from(format!("x-{}", i % 13)),
                    Bytes::from(format!("value-{}", i % 5)),
                ),
            ];
            let block = theirs.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            assert_eq!(dec.decode(&block).unwrap(), fields);
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7541 §5.2: padding longer than 7 bits, or not the EOS prefix
    /// (ones), is a decoding error.
    #[test]
    fn huffman_padding_must_be_short_and_ones() {
        // "a" is 00011 (5 bits): 0x1f pads with three 1 bits.
        let literal = |s: &[u8]| {
            let mut b = vec![0x00, 0x01, b'x', 0x80 | s.len() as u8];
            b.extend_from_slice(s);
            b
        };
        let list = Decoder::default().decode(&literal(&[0x1f])).unwrap();
        assert_eq!(
            list,
            vec![(Bytes::from_static(b"x"), Bytes::from_static(b"a"))]
        );
        // Zero padding.
        assert_eq!(
            Decoder::default().decode(&literal(&[0x18])),
            Err(DecodeError::Huffman)
        );
        // A whole byte of padding after a full code.
        assert_eq!(
            Decoder::default().decode(&literal(&[0x1f, 0xff])),
            Err(DecodeError::Huffman)
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Decoder::default()
            .decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
            .is_err());
    }
}
