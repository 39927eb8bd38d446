//! Bad input on the shim's socket, sent with raw HTTP/2 bytes over a Unix
//! stream while a normal CRI client keeps using the shim: garbage instead of
//! the connection preface, truncated frames followed by EOF, an undecodable
//! HPACK block (answered with GOAWAY COMPRESSION_ERROR), and a client that
//! drops its connection in the middle of an ExecSync. After each, the shim
//! still runs and serves the normal client and new ones.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ExecSyncRequest, VersionRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::Channel;

use support::h2raw::*;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);
/// How long the shim may take to close a connection it should close. Well
/// below its 10 s preface timeout, so closing for that reason does not
/// count.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

const DATA: u8 = ty::DATA;
const HEADERS: u8 = ty::HEADERS;
const SETTINGS: u8 = ty::SETTINGS;
const GOAWAY: u8 = ty::GOAWAY;
const END_STREAM: u8 = flags::END_STREAM;
const END_HEADERS: u8 = flags::END_HEADERS;
const COMPRESSION_ERROR: u32 = code::COMPRESSION_ERROR;

// ---------------------------------------------------------------------------
// Setup and checks

fn v1() -> VersionRequest {
    VersionRequest {
        version: "v1".into(),
    }
}

/// Prints the tails of the given logs when a test fails by returning an
/// error (`tests/support` prints them only on a panic). Declare it after the
/// containerd and shim; call [`LogsOnError::passed`] at the end.
struct LogsOnError {
    files: Vec<PathBuf>,
    passed: bool,
}

impl LogsOnError {
    fn new(files: &[PathBuf]) -> Self {
        LogsOnError {
            files: files.to_vec(),
            passed: false,
        }
    }

    fn passed(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }
}

impl Drop for LogsOnError {
    fn drop(&mut self) {
        if self.passed || std::thread::panicking() {
            return;
        }
        for file in &self.files {
            eprintln!(
                "--- last lines of {} ---\n{}",
                file.display(),
                tail(file, 40)
            );
        }
    }
}

/// A private containerd, a shim in front of it, and a normal client of the
/// shim that has already made a call (so its connection is established).
async fn setup() -> Result<(
    PrivateContainerd,
    ShimProcess,
    LogsOnError,
    RuntimeServiceClient<Channel>,
)> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut normal, _) = shim.cri();
    normal
        .version(v1())
        .await
        .context("Version through the shim before any bad input")?;
    Ok((containerd, shim, logs, normal))
}

