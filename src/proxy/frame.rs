//! HTTP/2 framing (RFC 9113 §4): just enough to walk a byte stream frame by
//! frame, read the few frames the proxy must understand, and write the few it
//! originates. Frame payloads the proxy does not need are never copied or
//! decoded.

use bytes::{BufMut, BytesMut};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Size of a frame header.
pub const HEADER_LEN: usize = 9;

/// The largest frame payload every peer must accept (SETTINGS_MAX_FRAME_SIZE's
/// initial value). Frames the proxy writes itself never exceed it.
pub const DEFAULT_MAX_FRAME: usize = 16_384;

/// The largest frame payload the protocol allows at all (2^24 - 1). A header
/// announcing more is impossible, so reading never buffers more than this.
pub const MAX_FRAME_LIMIT: usize = (1 << 24) - 1;

/// The initial flow-control window of connections and streams (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: i64 = 65_535;

/// The largest flow-control window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// HTTP/2 error codes (RFC 9113 §7) the proxy sends.
pub mod reason {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// The code's name, for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            NO_ERROR => "NO_ERROR",
            PROTOCOL_ERROR => "PROTOCOL_ERROR",
            INTERNAL_ERROR => "INTERNAL_ERROR",
            FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            STREAM_CLOSED => "STREAM_CLOSED",
            FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
            REFUSED_STREAM => "REFUSED_STREAM",
            CANCEL => "CANCEL",
            COMPRESSION_ERROR => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "unknown",
        }
    }
}

pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Parse the 9-byte frame header at the start of `buf`, if it is there.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        Some(Head {
            len: (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]),
            kind: buf[3],
            flags: buf[4],
            // The reserved high bit is ignored on receipt (RFC 9113 §4.1).
            stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Total size of the frame on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len
    }
}

/// Append a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_FRAME_LIMIT);
    out.reserve(HEADER_LEN + len);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

/// Append a header block as HEADERS plus CONTINUATION frames of at most
/// `max_frame` bytes each.
pub fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut first = true;
    if block.is_empty() {
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        put_head(out, 0, kind::HEADERS, flags, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let mut flags = if last { flag::END_HEADERS } else { 0 };
        let k = if first {
            if end_stream {
                flags |= flag::END_STREAM;
            }
            kind::HEADERS
        } else {
            kind::CONTINUATION
        };
        put_head(out, chunk.len(), k, flags, stream);
        out.extend_from_slice(chunk);
        first = false;
    }
}

/// Append DATA frames carrying `data`, split at `max_frame`.
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool, max_frame: usize) {
    if data.is_empty() {
        put_head(
            out,
            0,
            kind::DATA,
            if end_stream { flag::END_STREAM } else { 0 },
            stream,
        );
        return;
    }
    let mut chunks = data.chunks(max_frame.max(1)).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last && end_stream {
            flag::END_STREAM
        } else {
            0
        };
        put_head(out, chunk.len(), kind::DATA, flags, stream);
        out.extend_from_slice(chunk);
    }
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
    out.extend_from_slice(debug);
}

pub fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, 6 * settings.len(), kind::SETTINGS, 0, 0);
    for (id, value) in settings {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn put_ping_ack(out: &mut BytesMut, payload: &[u8]) {
    put_head(out, payload.len(), kind::PING, flag::ACK, 0);
    out.extend_from_slice(payload);
}

/// Iterate over the (id, value) pairs of a SETTINGS payload.
pub fn settings(payload: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    payload.chunks_exact(6).map(|c| {
        (
            u16::from_be_bytes([c[0], c[1]]),
            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
        )
    })
}

/// The payload of a DATA or HEADERS frame without its padding (RFC 9113
/// §6.1, §6.2). `None` if the padding is longer than the payload.
pub fn unpadded(head: &Head, payload: &[u8]) -> Option<std::ops::Range<usize>> {
    if !head.has(flag::PADDED) {
        return Some(0..payload.len());
    }
    let pad = usize::from(*payload.first()?);
    let end = payload.len().checked_sub(pad)?;
    (1 <= end).then_some(1..end)
}

/// The header block fragment of a HEADERS frame: padding and priority fields
/// stripped. `None` if the frame is malformed (padding longer than payload).
pub fn headers_fragment(head: &Head, payload: &[u8]) -> Option<std::ops::Range<usize>> {
    let range = unpadded(head, payload)?;
    let start = range.start + if head.has(flag::PRIORITY) { 5 } else { 0 };
    (start <= range.end).then_some(start..range.end)
}

/// The 31-bit value of a WINDOW_UPDATE or RST_STREAM payload.
pub fn payload_u32(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_roundtrip() {
        let mut b = BytesMut::new();
        put_head(&mut b, 70_000, kind::DATA, flag::END_STREAM, 0x8000_0005);
        let h = Head::parse(&b).unwrap();
        assert_eq!(
            h,
            Head {
                len: 70_000,
                kind: kind::DATA,
                flags: flag::END_STREAM,
                stream: 5
            }
        );
        assert!(Head::parse(&b[..8]).is_none());
    }

    #[test]
    fn headers_split_into_continuations() {
        let block = vec![7u8; 40];
        let mut b = BytesMut::new();
        put_headers(&mut b, 3, &block, true, 16);
        let mut at = 0;
        let mut kinds = vec![];
        let mut total = 0;
        while let Some(h) = Head::parse(&b[at..]) {
            kinds.push((h.kind, h.flags));
            total += h.len;
            at += h.frame_len();
        }
        assert_eq!(total, 40);
        assert_eq!(
            kinds,
            vec![
                (kind::HEADERS, flag::END_STREAM),
                (kind::CONTINUATION, 0),
                (kind::CONTINUATION, flag::END_HEADERS)
            ]
        );
    }

    #[test]
    fn fragment_strips_padding_and_priority() {
        let h = Head {
            len: 0,
            kind: kind::HEADERS,
            flags: flag::PADDED | flag::PRIORITY,
            stream: 1,
        };
        // pad length 2, 5 bytes priority, 3 bytes block, 2 bytes padding
        let payload = [2, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0];
        assert_eq!(headers_fragment(&h, &payload), Some(6..9));
        let bad = [20, 1, 2];
        assert_eq!(headers_fragment(&h, &bad), None);
    }
}
