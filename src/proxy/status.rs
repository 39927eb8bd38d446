//! The runtime's response header blocks, followed only to learn each call's
//! `grpc-status` for the metrics (see [`crate::metrics`]).
//!
//! The frames themselves pass to the client untouched; this only keeps a
//! copy of the client's HPACK decoder state (the runtime's encoder owns that
//! table, and blocks the proxy injects never touch it) and reads the status
//! out of each block. With metrics off none of this runs.

use bytes::BytesMut;
use tracing::debug;

use super::frame::{self, flag, kind, Head};
use super::hpack;

/// A response header block that ended (END_HEADERS).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Block {
    pub stream: u32,
    /// The block's HEADERS frame ended the stream: trailers, or a
    /// Trailers-Only response.
    pub end_stream: bool,
    /// Its `grpc-status`, if it had one.
    pub status: Option<tonic::Code>,
}

/// Follows one connection's response header blocks.
#[derive(Default)]
pub(super) struct Responses {
    decoder: hpack::Decoder,
    /// A block spread over HEADERS and CONTINUATION frames.
    pending: Option<(u32, bool, BytesMut)>,
    /// A block could not be decoded, so the table is lost: statuses are
    /// unknown from then on (the client's own decoder has failed too).
    lost: bool,
}

impl Responses {
    /// A HEADERS, PUSH_PROMISE or CONTINUATION frame from the runtime;
    /// returns the block it completes, if any.
    pub(super) fn frame(&mut self, head: &Head, payload: &[u8]) -> Option<Block> {
        let (stream, end_stream, fragment) = match head.kind {
            kind::HEADERS => {
                let fragment = frame::headers_fragment(head, payload).map(|r| &payload[r]);
                if fragment.is_none() {
                    self.lose("bad HEADERS padding");
                }
                (
                    head.stream,
                    head.has(flag::END_STREAM),
                    fragment.unwrap_or_default(),
                )
            }
            kind::CONTINUATION => match self.pending.take() {
                Some((stream, end_stream, mut block)) => {
                    block.extend_from_slice(payload);
                    if !head.has(flag::END_HEADERS) {
                        self.pending = Some((stream, end_stream, block));
                        return None;
                    }
                    let status = self.status(&block);
                    return Some(Block {
                        stream,
                        end_stream,
                        status,
                    });
                }
                None => {
                    self.lose("CONTINUATION without HEADERS");
                    return None;
                }
            },
            _ => {
                // The client refuses pushes (gRPC clients disable them), so
                // this ends the connection; its block is not followed.
                self.lose("PUSH_PROMISE");
                return None;
            }
        };
        if !head.has(flag::END_HEADERS) {
            self.pending = Some((stream, end_stream, BytesMut::from(fragment)));
            return None;
        }
        let status = self.status(fragment);
        Some(Block {
            stream,
            end_stream,
            status,
        })
    }

    fn status(&mut self, block: &[u8]) -> Option<tonic::Code> {
        if self.lost {
            return None;
        }
        let mut status = None;
        let decoded = self.decoder.visit(block, |name, value| {
            if name == b"grpc-status" {
                status = Some(tonic::Code::from_bytes(value));
            }
        });
        if let Err(e) = decoded {
            self.lose(&e.to_string());
        }
        status
    }

    fn lose(&mut self, why: &str) {
        if !self.lost {
            debug!(
                why,
                "cannot follow the runtime's response headers; call codes count as UNKNOWN"
            );
            self.lost = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(kind: u8, flags: u8, stream: u32, len: usize) -> Head {
        Head {
            len,
            kind,
            flags,
            stream,
        }
    }

    /// Blocks from an independent encoder with a dynamic table (as the
    /// runtime's), one split over CONTINUATION frames.
    #[test]
    fn reads_statuses_through_the_dynamic_table() {
        let mut enc = loona_hpack::Encoder::new();
        let mut r = Responses::default();
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":status", b"200"), (b"content-type", b"application/grpc")];
        for (stream, code) in [(1u32, "0"), (3, "5"), (5, "14")] {
            let block = enc.encode(headers.iter().copied());
            let got = r.frame(
                &head(kind::HEADERS, flag::END_HEADERS, stream, block.len()),
                &block,
            );
            assert_eq!(
                got,
                Some(Block {
                    stream,
                    end_stream: false,
                    status: None
                })
            );
            let trailers = enc.encode([
                (&b"grpc-status"[..], code.as_bytes()),
                (b"grpc-message", b"some message"),
            ]);
            let (first, rest) = trailers.split_at(trailers.len() / 2);
            assert_eq!(
                r.frame(
                    &head(kind::HEADERS, flag::END_STREAM, stream, first.len()),
                    first
                ),
                None
            );
            let got = r.frame(
                &head(kind::CONTINUATION, flag::END_HEADERS, stream, rest.len()),
                rest,
            );
            assert_eq!(
                got,
                Some(Block {
                    stream,
                    end_stream: true,
                    status: Some(tonic::Code::from_bytes(code.as_bytes()))
                })
            );
        }
        // Trailers-Only.
        let block = enc.encode([(&b":status"[..], &b"200"[..]), (b"grpc-status", b"12")]);
        assert_eq!(
            r.frame(
                &head(
                    kind::HEADERS,
                    flag::END_HEADERS | flag::END_STREAM,
                    7,
                    block.len()
                ),
                &block
            ),
            Some(Block {
                stream: 7,
                end_stream: true,
                status: Some(tonic::Code::Unimplemented)
            })
        );
    }

    #[test]
    fn a_broken_block_loses_the_table_but_still_ends_streams() {
        let mut r = Responses::default();
        let garbage = [0xffu8; 6];
        let got = r.frame(
            &head(
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                1,
                garbage.len(),
            ),
            &garbage,
        );
        assert_eq!(
            got,
            Some(Block {
                stream: 1,
                end_stream: true,
                status: None
            })
        );
        let mut ok = BytesMut::new();
        hpack::encode(&mut ok, [(&b"grpc-status"[..], &b"0"[..])]);
        let got = r.frame(
            &head(
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                3,
                ok.len(),
            ),
            &ok,
        );
        assert_eq!(got.map(|b| b.status), Some(None));
    }
}
