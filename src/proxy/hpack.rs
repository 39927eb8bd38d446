//! Header blocks: decoding what clients send (HPACK, RFC 7541) and encoding
//! what the proxy sends.
//!
//! The proxy re-encodes every request header block it forwards, and encodes
//! the responses it answers itself, using only literal representations that
//! never touch a dynamic table. That keeps HPACK state trivially in sync: the
//! runtime's decoder never sees an indexed entry it does not know (even though
//! the proxy keeps some client streams to itself), and the client's decoder,
//! whose table the runtime's encoder owns, is never disturbed by a block the
//! proxy injects.

use bytes::BytesMut;

/// An owned header list in wire order.
pub type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, thiserror::Error)]
#[error("malformed header block: {0:?}")]
pub struct DecodeError(loona_hpack::decoder::DecoderError);

/// Decodes one direction of a connection's header blocks.
pub struct Decoder {
    inner: loona_hpack::Decoder<'static>,
}

impl Default for Decoder {
    fn default() -> Self {
        let mut inner = loona_hpack::Decoder::new();
        // The encoder may only grow its table to the receiver's
        // SETTINGS_HEADER_TABLE_SIZE; the runtime's is 4096 by default. Allow
        // generous headroom rather than tracking the setting exactly.
        inner.set_max_allowed_table_size(1 << 16);
        Decoder { inner }
    }
}

impl Decoder {
    /// Decode a complete header block (HEADERS plus CONTINUATION fragments).
    pub fn decode(&mut self, block: &[u8]) -> Result<HeaderList, DecodeError> {
        let mut list = Vec::with_capacity(10);
        self.inner
            .decode_with_cb(block, |n, v| list.push((n.into_owned(), v.into_owned())))
            .map_err(DecodeError)?;
        Ok(list)
    }
}

/// Look up the first header called `name`.
pub fn get<'a>(list: &'a HeaderList, name: &[u8]) -> Option<&'a [u8]> {
    list.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
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
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/runtime.v1.RuntimeService/Version"), (b"x-long", &long)];
        let mut out = BytesMut::new();
        encode(&mut out, headers.iter().copied());
        let decoded = Decoder::default().decode(&out).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(get(&decoded, b":path"), Some(&b"/runtime.v1.RuntimeService/Version"[..]));
        assert_eq!(get(&decoded, b"x-long"), Some(&long[..]));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Decoder::default().decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
