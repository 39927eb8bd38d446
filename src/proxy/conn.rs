//! The I/O loop of one client connection: moves bytes between the sockets
//! and the [`Relay`], runs the local calls it asks for, and connects to the
//! runtime when it needs one.
//!
//! One task owns both sockets and the relay; nothing is shared across
//! tasks but the local calls' results, which come back over a channel. Each
//! socket is read only while the relay can take more (what it produces for
//! a peer that is not reading stays bounded, see [`super::relay::OUT_HIGH`]).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::debug;

use super::frame::{self, Head};
use super::relay::{Action, Relay};
use super::Interceptor;
use crate::metrics::Metrics;

/// Initial read buffer size; grows to hold the largest frame in flight.
const READ_BUF: usize = 16 * 1024;

/// How long connecting to the runtime's socket may take before the runtime
/// counts as unreachable. A Unix socket connects at once or fails at once;
/// this only bounds a runtime whose accept backlog is full.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// After the proxy closes a connection, how long it keeps reading (and
/// discarding) so that the client gets the last frames instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

pub(super) async fn connect(runtime: &std::path::Path) -> io::Result<UnixStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(runtime))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// Serve one client connection whose preface has been read (the bytes after
/// it are in `pending`).
pub(super) async fn serve(
    mut client: UnixStream,
    mut pending: BytesMut,
    runtime_path: Arc<PathBuf>,
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
    mut drain: watch::Receiver<bool>,
) {
    let mut relay = Relay::new(interceptor.clone(), metrics.clone(), runtime_path.clone());
    let mut runtime = attach(&mut relay, &runtime_path, &metrics).await;
    relay.client_input(&mut pending);
    let mut client_buf = pending;
    let mut runtime_buf = BytesMut::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u32, Local)>();
    let mut calls: HashMap<u32, AbortHandle> = HashMap::new();
    let mut drain_seen = false;

    let client_code = loop {
        for action in relay.actions() {
            match action {
                Action::Call(stream, call) => {
                    let fut = interceptor.call(call);
                    let tx = done_tx.clone();
                    let task = tokio::spawn(async move {
                        let result = fut.await;
                        let _ = tx.send((stream, Local::Done(result)));
                    });
                    calls.insert(stream, task.abort_handle());
                }
                Action::CallStream(stream, call) => {
                    let fut = interceptor.call_stream(call);
                    let task = tokio::spawn(run_stream(stream, fut, done_tx.clone()));
                    calls.insert(stream, task.abort_handle());
                }
                Action::Cancel(stream) => {
                    if let Some(task) = calls.remove(&stream) {
                        task.abort();
                    }
                }
                Action::Connect => runtime = attach(&mut relay, &runtime_path, &metrics).await,
            }
        }
        if runtime.is_some() && !relay.runtime_live() {
            runtime = None;
        }
        // Write what can be written without waiting, and what waited for
        // room in the output buffers once they have been written.
        let mut failed = false;
        for _ in 0..2 {
            if let Err(e) = write_some(&client, &mut relay.client_out) {
                debug!(error = %e, "client connection failed");
                failed = true;
                break;
            }
            if let Some(rt) = &runtime {
                if let Err(e) = write_some(rt, &mut relay.runtime_out) {
                    relay.runtime_lost(&e.to_string());
                }
            }
            relay.pump();
        }
        if failed {
            break tonic::Code::Cancelled;
        }
        if runtime.is_some() && !relay.runtime_live() {
            runtime = None;
        }
        if relay.finished() && relay.client_out.is_empty() {
            break tonic::Code::Cancelled;
        }
        let read = relay.wants_input();
        // Reads go through AsyncRead: a read that does not fill the buffer
        // clears the socket's readiness, so a drained socket is not read
        // again only to hear EAGAIN (as readable() + try_read would).
        if read {
            reserve_frame(&mut client_buf);
            if runtime.is_some() {
                reserve_frame(&mut runtime_buf);
            }
        }
        let (mut runtime_rd, runtime_wr) = match runtime.as_mut() {
            Some(rt) => {
                let (r, w) = rt.split();
                (Some(r), Some(w))
            }
            None => (None, None),
        };
        let (mut client_rd, client_wr) = client.split();
        tokio::select! {
            r = client_rd.read_buf(&mut client_buf), if read => match r {
                Ok(0) => {
                    debug!("client closed its connection");
                    break tonic::Code::Cancelled;
                }
                Ok(_) => relay.client_input(&mut client_buf),
                Err(e) => {
                    debug!(error = %e, "client connection failed");
                    break tonic::Code::Cancelled;
                }
            },
            r = read_from(runtime_rd.as_mut(), &mut runtime_buf), if read && runtime_rd.is_some() => match r {
                Ok(0) => relay.runtime_lost("end of stream"),
                Ok(_) => relay.runtime_input(&mut runtime_buf),
                Err(e) => relay.runtime_lost(&e.to_string()),
            },
            r = client_wr.writable(), if !relay.client_out.is_empty() => {
                if r.is_err() {
                    break tonic::Code::Cancelled;
                }
            }
            r = writable(runtime_wr.as_ref()), if runtime_wr.is_some() && !relay.runtime_out.is_empty() => {
                if let Err(e) = r {
                    relay.runtime_lost(&e.to_string());
                }
            }
            Some((stream, local)) = done_rx.recv() => match local {
                Local::Done(result) => {
                    calls.remove(&stream);
                    relay.local_result(stream, result);
                }
                Local::Started => relay.local_stream_started(stream),
                Local::Message(message) => relay.local_stream_message(stream, &message),
                Local::End(status) => {
                    calls.remove(&stream);
                    relay.local_stream_end(stream, status);
                }
            },
            r = drain.changed(), if !drain_seen => {
                drain_seen = true;
                if r.is_ok() && *drain.borrow() {
                    relay.drain();
                }
            }
        }
        if runtime_buf.is_empty() && runtime_buf.capacity() > 4 * READ_BUF {
            runtime_buf = BytesMut::new();
        }
        if client_buf.is_empty() && client_buf.capacity() > 4 * READ_BUF {
            client_buf = BytesMut::new();
        }
    };
    relay.client_gone(client_code);
    // Local calls still running die with the connection, as calls to a
    // runtime do when their client goes away (a call the lifecycle holds is
    // then cancelled).
    for task in calls.values() {
        task.abort();
    }
    drop(runtime);
    linger(client, relay.client_out).await;
}