/// After bad input: the shim still runs, and both the normal client (on its
/// existing connection) and a new client get containerd's Version answer.
async fn still_serving(
    shim: &mut ShimProcess,
    normal: &mut RuntimeServiceClient<Channel>,
    after: &str,
) -> Result<()> {
    ensure!(
        shim.try_status()?.is_none(),
        "the shim exited after {after}"
    );
    let (mut fresh, _) = shim.cri();
    for (which, client) in [("the normal client", normal), ("a new client", &mut fresh)] {
        let version = tokio::time::timeout(Duration::from_secs(10), client.version(v1()))
            .await
            .with_context(|| format!("Version from {which} hung after {after}"))?
            .with_context(|| format!("Version from {which} after {after}"))?
            .into_inner();
        ensure!(version.runtime_name == "containerd", "{version:?}");
    }
    ensure!(
        shim.try_status()?.is_none(),
        "the shim exited after {after}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Tests

/// Bytes that are not the HTTP/2 connection preface: the shim closes the
/// connection at once (without waiting for its preface timeout), although
/// the client keeps its side open.
#[tokio::test]
async fn garbage_instead_of_the_preface_is_closed() -> Result<()> {
    let (_containerd, mut shim, logs, mut normal) = setup().await?;
    let mut noise = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    let cases: [(&str, &[u8]); 4] = [
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
        ("an almost-preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
        ("a TLS-like record and noise", &noise),
        ("one wrong byte", b"X"),
    ];
    for (what, bytes) in cases {
        let mut stream = UnixStream::connect(shim.listen()).await?;
        stream.write_all(bytes).await?;
        let started = Instant::now();
        let (received, how) = read_until_closed(&mut stream, CLOSE_WITHIN)
            .await
            .with_context(|| format!("after {what}"))?;
        eprintln!(
            "{what}: closed ({how}) after {:?}, {} bytes received",
            started.elapsed(),
            received.len()
        );
        still_serving(&mut shim, &mut normal, what).await?;
    }
    logs.passed()
}

/// A valid preface, then a frame cut short, then EOF: the shim closes the
/// connection and carries on.
#[tokio::test]
async fn truncated_frame_then_eof() -> Result<()> {
    let (_containerd, mut shim, logs, mut normal) = setup().await?;
    let settings = frame(SETTINGS, 0, 0, &[]);
    let headers = frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block("/runtime.v1.RuntimeService/Version"),
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half a preface", PREFACE[..10].to_vec()),
        ("a preface only", PREFACE.to_vec()),
        (
            "half a frame header",
            [PREFACE, &settings, &headers[..5]].concat(),
        ),
        (
            "a HEADERS frame without the end of its payload",
            [PREFACE, &settings, &headers[..headers.len() - 7]].concat(),
        ),
        (
            "a DATA frame cut short after a request's HEADERS",
            [
                PREFACE,
                &settings,
                &headers,
                &frame(DATA, END_STREAM, 1, &grpc_message(&v1()))[..12],
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut stream = UnixStream::connect(shim.listen()).await?;
        stream.write_all(&bytes).await?;
        stream.shutdown().await?;
        let started = Instant::now();
        let (received, how) = read_until_closed(&mut stream, CLOSE_WITHIN)
            .await
            .with_context(|| format!("after {what} and EOF"))?;
        eprintln!(
            "{what}, EOF: closed ({how}) after {:?}, frames received: {:?}",
            started.elapsed(),
            parse_frames(&received)
                .iter()
                .map(|f| (f.ty, f.flags, f.stream))
                .collect::<Vec<_>>()
        );
        still_serving(&mut shim, &mut normal, what).await?;
    }
    logs.passed()
}

/// A HEADERS frame whose HPACK block cannot be decoded is a connection
/// error (RFC 7540 4.3): the shim answers GOAWAY with COMPRESSION_ERROR and
/// closes the connection.
#[tokio::test]
async fn undecodable_hpack_block_gets_goaway_compression_error() -> Result<()> {
    let (_containerd, mut shim, logs, mut normal) = setup().await?;
    let mut truncated_literal = Vec::new();
    // A literal whose name claims 200 bytes, then 2.
    truncated_literal.push(0);
    hpack_int(&mut truncated_literal, 0, 7, 200);
    truncated_literal.extend_from_slice(b"ab");
    let mut huge_index = Vec::new();
    hpack_int(&mut huge_index, 0x80, 7, 1_000_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("indexed field 0", vec![0x80]),
        ("an index beyond both tables", huge_index),
        ("a truncated literal", truncated_literal),
        (
            "a valid field, then noise",
            [
                request_block("/runtime.v1.RuntimeService/Version"),
                vec![
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
            ]
            .concat(),
        ),
    ];
    for (what, block) in cases {
        let mut stream = UnixStream::connect(shim.listen()).await?;
        let bytes = [
            PREFACE,
            &frame(SETTINGS, 0, 0, &[]),
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block),
        ]
        .concat();
        stream.write_all(&bytes).await?;
        let started = Instant::now();
        let (received, how) = read_until_closed(&mut stream, CLOSE_WITHIN)
            .await
            .with_context(|| format!("after a header block with {what}"))?;
        let frames = parse_frames(&received);
        eprintln!(
            "{what}: closed ({how}) after {:?}, frames received: {:?}",
            started.elapsed(),
            frames
                .iter()
                .map(|f| (f.ty, f.flags, f.stream, f.payload.len()))
                .collect::<Vec<_>>()
        );
        let goaway = frames
            .iter()
            .find(|f| f.ty == GOAWAY)
            .with_context(|| format!("{what}: no GOAWAY before the close ({how}): {frames:?}"))?;
        ensure!(
            goaway.stream == 0 && goaway.payload.len() >= 8,
            "{goaway:?}"
        );
        let code = u32::from_be_bytes(goaway.payload[4..8].try_into()?);
        ensure!(
            code == COMPRESSION_ERROR,
            "{what}: GOAWAY with error code {code:#x}, not COMPRESSION_ERROR (0x9): {goaway:?} ({:?})",
            String::from_utf8_lossy(&goaway.payload[8..])
        );
        still_serving(&mut shim, &mut normal, what).await?;
    }
    logs.passed()
}

/// A client sends a valid ExecSync request and drops its connection while
/// containerd runs the command: the shim carries on.
#[tokio::test]
async fn client_dropping_its_connection_mid_exec_sync() -> Result<()> {
    let (containerd, mut shim, logs, mut normal) = setup().await?;
    let (mut direct, _) = containerd.cri();
    let pod_config = pod_sandbox_config("dropper", &containerd.pod_log_root());
    let pod_id = run_pod(&mut direct, &pod_config).await?;
    let mut config = container_config("main", &[]);
    config.command = sh("sleep 1000");
    let container_id = start_container(&mut direct, &pod_id, &pod_config, &config).await?;

    for round in 0..3 {
        let marker = format!("/tmp/raw-exec-{round}");
        let request = ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                format!("touch {marker}; sleep 30; echo never"),
            ],
            timeout: 0,
        };
        let mut stream = UnixStream::connect(shim.listen()).await?;
        let bytes = [
            PREFACE,
            &frame(SETTINGS, 0, 0, &[]),
            &frame(
                HEADERS,
                END_HEADERS,
                1,
                &request_block("/runtime.v1.RuntimeService/ExecSync"),
            ),
            &frame(DATA, END_STREAM, 1, &grpc_message(&request)),
        ]
        .concat();
        stream.write_all(&bytes).await?;
        // The call reached containerd: the command runs in the container.
        wait_for(TIMEOUT, &format!("{marker} in the container"), || {
            let mut rt = direct.clone();
            let id = container_id.clone();
            let marker = marker.clone();
            async move {
                exec_sync(&mut rt, &id, &["test", "-e", &marker], 10)
                    .await
                    .is_ok_and(|o| o.exit_code == 0)
            }
        })
        .await?;
        // Other clients are served while it runs.
        still_serving(
            &mut shim,
            &mut normal,
            "an ExecSync started on a raw connection",
        )
        .await?;

        match round {
            // Unread data (containerd's SETTINGS) left in the queue.
            0 => drop(stream),
            1 => {
                // Half-close first, as a client shutting down might.
                stream.shutdown().await?;
                drop(stream);
            }
            _ => {
                // Read what has arrived (containerd's SETTINGS, relayed)
                // first, so nothing is left unread, then drop.
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                    .await
                    .context("nothing from the shim on the raw connection")??;
                ensure!(n > 0, "the shim closed the raw connection mid-call");
                drop(stream);
            }
        }
        still_serving(&mut shim, &mut normal, "a client dropped mid-ExecSync").await?;
    }

    // Another ExecSync through the shim works.
    let out = exec_sync(&mut normal, &container_id, &["echo", "fine"], 10).await?;
    assert_eq!(out.stdout, "fine\n");
    logs.passed()
}
