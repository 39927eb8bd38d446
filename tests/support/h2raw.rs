//! Raw HTTP/2 over a Unix stream, for tests that send what no well-behaved
//! client would: frames built by hand, HPACK written field by field, and
//! what comes back parsed frame by frame.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub mod ty {
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

pub mod flags {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// HTTP/2 error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One frame: 3-byte length, type, flags, 4-byte stream id, payload.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24);
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an N-bit prefix (RFC 7541 5.1); `first` holds the
/// bits above the prefix.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman coding
/// (RFC 7541 6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The header fields of a gRPC request to `path`.
pub fn request_fields(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
}

/// A header block of literal fields.
pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        literal(&mut block, name, value);
    }
    block
}

/// The header block of a gRPC request to `path`.
pub fn request_block(path: &str) -> Vec<u8> {
    block(&request_fields(path))
}

/// A message in gRPC's length-prefixed framing.
pub fn grpc_message(message: &impl prost::Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    pub fn code(&self) -> Option<u32> {
        let at = match self.ty {
            ty::GOAWAY => 4,
            ty::RST_STREAM => 0,
            _ => return None,
        };
        Some(u32::from_be_bytes(
            self.payload.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    /// A GOAWAY's last-stream-id.
    pub fn last_stream(&self) -> Option<u32> {
        (self.ty == ty::GOAWAY).then(|| {
            Some(u32::from_be_bytes(self.payload.get(..4)?.try_into().ok()?) & 0x7fff_ffff)
        })?
    }
}

/// The complete frames in `buf` (a trailing partial frame is left out).
pub fn parse_frames(mut buf: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while buf.len() >= 9 {
        let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
        if buf.len() < 9 + len {
            break;
        }
        frames.push(Frame {
            ty: buf[3],
            flags: buf[4],
            stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
            payload: buf[9..9 + len].to_vec(),
        });
        buf = &buf[9 + len..];
    }
    frames
}

/// Read until the peer closes the connection (EOF or a reset), for at most
/// `timeout`. Returns what was received and how the connection ended.
pub async fn read_until_closed(
    stream: &mut UnixStream,
    timeout: Duration,
) -> Result<(Vec<u8>, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = Vec::new();
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => bail!(
                "the connection is still open after {timeout:?}; received {} bytes: {:?}",
                received.len(),
                parse_frames(&received)
            ),
            Ok(Ok(0)) => return Ok((received, "EOF".into())),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Ok((received, format!("read error: {e}"))),
        }
    }
}

/// A raw client connection that has sent the preface and an empty SETTINGS.
pub struct RawConn {
    pub stream: UnixStream,
    /// Everything received so far.
    pub received: Vec<u8>,
    pings: u64,
}

impl RawConn {
    pub async fn open(socket: &Path) -> Result<RawConn> {
        let mut stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&frame(ty::SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await?;
        Ok(RawConn {
            stream,
            received: Vec::new(),
            pings: 0,
        })
    }

    /// Send bytes; an error (the peer closed) is returned, not a panic.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The frames received so far.
    pub fn frames(&self) -> Vec<Frame> {
        parse_frames(&self.received)
    }

    /// Send a PING and read until its ACK: everything sent before it has
    /// been handled. Fails if the connection closes first.
    pub async fn sync(&mut self, timeout: Duration) -> Result<()> {
        self.pings += 1;
        let payload = (0x5359_4e43_0000_0000u64 + self.pings).to_be_bytes();
        self.send(&frame(ty::PING, 0, 0, &payload))
            .await
            .context("sending PING")?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self
                .frames()
                .iter()
                .any(|f| f.ty == ty::PING && f.flags & flags::ACK != 0 && f.payload == payload)
            {
                return Ok(());
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => bail!("no PING ACK within {timeout:?}: {:?}", self.frames()),
                Ok(Ok(0)) => bail!("the connection closed: {:?}", self.frames()),
                Ok(Ok(n)) => self.received.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => bail!("read error {e}: {:?}", self.frames()),
            }
        }
    }

    /// Read until the peer closes; returns how it ended.
    pub async fn until_closed(&mut self, timeout: Duration) -> Result<String> {
        let (rest, how) = read_until_closed(&mut self.stream, timeout).await?;
        self.received.extend_from_slice(&rest);
        Ok(how)
    }
}
