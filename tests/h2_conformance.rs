//! HTTP/2 conformance of the shim's client side, with raw frames, against
//! the shim in front of a real containerd: every malformed frame or header
//! block gets the connection error (GOAWAY with its code, then the
//! connection closes) or the stream error (RST_STREAM with its code, the
//! connection goes on) that RFC 9113 and RFC 7541 name for it, at once; what
//! the RFCs say to ignore is ignored. The cases follow the sections of the
//! RFCs (and the numbering of the h2spec conformance tester, which covers
//! the same ground). A header block that never ends is refused at the
//! advertised SETTINGS_MAX_HEADER_LIST_SIZE without growing the shim's
//! memory.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use support::h2raw::*;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(10);

const START: &str = "/runtime.v1.RuntimeService/StartContainer";
const VERSION: &str = "/runtime.v1.RuntimeService/Version";

/// The largest header block the shim accepts (its advertised
/// SETTINGS_MAX_HEADER_LIST_SIZE).
const MAX_HEADER_LIST_SIZE: usize = 64 * 1024;

/// What the shim must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// GOAWAY with this code, then the connection closes.
    Conn(u32),
    /// RST_STREAM on this stream with this code; the connection goes on.
    Stream(u32, u32),
    /// Nothing: no GOAWAY, no RST_STREAM, the connection goes on.
    Ignored,
}

struct Case {
    name: &'static str,
    frames: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, frames: Vec<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        frames: frames.concat(),
        expect,
    }
}

fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
    frame(ty::HEADERS, flags, stream, block)
}

/// A request's HEADERS that leaves the stream open (no END_STREAM).
fn open(stream: u32, path: &str) -> Vec<u8> {
    headers(stream, flags::END_HEADERS, &request_block(path))
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(ty::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(ty::SETTINGS, 0, 0, &payload)
}

/// A request block whose fields are replaced by `fields`.
fn request_with(fields: &[(&str, &str)]) -> Vec<u8> {
    headers(1, flags::END_HEADERS | flags::END_STREAM, &block(fields))
}

/// A request block with one more literal field whose value is a Huffman
/// string of the given raw bytes (RFC 7541 §5.2).
fn request_with_huffman(raw: &[u8]) -> Vec<u8> {
    let mut b = request_block(VERSION);
    b.push(0);
    hpack_int(&mut b, 0, 7, 1);
    b.push(b'x');
    hpack_int(&mut b, 0x80, 7, raw.len());
    b.extend_from_slice(raw);
    headers(1, flags::END_HEADERS | flags::END_STREAM, &b)
}

/// Run one case on a fresh connection and check the shim's answer.
async fn check(socket: &Path, case: &Case) -> Result<()> {
    let mut conn = RawConn::open(socket).await?;
    conn.sync(TIMEOUT).await.context("before the case")?;
    let before = conn.frames().len();
    // The shim may close while we write (a connection error): that is for
    // the checks below to judge.
    let _ = conn.send(&case.frames).await;
    match case.expect {
        Expect::Conn(code) => {
            let how = conn.until_closed(TIMEOUT).await?;
            let frames = conn.frames();
            let goaway = frames[before..]
                .iter()
                .find(|f| f.ty == ty::GOAWAY)
                .with_context(|| format!("no GOAWAY before the close ({how}): {frames:?}"))?;
            ensure!(
                goaway.code() == Some(code),
                "GOAWAY code {:?}, want {code:#x}: {goaway:?} ({})",
                goaway.code(),
                String::from_utf8_lossy(&goaway.payload[8..])
            );
        }
        Expect::Stream(stream, code) => {
            conn.sync(TIMEOUT)
                .await
                .context("the connection must go on after a stream error")?;
            let frames = conn.frames();
            let rst = frames[before..]
                .iter()
                .find(|f| f.ty == ty::RST_STREAM && f.stream == stream)
                .with_context(|| format!("no RST_STREAM on stream {stream}: {frames:?}"))?;
            ensure!(
                rst.code() == Some(code),
                "RST_STREAM code {:?}, want {code:#x}",
                rst.code()
            );
            ensure!(
                !frames.iter().any(|f| f.ty == ty::GOAWAY),
                "GOAWAY after a stream error: {frames:?}"
            );
        }
        Expect::Ignored => {
            conn.sync(TIMEOUT)
                .await
                .context("the connection must go on")?;
            let frames = conn.frames();
            ensure!(
                !frames[before..]
                    .iter()
                    .any(|f| f.ty == ty::GOAWAY || f.ty == ty::RST_STREAM),
                "{frames:?}"
            );
        }
    }
    Ok(())
}

/// Run every case on `socket`, reporting all failures at once.
async fn check_all(socket: &Path, cases: &[Case]) -> Result<()> {
    let mut failed = Vec::new();
    for case in cases {
        if let Err(e) = check(socket, case).await {
            failed.push(format!("{}: {e:#}", case.name));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} cases failed:\n{}",
            failed.len(),
            cases.len(),
            failed.join("\n")
        );
    }
    eprintln!("{} cases passed", cases.len());
    Ok(())
}

