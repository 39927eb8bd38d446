//! What client connections cost the shim, and what a hostile one can make
//! it hold: a private containerd and the shim (release build) in front of
//! it, then
//!
//! 1. a CONTINUATION flood of `--flood-mib` (default 128) on one connection:
//!    the shim's VmRSS before and after, and its peak;
//! 2. `--connections N` (default 1000) client connections opened at once,
//!    each making one Version call and staying open: the shim's VmRSS and
//!    open descriptors before, with all of them open, and after they close,
//!    and containerd's descriptors (each client connection is paired with
//!    one to containerd), then `--rounds` (default 4) waves in all, to show
//!    that the memory freed is reused rather than leaked;
//! 3. a second shim with `--max-connections` of a tenth of that, and as
//!    many connections again: how many are served and how many refused
//!    (GOAWAY ENHANCE_YOUR_CALM), and its log line.
//!
//! Run by `hack/bench`, or `cargo bench --bench connections -- [--connections N]
//! [--flood-mib M] [--rounds R]`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use support::h2raw::*;
use support::{PrivateContainerd, ShimProcess, SHIM_LOG_ENV};
use tokio::io::AsyncReadExt;

const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const TIMEOUT: Duration = Duration::from_secs(60);

use support::proc_status_kib as status_kib;

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// How a connection ended up.
enum Outcome {
    /// Version answered; the connection is kept open.
    Served(tokio::net::UnixStream),
    /// GOAWAY with this code before any answer.
    Refused(u32),
}

/// Open a connection, call Version, wait for the answer's trailers.
async fn call_version(socket: &Path) -> Result<Outcome> {
    let mut conn = RawConn::open(socket).await?;
    let message = grpc_message(&k8s_cri::v1::VersionRequest {
        version: "v1".into(),
    });
    let mut out = frame(ty::HEADERS, flags::END_HEADERS, 1, &request_block(VERSION));
    out.extend_from_slice(&frame(ty::DATA, flags::END_STREAM, 1, &message));
    // A refused connection may be closed before this is written.
    let _ = conn.send(&out).await;
    loop {
        let frames = conn.frames();
        if let Some(g) = frames.iter().find(|f| f.ty == ty::GOAWAY) {
            return Ok(Outcome::Refused(g.code().unwrap_or(u32::MAX)));
        }
        if frames
            .iter()
            .any(|f| f.ty == ty::HEADERS && f.stream == 1 && f.flags & flags::END_STREAM != 0)
        {
            return Ok(Outcome::Served(conn.stream));
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, conn.stream.read(&mut chunk))
            .await
            .context("no answer")??;
        if n == 0 {
            bail!("closed without an answer or GOAWAY: {:?}", conn.frames());
        }
        conn.received.extend_from_slice(&chunk[..n]);
    }
}

/// Open `n` connections at once; returns the served ones and the refusal
/// codes.
async fn open_many(socket: &Path, n: usize) -> Result<(Vec<tokio::net::UnixStream>, Vec<u32>)> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let socket = socket.to_path_buf();
        tasks.spawn(async move { call_version(&socket).await });
    }
    let mut served = Vec::new();
    let mut refused = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r?? {
            Outcome::Served(s) => served.push(s),
            Outcome::Refused(code) => refused.push(code),
        }
    }
    Ok((served, refused))
}

/// Wait until `pid` has at most `target` descriptors open.
async fn wait_fds(pid: u32, target: usize) -> Result<usize> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = fds(pid)?;
        if n <= target || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() -> Result<()> {
    let mut connections = 1000usize;
    let mut flood_mib = 128usize;
    let mut rounds = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--connections" => connections = value("--connections")?,
            "--flood-mib" => flood_mib = value("--flood-mib")?,
            "--rounds" => rounds = value("--rounds")?,
            "--bench" => {}
            other => {
                bail!("unknown argument {other:?} (--connections N, --flood-mib M, --rounds R)")
            }
        }
    }
    ensure!(connections >= 10, "--connections at least 10");
    if std::env::var_os(SHIM_LOG_ENV).is_none() {
        std::env::set_var(SHIM_LOG_ENV, "info");
    }
    // Each connection is two descriptors here and two in the shim.
    let want = (connections as u64) * 4 + 1024;
    let (soft, hard) = nix_rlimit();
    if soft < want {
        raise_nofile(want.min(hard))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(connections, flood_mib, rounds))
}

fn nix_rlimit() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(1024),
        nums.get(1).copied().unwrap_or(1024),
    )
}

