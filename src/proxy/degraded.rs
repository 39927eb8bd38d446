//! A client connection while the runtime cannot be reached.
//!
//! The proxy then speaks HTTP/2 itself, as little as a server must: its
//! SETTINGS, SETTINGS and PING acknowledgements, and a Trailers-Only
//! UNAVAILABLE answer to every call, at once. That is what a CRI client sees
//! from a runtime that is down (it cannot connect: gRPC UNAVAILABLE), and it
//! never hangs. Each new call first checks whether the runtime is back; once
//! it is, the proxy answers that call, says GOAWAY and closes, and the
//! client's next connection is relayed again.

use std::path::Path;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::debug;

use super::frame::{self, flag, kind, reason, Head};
use super::grpc;

pub(super) async fn serve(
    mut client: UnixStream,
    mut buf: BytesMut,
    runtime: &Path,
    first_error: std::io::Error,
    mut drain: watch::Receiver<bool>,
) {
    let mut error = first_error;
    let mut out = BytesMut::new();
    frame::put_settings(&mut out, &[]);
    let mut last_stream = 0;
    // A new call whose header block has not ended yet.
    let mut opening: Option<u32> = None;
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
                    // Header blocks are not decoded: every call gets the same
                    // answer, and the connection never lives long enough for
                    // its HPACK state to matter.
                    last_stream = head.stream;
                    opening = Some(head.stream);
                }
                _ => {}
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
                if back {
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
