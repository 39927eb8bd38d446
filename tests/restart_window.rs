//! After a restart the shim answers for the pods it restored from its state
//! directory from the first call on, also while its reconcile with the
//! runtime is still running (found by `benches/reconcile.rs`: a ContainerStatus
//! sent as soon as the new shim accepted read a deferred app as CREATED,
//! which kubelet takes for a container that never started).
//!
//! The window is held open deterministically: containerd is stopped
//! (SIGSTOP) while the new shim starts, so the reconcile's first runtime
//! call cannot finish; a ContainerStatus of the deferred app is written by
//! hand on a raw connection, and containerd resumes only once the shim has
//! read every byte of it (the socket's send queue, `SIOCOUTQ`, is empty).
//! The answer must read RUNNING while containerd says CREATED.

mod support;

use std::os::fd::AsRawFd as _;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use k8s_cri::v1::{
    ContainerState, ContainerStatusRequest, ContainerStatusResponse, CreateContainerRequest,
    StartContainerRequest,
};
use nix::sys::signal::Signal;
use prost::Message as _;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(30);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// One HTTP/2 frame.
fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header block of a gRPC request to `path`: literals without
/// indexing, no Huffman coding (RFC 7541 6.2.2; every string is < 127 bytes).
fn request_block(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Bytes written on a Unix stream socket that its peer has not read yet.
fn unread(stream: &UnixStream) -> Result<i32> {
    use nix::libc;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which
    // points at `n`; the descriptor belongs to `stream`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    ensure!(
        rc == 0,
        "ioctl SIOCOUTQ: {}",
        std::io::Error::last_os_error()
    );
    Ok(n)
}

/// Resumes containerd however the test ends.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

#[tokio::test]
async fn restored_deferred_start_reads_running_before_the_reconcile_ends() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let mut shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let (mut rt, _) = shim.cri();
    let (direct, _) = containerd.cri();

    // The app is listed before a sidecar that never becomes ready: the shim
    // answers its StartContainer and owes the start.
    let mut config = pod_sandbox_config("window", &containerd.pod_log_root());
    for (k, v) in [
        ("sidecar-shim.io/sidecars", "proxy"),
        ("sidecar-shim.io/ready.proxy", "tcp://:9999"),
        ("sidecar-shim.io/ready-timeout", "110s"),
    ] {
        config.annotations.insert(k.into(), v.into());
    }
    let pod = run_pod(&mut rt, &config).await?;
    let mut ids = Vec::new();
    for name in ["app", "proxy"] {
        let c = kubelet_container_config(&config, name, sh("sleep 3600 & wait"), 2);
        let id = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(c),
                sandbox_config: Some(config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {name}"))?;
        ids.push(id);
    }
    let app = ids[0].clone();
    let (mut d, mut s) = (direct.clone(), rt.clone());
    ensure!(
        container_state(&mut d, &app).await? == ContainerState::ContainerCreated
            && container_state(&mut s, &app).await? == ContainerState::ContainerRunning,
        "before the restart the app must be CREATED in containerd and RUNNING through the shim"
    );

    shim.kill9().await?;
    drop(shim);
    let containerd_pid = containerd.pid().context("containerd is not running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(containerd_pid as i32),
        Signal::SIGSTOP,
    )?;
    let resume = Resume(containerd_pid);
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;

    let mut conn = UnixStream::connect(&listen).await?;
    let mut request = PREFACE.to_vec();
    request.extend(frame(SETTINGS, 0, 0, &[]));
    request.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block("/runtime.v1.RuntimeService/ContainerStatus"),
    ));
    let message = ContainerStatusRequest {
        container_id: app.clone(),
        verbose: false,
    }
    .encode_to_vec();
    let mut grpc = vec![0];
    grpc.extend_from_slice(&(message.len() as u32).to_be_bytes());
    grpc.extend_from_slice(&message);
    request.extend(frame(DATA, END_STREAM, 1, &grpc));
    conn.write_all(&request).await?;
    let mut last = 0;
    wait_for(TIMEOUT, "the shim to read the whole request", || {
        last = unread(&conn).unwrap_or(-1);
        let done = last == 0;
        async move { done }
    })
    .await
    .with_context(|| format!("{last} bytes unread"))?;
    drop(resume);

    // The answer: the DATA frame of stream 1 (headers are not needed).
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let answer = loop {
        let mut at = 0;
        let mut found = None;
        while received.len() - at >= 9 {
            let h = &received[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if received.len() - at < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if h[3] == DATA && stream == 1 && len >= 5 {
                found = Some(received[at + 9 + 5..at + 9 + len].to_vec());
            }
            at += 9 + len;
        }
        if let Some(f) = found {
            break ContainerStatusResponse::decode(f.as_slice())?;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Err(_) => bail!("no answer within {TIMEOUT:?}"),
            Ok(Ok(0)) => bail!("the shim closed the connection without an answer"),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => bail!("reading the answer: {e}"),
        }
    };
    let seen = answer.status.context("ContainerStatus without status")?;
    let mut d = direct.clone();
    let truth = container_state(&mut d, &app).await?;
    ensure!(
        seen.state == ContainerState::ContainerRunning as i32
            && truth == ContainerState::ContainerCreated,
        "the deferred app read {:?} through the restarted shim (containerd: {truth:?}); \
         want RUNNING: the shim owes its start. Shim log:\n{}",
        ContainerState::try_from(seen.state),
        tail(shim.log_path(), 40)
    );
    Ok(())
}