/// What a local call's task reports.
enum Local {
    /// A unary answer, or a streaming call that failed at once.
    Done(Result<Bytes, tonic::Status>),
    /// A streaming call answers: messages follow.
    Started,
    Message(Bytes),
    /// A streaming call ends.
    End(tonic::Status),
}

/// Run a server-streaming local call, reporting its messages in order.
async fn run_stream(
    stream: u32,
    fut: super::StreamFuture,
    tx: mpsc::UnboundedSender<(u32, Local)>,
) {
    let mut messages = match fut.await {
        Ok(messages) => messages,
        Err(status) => {
            let _ = tx.send((stream, Local::Done(Err(status))));
            return;
        }
    };
    let _ = tx.send((stream, Local::Started));
    while let Some(item) = messages.recv().await {
        match item {
            Ok(message) => {
                if tx.send((stream, Local::Message(message))).is_err() {
                    return;
                }
            }
            Err(status) => {
                let _ = tx.send((stream, Local::End(status)));
                return;
            }
        }
    }
    let _ = tx.send((stream, Local::End(tonic::Status::ok(""))));
}

/// Connect to the runtime for `relay`.
async fn attach(
    relay: &mut Relay,
    runtime_path: &std::path::Path,
    metrics: &Metrics,
) -> Option<UnixStream> {
    match connect(runtime_path).await {
        Ok(stream) => {
            metrics.runtime_reachable();
            relay.runtime_attached();
            Some(stream)
        }
        Err(e) => {
            debug!(error = %e, "runtime unreachable; answering relayed calls with UNAVAILABLE");
            metrics.runtime_unreachable();
            relay.runtime_unreachable(&e);
            None
        }
    }
}

async fn read_from(stream: Option<&mut ReadHalf<'_>>, buf: &mut BytesMut) -> io::Result<usize> {
    match stream {
        Some(s) => s.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn writable(stream: Option<&WriteHalf<'_>>) -> io::Result<()> {
    match stream {
        Some(s) => s.writable().await,
        None => std::future::pending().await,
    }
}

/// Make room in `buf` for the frame it holds the start of (or a frame
/// header), and at least [`READ_BUF`].
fn reserve_frame(buf: &mut BytesMut) {
    let need = Head::parse(buf).map_or(frame::HEADER_LEN, |h| h.frame_len());
    buf.reserve(need.saturating_sub(buf.len()).max(READ_BUF));
}

/// Write as much of `out` as the socket takes now.
fn write_some(stream: &UnixStream, out: &mut BytesMut) -> io::Result<()> {
    while !out.is_empty() {
        match stream.try_write(out) {
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write the last frames, close the sending side, and read until the client
/// closes (or a short while), so that it reads them rather than a reset.
async fn linger(mut client: UnixStream, out: BytesMut) {
    let _ = tokio::time::timeout(LINGER, async {
        if client.write_all(&out).await.is_err() {
            return;
        }
        let _ = client.shutdown().await;
        let mut sink = [0u8; 4096];
        loop {
            let _ = client.readable().await;
            match client.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}