async fn shim() -> Result<(PrivateContainerd, ShimProcess)> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    Ok((containerd, shim))
}

/// After all the cases: the shim still runs and serves.
async fn still_serving(shim: &mut ShimProcess) -> Result<()> {
    ensure!(shim.try_status()?.is_none(), "the shim exited");
    let (mut rt, _) = shim.cri();
    let v = rt
        .version(k8s_cri::v1::VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    ensure!(v.runtime_name == "containerd", "{v:?}");
    Ok(())
}

#[tokio::test]
async fn malformed_frames_are_connection_errors_with_their_code() -> Result<()> {
    use code::*;
    let (_containerd, mut shim) = shim().await?;
    let big = vec![0u8; 16_385];
    let cases = vec![
        // RFC 9113 §6.9, §6.9.1: WINDOW_UPDATE.
        case(
            "6.9 connection WINDOW_UPDATE of 0",
            vec![window_update(0, 0)],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.9 WINDOW_UPDATE of 3 bytes",
            vec![frame(ty::WINDOW_UPDATE, 0, 0, &[0, 0, 1])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "6.9 WINDOW_UPDATE of 5 bytes",
            vec![frame(ty::WINDOW_UPDATE, 0, 0, &[0, 0, 0, 1, 0])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "6.9.1 connection window above 2^31-1",
            vec![window_update(0, 0x7fff_ffff)],
            Expect::Conn(FLOW_CONTROL_ERROR),
        ),
        case(
            "6.9 WINDOW_UPDATE on an idle stream",
            vec![window_update(7, 1)],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.9.2 SETTINGS_INITIAL_WINDOW_SIZE overflows an open stream's window",
            vec![
                open(1, START),
                window_update(1, 0x7fff_ffff - 65_535),
                settings(&[(0x4, 65_536)]),
            ],
            Expect::Conn(FLOW_CONTROL_ERROR),
        ),
        // §4.2: frame size.
        case(
            "4.2 HEADERS larger than SETTINGS_MAX_FRAME_SIZE",
            vec![headers(1, flags::END_HEADERS, &big)],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "4.2 DATA larger than SETTINGS_MAX_FRAME_SIZE",
            vec![open(1, VERSION), frame(ty::DATA, 0, 1, &big)],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        // §5.1, §5.1.1: stream states and identifiers.
        case(
            "5.1 DATA on an idle stream",
            vec![frame(ty::DATA, 0, 1, b"x")],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "5.1 RST_STREAM on an idle stream",
            vec![frame(ty::RST_STREAM, 0, 1, &8u32.to_be_bytes())],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "5.1.1 even stream id",
            vec![open(2, VERSION)],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "5.1.1 stream id below the last one",
            vec![open(5, START), open(3, START)],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        // §6.1, §6.2: DATA and HEADERS.
        case(
            "6.1 DATA on stream 0",
            vec![frame(ty::DATA, 0, 0, b"x")],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.1 DATA whose padding is longer than the payload",
            vec![
                open(1, START),
                frame(ty::DATA, flags::PADDED, 1, &[10, 1, 2]),
            ],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.2 HEADERS on stream 0",
            vec![headers(0, flags::END_HEADERS, &request_block(VERSION))],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.2 HEADERS whose padding is longer than the payload",
            vec![headers(1, flags::END_HEADERS | flags::PADDED, &[200, 0x82])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        // §6.3, §6.4: PRIORITY and RST_STREAM.
        case(
            "6.3 PRIORITY on stream 0",
            vec![frame(ty::PRIORITY, 0, 0, &[0, 0, 0, 1, 16])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.4 RST_STREAM on stream 0",
            vec![frame(ty::RST_STREAM, 0, 0, &8u32.to_be_bytes())],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.4 RST_STREAM of 3 bytes",
            vec![open(1, START), frame(ty::RST_STREAM, 0, 1, &[0, 0, 8])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        // §6.5: SETTINGS.
        case(
            "6.5 SETTINGS ACK with a payload",
            vec![frame(ty::SETTINGS, flags::ACK, 0, &[0, 3, 0, 0, 0, 1])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "6.5 SETTINGS on a stream",
            vec![frame(ty::SETTINGS, 0, 1, &[])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.5 SETTINGS of 3 bytes",
            vec![frame(ty::SETTINGS, 0, 0, &[0, 3, 0])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "6.5.2 SETTINGS_ENABLE_PUSH of 2",
            vec![settings(&[(0x2, 2)])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.5.2 SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
            vec![settings(&[(0x4, 0x8000_0000)])],
            Expect::Conn(FLOW_CONTROL_ERROR),
        ),
        case(
            "6.5.2 SETTINGS_MAX_FRAME_SIZE below 16384",
            vec![settings(&[(0x5, 16_383)])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.5.2 SETTINGS_MAX_FRAME_SIZE above 2^24-1",
            vec![settings(&[(0x5, 1 << 24)])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        // §6.6, §6.7, §6.8: PUSH_PROMISE, PING, GOAWAY.
        case(
            "6.6 PUSH_PROMISE from a client",
            vec![frame(
                ty::PUSH_PROMISE,
                flags::END_HEADERS,
                1,
                &[0, 0, 0, 2, 0x82],
            )],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.7 PING on a stream",
            vec![frame(ty::PING, 0, 1, &[0; 8])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.7 PING of 7 bytes",
            vec![frame(ty::PING, 0, 0, &[0; 7])],
            Expect::Conn(FRAME_SIZE_ERROR),
        ),
        case(
            "6.8 GOAWAY on a stream",
            vec![frame(ty::GOAWAY, 0, 1, &[0; 8])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        // §6.10: CONTINUATION.
        case(
            "6.10 CONTINUATION without HEADERS",
            vec![frame(ty::CONTINUATION, flags::END_HEADERS, 1, &[0x82])],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.10 CONTINUATION after a block that ended",
            vec![
                open(1, START),
                frame(ty::CONTINUATION, flags::END_HEADERS, 1, &[0x82]),
            ],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.10 CONTINUATION on another stream",
            vec![
                headers(1, 0, &request_block(START)),
                frame(ty::CONTINUATION, flags::END_HEADERS, 3, &[]),
            ],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "6.10 DATA inside a header block",
            vec![
                headers(1, 0, &request_block(START)),
                frame(ty::DATA, 0, 1, b"x"),
            ],
            Expect::Conn(PROTOCOL_ERROR),
        ),
        case(
            "5.5 unknown frame type inside a header block",
            vec![
                headers(1, 0, &request_block(START)),
                frame(0xfa, 0, 0, b"ext"),
            ],
            Expect::Conn(PROTOCOL_ERROR),
        ),
    ];
    check_all(shim.listen(), &cases).await?;
    still_serving(&mut shim).await
}

#[tokio::test]
async fn malformed_header_blocks_are_compression_errors() -> Result<()> {
    use code::*;
    let (_containerd, mut shim) = shim().await?;
    let end = flags::END_HEADERS | flags::END_STREAM;
    let with_prefix = |prefix: &[u8]| {
        let mut b = prefix.to_vec();
        b.extend_from_slice(&request_block(VERSION));
        headers(1, end, &b)
    };
    let cases = vec![
        // "a" is 00011: padded with three 1 bits it is 0x1f (checked below).
        case(
            "RFC 7541 5.2 Huffman padding of zeros",
            vec![request_with_huffman(&[0x18])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 5.2 Huffman padding longer than 7 bits",
            vec![request_with_huffman(&[0x1f, 0xff])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 5.2 EOS in a Huffman string",
            vec![request_with_huffman(&[0xff, 0xff, 0xff, 0xff])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 6.3 table size update above SETTINGS_HEADER_TABLE_SIZE",
            // 4097 as a 5-bit-prefix integer: 31 + 4066.
            vec![with_prefix(&[0x3f, 0xe3, 0x1f])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 4.2 table size update after a field",
            vec![{
                let mut b = request_block(VERSION);
                b.push(0x20);
                headers(1, end, &b)
            }],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 2.3.3 index 0",
            vec![with_prefix(&[0x80])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 2.3.3 index beyond the tables",
            vec![with_prefix(&[0xff, 0x80, 0x01])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        case(
            "RFC 7541 5.2 string longer than the block",
            vec![with_prefix(&[0x00, 0x7f, 0x10, b'a'])],
            Expect::Conn(COMPRESSION_ERROR),
        ),
        // What is valid stays valid.
        case(
            "RFC 7541 5.2 Huffman padding of ones",
            vec![request_with_huffman(&[0x1f])],
            Expect::Ignored,
        ),
        case(
            "RFC 7541 6.3 table size update to 0 and back to 4096",
            vec![with_prefix(&[0x20, 0x3f, 0xe1, 0x1f])],
            Expect::Ignored,
        ),
    ];
    check_all(shim.listen(), &cases).await?;
    still_serving(&mut shim).await
}

#[tokio::test]
async fn stream_errors_reset_the_stream_and_the_connection_goes_on() -> Result<()> {
    use code::*;
    let (_containerd, mut shim) = shim().await?;
    let end = flags::END_HEADERS | flags::END_STREAM;
    let fields = request_fields(VERSION);
    let without = |name: &str| -> Vec<(&str, &str)> {
        fields.iter().copied().filter(|(n, _)| *n != name).collect()
    };
    let plus = |extra: (&'static str, &'static str), first: bool| -> Vec<(&str, &str)> {
        let mut f = fields.clone();
        if first {
            f.insert(0, extra);
        } else {
            f.push(extra);
        }
        f
    };
    let mut self_dependent = vec![0, 0, 0, 1, 16];
    self_dependent.extend_from_slice(&request_block(VERSION));
    let cases = vec![
        case(
            "6.9 WINDOW_UPDATE of 0 on a stream the shim answers itself",
            vec![open(1, START), window_update(1, 0)],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "6.9 WINDOW_UPDATE of 0 on a relayed stream",
            vec![open(1, VERSION), window_update(1, 0)],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "6.9.1 stream window above 2^31-1",
            vec![open(1, START), window_update(1, 0x7fff_ffff)],
            Expect::Stream(1, FLOW_CONTROL_ERROR),
        ),
        case(
            "6.3 PRIORITY of 4 bytes",
            vec![frame(ty::PRIORITY, 0, 1, &[0, 0, 0, 3])],
            Expect::Stream(1, FRAME_SIZE_ERROR),
        ),
        case(
            "5.3.1 PRIORITY depending on its own stream",
            vec![open(1, START), frame(ty::PRIORITY, 0, 1, &[0, 0, 0, 1, 16])],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "5.3.1 HEADERS depending on its own stream",
            vec![headers(1, end | flags::PRIORITY, &self_dependent)],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "5.1 half-closed (remote): DATA after END_STREAM",
            vec![
                headers(1, end, &request_block(VERSION)),
                frame(ty::DATA, 0, 1, b"x"),
            ],
            Expect::Stream(1, STREAM_CLOSED),
        ),
        case(
            "5.1 half-closed (remote): HEADERS after END_STREAM",
            vec![
                headers(1, end, &request_block(VERSION)),
                headers(1, end, &block(&[("x-trailer", "1")])),
            ],
            Expect::Stream(1, STREAM_CLOSED),
        ),
        case(
            "8.1 a second HEADERS that does not end the stream",
            vec![
                open(1, START),
                headers(1, flags::END_HEADERS, &block(&[("x-trailer", "1")])),
            ],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.1 trailers with a pseudo-header",
            vec![open(1, START), headers(1, end, &block(&[(":path", "/x")]))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.2 upper-case field name",
            vec![request_with(&plus(("X-Upper", "1"), false))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.2.1 field value with a line feed",
            vec![request_with(&plus(("x-bad", "a\nb"), false))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.2.2 connection-specific field",
            vec![request_with(&plus(("connection", "keep-alive"), false))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.2.2 TE other than trailers",
            vec![request_with(&plus(("te", "gzip"), false))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3 pseudo-header after a regular field",
            vec![request_with(&plus((":authority", "x"), false))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3 unknown pseudo-header",
            vec![request_with(&plus((":foo", "x"), true))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3 response pseudo-header in a request",
            vec![request_with(&plus((":status", "200"), true))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3.1 no :method",
            vec![request_with(&without(":method"))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3.1 no :scheme",
            vec![request_with(&without(":scheme"))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3.1 no :path",
            vec![request_with(&without(":path"))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3.1 empty :path",
            vec![request_with(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", ""),
            ])],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
        case(
            "8.3.1 :path twice",
            vec![request_with(&plus((":path", VERSION), true))],
            Expect::Stream(1, PROTOCOL_ERROR),
        ),
    ];
    check_all(shim.listen(), &cases).await?;
    still_serving(&mut shim).await
}

#[tokio::test]
async fn what_the_rfc_says_to_ignore_is_ignored() -> Result<()> {
    let (_containerd, mut shim) = shim().await?;
    let cases = vec![
        case(
            "5.5 unknown frame type",
            vec![frame(0xfa, 0, 0, b"extension")],
            Expect::Ignored,
        ),
        case(
            "6.5.2 unknown setting",
            vec![settings(&[(0xff, 1)])],
            Expect::Ignored,
        ),
        case(
            "6.7 PING ACK from the client",
            vec![frame(ty::PING, flags::ACK, 0, &[7; 8])],
            Expect::Ignored,
        ),
        case(
            "6.3 PRIORITY on an idle stream, then the stream opens",
            vec![
                frame(ty::PRIORITY, 0, 3, &[0, 0, 0, 0, 16]),
                headers(
                    3,
                    flags::END_HEADERS | flags::END_STREAM,
                    &request_block(VERSION),
                ),
            ],
            Expect::Ignored,
        ),
        case(
            "6.8 GOAWAY from the client",
            vec![frame(ty::GOAWAY, 0, 0, &[0; 8])],
            Expect::Ignored,
        ),
    ];
    check_all(shim.listen(), &cases).await?;
    still_serving(&mut shim).await
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// One HEADERS without END_HEADERS, then CONTINUATION frames (the
/// "CONTINUATION flood"): the shim refuses the block with GOAWAY
/// ENHANCE_YOUR_CALM as soon as it passes the advertised
/// SETTINGS_MAX_HEADER_LIST_SIZE, without waiting for its end; and a flood
/// of 128 MiB leaves its memory where it was.
#[tokio::test]
async fn a_header_block_that_never_ends_is_refused_at_the_limit() -> Result<()> {
    let (_containerd, shim) = shim().await?;
    let chunk = vec![0x40u8; 16 * 1024];
    let continuation = frame(ty::CONTINUATION, 0, 1, &chunk);

    // Just past the limit, then nothing more: the GOAWAY must come.
    let mut conn = RawConn::open(shim.listen()).await?;
    conn.sync(TIMEOUT).await?;
    conn.send(&headers(1, 0, &request_block(VERSION))).await?;
    for _ in 0..=MAX_HEADER_LIST_SIZE / chunk.len() {
        conn.send(&continuation).await?;
    }
    let how = conn.until_closed(TIMEOUT).await?;
    let frames = conn.frames();
    let goaway = frames
        .iter()
        .find(|f| f.ty == ty::GOAWAY)
        .with_context(|| format!("no GOAWAY ({how}): {frames:?}"))?;
    ensure!(goaway.code() == Some(code::ENHANCE_YOUR_CALM), "{goaway:?}");

    // 128 MiB of it.
    let idle = rss_kib(shim.pid())?;
    let mut conn = RawConn::open(shim.listen()).await?;
    conn.sync(TIMEOUT).await?;
    conn.send(&headers(1, 0, &request_block(VERSION))).await?;
    let total = 128usize << 20;
    let mut sent = 0;
    while sent < total {
        if conn.send(&continuation).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = conn.until_closed(TIMEOUT).await;
    let after = rss_kib(shim.pid())?;
    eprintln!(
        "{} KiB of CONTINUATION written before the shim closed; shim VmRSS {idle} KiB before, {after} KiB after",
        sent >> 10
    );
    ensure!(
        after <= idle + 4 * 1024,
        "the shim's RSS grew from {idle} KiB to {after} KiB"
    );
    Ok(())
}