fn raise_nofile(to: u64) -> Result<()> {
    // prlimit(1) from util-linux: this crate forbids unsafe code.
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={to}:{to}"))
        .status()
        .context("prlimit")?;
    ensure!(status.success(), "prlimit --nofile={to} failed");
    Ok(())
}

async fn run(connections: usize, flood_mib: usize, rounds: usize) -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let containerd_pid = containerd.pid().context("containerd pid")?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let pid = shim.pid();
    // The CONTINUATION flood.
    let before = status_kib(pid, "VmRSS:")?;
    let hwm_before = status_kib(pid, "VmHWM:")?;
    let mut conn = RawConn::open(&listen).await?;
    conn.sync(TIMEOUT).await?;
    let _ = conn
        .send(&frame(ty::HEADERS, 0, 1, &request_block(VERSION)))
        .await;
    let continuation = frame(ty::CONTINUATION, 0, 1, &vec![0x40; 16 * 1024]);
    let mut sent = 0usize;
    let started = Instant::now();
    while sent < flood_mib << 20 {
        if conn.send(&continuation).await.is_err() {
            break;
        }
        sent += 16 * 1024;
    }
    let _ = conn.until_closed(TIMEOUT).await;
    let goaway = conn
        .frames()
        .iter()
        .find(|f| f.ty == ty::GOAWAY)
        .and_then(|f| f.code());
    println!(
        "CONTINUATION flood: {:.1} MiB written in {:.2} s before the shim closed (GOAWAY code {goaway:?}); \
         shim VmRSS {before} KiB before, {} KiB after; VmHWM {hwm_before} KiB before, {} KiB after",
        sent as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64(),
        status_kib(pid, "VmRSS:")?,
        status_kib(pid, "VmHWM:")?
    );
    println!(
        "{connections} connections at once, each one Version call, kept open (shim: max_connections 1024)"
    );
    let idle_rss = status_kib(pid, "VmRSS:")?;
    let idle_fds = fds(pid)?;
    let idle_containerd_fds = fds(containerd_pid)?;
    let started = Instant::now();
    let (served, refused) = open_many(&listen, connections).await?;
    let took = started.elapsed();
    let open_rss = status_kib(pid, "VmRSS:")?;
    let open_fds = fds(pid)?;
    let open_containerd_fds = fds(containerd_pid)?;
    println!(
        "  served {} and refused {} in {:.2} s",
        served.len(),
        refused.len(),
        took.as_secs_f64()
    );
    drop(served);
    let closed_fds = wait_fds(pid, idle_fds).await?;
    let closed_rss = status_kib(pid, "VmRSS:")?;
    let hwm = status_kib(pid, "VmHWM:")?;
    println!("  | | shim VmRSS | shim descriptors | containerd descriptors |");
    println!("  |---|---|---|---|");
    println!("  | idle | {idle_rss} KiB | {idle_fds} | {idle_containerd_fds} |");
    println!("  | {connections} open | {open_rss} KiB | {open_fds} | {open_containerd_fds} |");
    println!(
        "  | closed again | {closed_rss} KiB | {closed_fds} | {} |",
        fds(containerd_pid)?
    );
    println!(
        "  per connection: {:.1} KiB of shim RSS; shim peak (VmHWM) {hwm} KiB",
        (open_rss.saturating_sub(idle_rss)) as f64 / connections as f64
    );
    // The memory stays with the allocator once freed; a second round must
    // reuse it rather than grow.
    for round in 2..=rounds {
        let (served, _) = open_many(&listen, connections).await?;
        let again_rss = status_kib(pid, "VmRSS:")?;
        drop(served);
        wait_fds(pid, idle_fds).await?;
        println!(
            "  round {round} of {connections}: VmRSS {again_rss} KiB with all open, {} KiB closed again",
            status_kib(pid, "VmRSS:")?
        );
    }

    // A cap of a tenth.
    let cap = connections / 10;
    let capped_listen = containerd.dir().join("capped.sock");
    let capped = ShimProcess::start(
        &capped_listen,
        containerd.socket(),
        &["--max-connections", &cap.to_string()],
    )
    .await?;
    let (served, refused) = open_many(&capped_listen, connections).await?;
    let enhance = refused
        .iter()
        .filter(|c| **c == code::ENHANCE_YOUR_CALM)
        .count();
    println!(
        "max_connections {cap}, {connections} connections at once: {} served, {} refused ({enhance} with GOAWAY ENHANCE_YOUR_CALM)",
        served.len(),
        refused.len()
    );
    drop(served);
    let log = capped.log();
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("client connection refused"))
    {
        println!("  its log: {}", line.trim());
    }

    Ok(())
}
