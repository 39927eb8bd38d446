//! Decoding speed of the proxy's HPACK decoder (src/proxy/hpack.rs) against
//! loona-hpack's on typical CRI request header blocks, one connection's
//! worth of calls at a time. A plain timing loop (no criterion): run it with
//! `cargo bench --bench hpack` (a release build).
//!
//! The blocks: a kubelet's unary calls (pseudo-headers, content-type,
//! user-agent, te, a grpc-timeout that changes every call), encoded three
//! ways: by the proxy's own encoder (what the runtime's side of the proxy
//! sees: repeated fields become table references), by loona-hpack's encoder
//! (table references, no Huffman), and as grpc-go writes them (table
//! references, strings Huffman-coded).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sidecar_shim::proxy::hpack::{self, HeaderList};

const CALLS: usize = 1000;

fn request(i: usize) -> HeaderList {
    let methods = [
        "/runtime.v1.RuntimeService/ListContainers",
        "/runtime.v1.RuntimeService/ContainerStatus",
        "/runtime.v1.RuntimeService/ListPodSandbox",
        "/runtime.v1.ImageService/ImageFsInfo",
    ];
    vec![
        (Bytes::from_static(b":method"), Bytes::from_static(b"POST")),
        (Bytes::from_static(b":scheme"), Bytes::from_static(b"http")),
        (
            Bytes::from_static(b":path"),
            Bytes::from_static(methods[i % methods.len()].as_bytes()),
        ),
        (
            Bytes::from_static(b":authority"),
            Bytes::from_static(b"%2Frun%2Fsidecar-shim%2Fsidecar-shim.sock"),
        ),
        (
            Bytes::from_static(b"content-type"),
            Bytes::from_static(b"application/grpc"),
        ),
        (
            Bytes::from_static(b"user-agent"),
            Bytes::from_static(b"grpc-go/1.65.0"),
        ),
        (Bytes::from_static(b"te"), Bytes::from_static(b"trailers")),
        (
            Bytes::from_static(b"grpc-timeout"),
            Bytes::from(format!("{}u", 1_999_000 + i * 7)),
        ),
    ]
}

fn put_integer(out: &mut Vec<u8>, mut value: usize, prefix: u8, flags: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

fn get_integer(buf: &[u8], prefix: u8) -> (usize, usize) {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(buf[0]) & max;
    if value < max {
        return (value, 1);
    }
    let (mut i, mut shift) = (1, 0);
    loop {
        value += usize::from(buf[i] & 0x7f) << shift;
        shift += 7;
        i += 1;
        if buf[i - 1] & 0x80 == 0 {
            return (value, i);
        }
    }
}

/// The same block with its string literals Huffman-coded.
fn huffman_coded(block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    let string = |at: &mut usize, out: &mut Vec<u8>| {
        let (len, n) = get_integer(&block[*at..], 7);
        let raw = &block[*at + n..*at + n + len];
        let mut coded = Vec::new();
        httlib_huffman::encode(raw, &mut coded).expect("encodes");
        put_integer(out, coded.len(), 7, 0x80);
        out.extend_from_slice(&coded);
        *at += n + len;
    };
    while at < block.len() {
        let b = block[at];
        let (prefix, flags) = match b {
            _ if b & 0x80 != 0 => (7, 0x80),
            _ if b & 0xc0 == 0x40 => (6, 0x40),
            _ if b & 0xe0 == 0x20 => (5, 0x20),
            _ => (4, b & 0xf0),
        };
        let (index, n) = get_integer(&block[at..], prefix);
        put_integer(&mut out, index, prefix, flags);
        at += n;
        if prefix == 7 || prefix == 5 {
            continue;
        }
        if index == 0 {
            string(&mut at, &mut out);
        }
        string(&mut at, &mut out);
    }
    out
}

/// Best of `rounds` runs of decoding every block in order on a fresh
/// decoder, per block.
fn time(rounds: usize, mut run: impl FnMut()) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed());
    }
    best / CALLS as u32
}

fn main() {
    let lists: Vec<HeaderList> = (0..CALLS).map(request).collect();
    let mut ours_enc = hpack::Encoder::default();
    let ours_blocks: Vec<Vec<u8>> = lists
        .iter()
        .map(|l| {
            let mut b = BytesMut::new();
            ours_enc.encode(&mut b, l);
            b.to_vec()
        })
        .collect();
    let mut loona_enc = loona_hpack::Encoder::new();
    let loona_blocks: Vec<Vec<u8>> = lists
        .iter()
        .map(|l| loona_enc.encode(l.iter().map(|(n, v)| (&n[..], &v[..]))))
        .collect();
    let huffman_blocks: Vec<Vec<u8>> = loona_blocks.iter().map(|b| huffman_coded(b)).collect();
    // The first block of a connection: every field a literal.
    let first_plain = vec![loona_blocks[0].clone(); CALLS];
    let first_huffman = vec![huffman_blocks[0].clone(); CALLS];

    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "blocks (1000 calls, one connection)", "ours", "loona-hpack", "bytes"
    );
    let sets: [(&str, &Vec<Vec<u8>>, bool); 5] = [
        ("our encoder's (runtime hop)", &ours_blocks, true),
        ("loona's encoder, plain", &loona_blocks, true),
        ("grpc-go style, Huffman", &huffman_blocks, true),
        ("first block, plain literals", &first_plain, false),
        ("first block, Huffman literals", &first_huffman, false),
    ];
    for (name, blocks, stream) in sets {
        let bytes: usize = blocks.iter().map(Vec::len).sum::<usize>() / blocks.len();
        let ours = time(50, || {
            let mut d = hpack::Decoder::default();
            for b in blocks.iter() {
                if !stream {
                    d = hpack::Decoder::default();
                }
                black_box(d.decode_limited(b, 64 * 1024).expect("decodes"));
            }
        });
        let theirs = time(50, || {
            let mut d = loona_hpack::Decoder::new();
            for b in blocks.iter() {
                if !stream {
                    d = loona_hpack::Decoder::new();
                }
                black_box(d.decode(b).expect("decodes"));
            }
        });
        println!("{name:<44} {ours:>12.2?} {theirs:>12.2?} {bytes:>8}");
    }
    // Both decode the same.
    let mut a = hpack::Decoder::default();
    let mut b = loona_hpack::Decoder::new();
    for block in &huffman_blocks {
        let ours: Vec<(Vec<u8>, Vec<u8>)> = a
            .decode(block)
            .expect("ours")
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(ours, b.decode(block).expect("theirs"));
    }
}
