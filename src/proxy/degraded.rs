//! A client connection while the runtime cannot be reached.
//!
//! The proxy then speaks HTTP/2 itself, as little as a server must: its
//! SETTINGS, SETTINGS and PING acknowledgements, and a Trailers-Only
//! UNAVAILABLE answer to every call, at once. That is what a CRI client sees
//! from a runtime that is down (it cannot connect: gRPC UNAVAILABLE), and it
//! never hangs. Each new call first checks whether the runtime is back; once
//! it is, the proxy answers that call, says GOAWAY and closes, and the
//! client's next connection is relayed again.
//!
//! With metrics on, header blocks are decoded after all, only to count each
//! call under its method.

use std::path::Path;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::debug;

use super::frame::{self, flag, kind, reason, Head};
use super::{grpc, hpack};
use crate::metrics::Metrics;

pub(super) async fn serve(
    mut client: UnixStream,
    mut buf: BytesMut,
    runtime: &Path,
    first_error: std::io::Error,
    metrics: &Metrics,
    mut drain: watch::Receiver<bool>,
) {
    let mut error = first_error;
    let mut out = BytesMut::new();
    frame::put_settings(&mut out, &[]);
    let mut last_stream = 0;
    // A new call whose header block has not ended yet.
    let mut opening: Option<u32> = None;
    let mut methods = metrics.enabled().then(Methods::default);
    loop {
        let mut close = false;
        while let Some(head) = Head::parse(&buf) {
            if buf.len() < head.frame_len() {
                break;
            }
            let payload = &buf[frame::HEADER_LEN..head.frame_len()];
            match head.kind {
                kind::SETTINGS if !head.has(flag::ACK) => frame::put_settings_ack(&mut out),
                kind::PING if !head.has(flag::ACK) => frame::put_ping_ack(&mut out, payload),
                kind::DATA if head.len > 0 => {
                    frame::put_window_update(&mut out, 0, head.len as u32)
                }
                kind::GOAWAY => close = true,
                kind::HEADERS if head.stream > last_stream && head.stream % 2 == 1 => {
                    // Header blocks are not decoded for the answer: every
                    // call gets the same one, and the connection never lives
                    // long enough for its HPACK state to matter.
                    last_stream = head.stream;
                    opening = Some(head.stream);
                }
                _ => {}
            }
            if let Some(m) = &mut methods {
                m.frame(&head, payload);
            }
            let block_ended = matches!(head.kind, kind::HEADERS | kind::CONTINUATION)
                && head.has(flag::END_HEADERS);
            buf.advance(head.frame_len());
            if let Some(stream) = opening.take_if(|_| block_ended) {
                let back = match UnixStream::connect(runtime).await {
                    Ok(_) => true,
                    Err(e) => {
                        error = e;
                        false
                    }
                };
                let status = tonic::Status::unavailable(if back {
                    format!(
                        "sidecar-shim: the container runtime at {} is back; reconnect",
                        runtime.display()
                    )
                } else {
                    format!(
                        "sidecar-shim: cannot reach the container runtime at {}: {error}",
                        runtime.display()
                    )
                });
                debug!(stream, back, "answering while the runtime was unreachable");
                let block = grpc::status_block(&status, true);
                frame::put_headers(&mut out, stream, &block, true, frame::DEFAULT_MAX_FRAME);
                if let Some(m) = &mut methods {
                    metrics.call(&m.path, status.code(), m.since.elapsed());
                }
                if back {
                    metrics.runtime_reachable();
                    frame::put_goaway(&mut out, last_stream, reason::NO_ERROR, b"runtime is back");
                    close = true;
                    break;
                }
            }
        }
        if !out.is_empty() {
            if client.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            client.shutdown().await.ok();
            return;
        }
        let need = Head::parse(&buf).map_or(frame::HEADER_LEN, |h| h.frame_len());
        buf.reserve(need.max(4096));
        tokio::select! {
            r = client.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            r = drain.changed() => {
                if r.is_err() || *drain.borrow() {
                    let mut out = BytesMut::new();
                    frame::put_goaway(&mut out, last_stream, reason::NO_ERROR, b"sidecar-shim shutting down");
                    client.write_all(&out).await.ok();
                    return;
                }
            }
        }
    }
}

/// Follows the client's header blocks to learn each call's method (with
/// metrics on only).
struct Methods {
    decoder: Option<hpack::Decoder>,
    block: BytesMut,
    /// The `:path` of the last block that ended, and when it began.
    path: String,
    since: Instant,
}

impl Default for Methods {
    fn default() -> Self {
        Methods {
            decoder: Some(hpack::Decoder::default()),
            block: BytesMut::new(),
            path: String::new(),
            since: Instant::now(),
        }
    }
}

impl Methods {
    fn frame(&mut self, head: &Head, payload: &[u8]) {
        match head.kind {
            kind::HEADERS => {
                self.block.clear();
                self.since = Instant::now();
                match frame::headers_fragment(head, payload) {
                    Some(r) => self.block.extend_from_slice(&payload[r]),
                    None => self.decoder = None,
                }
            }
            kind::CONTINUATION => self.block.extend_from_slice(payload),
            _ => return,
        }
        if !head.has(flag::END_HEADERS) {
            return;
        }
        self.path.clear();
        let decoded = self.decoder.as_mut().map(|d| {
            d.visit(&self.block, |name, value| {
                if name == b":path" {
                    self.path.push_str(&String::from_utf8_lossy(value));
                }
            })
        });
        if let Some(Err(_)) = decoded {
            // Its table is lost: methods are unknown from now on.
            self.decoder = None;
        }
    }
}
