//! The CRI proxy: accepts client connections on the shim's socket and relays
//! each over its own connection to the runtime, as an HTTP/2 endpoint on
//! each hop ([`relay`], driven by [`conn`]). Calls to the methods an
//! [`Interceptor`] claims are answered by the shim.

mod conn;
pub mod frame;
pub mod grpc;
pub mod hpack;
pub mod relay;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// How long a new client has to send the HTTP/2 connection preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// A unary call the shim answers itself.
#[derive(Debug)]
pub struct LocalCall {
    /// The gRPC path, e.g. `/runtime.v1.RuntimeService/StartContainer`.
    pub method: String,
    /// The request's headers (metadata) as the client sent them.
    pub headers: hpack::HeaderList,
    /// The client's deadline (grpc-timeout), if it set one.
    pub timeout: Option<Duration>,
    /// The encoded request message.
    pub message: Bytes,
}

pub type CallFuture = Pin<Box<dyn Future<Output = Result<Bytes, tonic::Status>> + Send>>;

/// Decides which calls the shim answers itself, and answers them.
pub trait Interceptor: Send + Sync + 'static {
    /// Whether calls to `method` (a gRPC path) are answered by [`Self::call`].
    /// Called for every request, so it must be cheap.
    fn intercepts(&self, method: &str) -> bool;
    /// Answer a call: the encoded response message, or a status.
    fn call(&self, call: LocalCall) -> CallFuture;
}

/// Forwards everything.
pub struct ForwardAll;

impl Interceptor for ForwardAll {
    fn intercepts(&self, _: &str) -> bool {
        false
    }
    fn call(&self, _: LocalCall) -> CallFuture {
        Box::pin(async { Err(tonic::Status::internal("not intercepted")) })
    }
}

/// How the proxy serves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// After the shutdown signal, how long calls in flight may finish.
    pub drain: Duration,
    /// Client connections served at once; more are refused.
    pub max_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drain: crate::config::DEFAULT_DRAIN_TIMEOUT,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serve CRI on `listener`, relaying to the runtime's Unix socket at `runtime`,
/// until `shutdown` resolves; then stop accepting and drain in-flight calls for
/// at most `drain`.
pub async fn serve(
    listener: UnixListener,
    runtime: PathBuf,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::disabled());
    let options = Options {
        drain,
        ..Options::default()
    };
    serve_with(
        listener,
        runtime,
        Arc::new(ForwardAll),
        metrics,
        shutdown,
        options,
    )
    .await
}

/// [`serve`] with an interceptor, recording into `metrics`.
pub async fn serve_with(
    listener: UnixListener,
    runtime: PathBuf,
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> anyhow::Result<()> {
    let drain = options.drain;
    let runtime: Arc<PathBuf> = Arc::new(runtime);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    info!(runtime = %runtime.display(), max_connections = options.max_connections, "serving CRI");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if conns.len() >= options.max_connections => {
                    refusals.refuse(stream, options.max_connections);
                }
                Ok((stream, _)) => {
                    conns.spawn(connection(
                        stream,
                        runtime.clone(),
                        interceptor.clone(),
                        metrics.clone(),
                        drain_rx.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let open = conns.len();
    info!(connections = open, drain_timeout = ?drain, "shutting down: draining in-flight calls");
    drain_tx.send_replace(true);
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "drain timeout: closing connections with calls in flight"
        );
        conns.abort_all();
    }
    Ok(())
}

/// Connections refused at the cap, logged at most every 10 s.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged: Option<std::time::Instant>,
}

impl Refusals {
    /// Tell the client why (SETTINGS and GOAWAY `ENHANCE_YOUR_CALM`), then
    /// close.
    fn refuse(&mut self, mut stream: UnixStream, cap: usize) {
        self.since_log += 1;
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            warn!(
                max_connections = cap,
                refused = self.since_log,
                "client connection refused: the shim already serves max_connections connections \
                 (raise max_connections, or find the client that opens so many)"
            );
            self.since_log = 0;
            self.logged = Some(std::time::Instant::now());
        }
        tokio::spawn(async move {
            let mut out = BytesMut::new();
            frame::put_settings(&mut out, &[]);
            frame::put_goaway(
                &mut out,
                0,
                frame::reason::ENHANCE_YOUR_CALM,
                b"sidecar-shim: too many connections",
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

async fn connection(
    mut client: UnixStream,
    runtime: Arc<PathBuf>,
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
    drain: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(4096);
    match tokio::time::timeout(PREFACE_TIMEOUT, read_preface(&mut client, &mut buf)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            debug!("client did not send the HTTP/2 preface; closing");
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "client connection failed before the preface");
            return;
        }
        Err(_) => {
            debug!("client sent no preface in time; closing");
            return;
        }
    }
    bytes::Buf::advance(&mut buf, frame::PREFACE.len());
    conn::serve(client, buf, runtime, interceptor, metrics, drain).await
}

/// Read until the 24-byte preface is in `buf`; false if the client sent
/// something else or closed first.
async fn read_preface(client: &mut UnixStream, buf: &mut BytesMut) -> std::io::Result<bool> {
    while buf.len() < frame::PREFACE.len() {
        if client.read_buf(buf).await? == 0 {
            return Ok(false);
        }
        let n = buf.len().min(frame::PREFACE.len());
        if buf[..n] != frame::PREFACE[..n] {
            return Ok(false);
        }
    }
    Ok(true)
}
