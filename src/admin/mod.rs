//! The admin API: the shim's own gRPC service (`sidecarshim.v1.Admin`,
//! proto/sidecarshim/v1/admin.proto), served on a Unix socket of its own,
//! mode 0600 (root-only on a node), never on the CRI socket. It tells what
//! the lifecycle manages (pods, their containers' states, held calls,
//! deferred starts) and whether the shim can do its job (the runtime
//! answers, the state directory takes writes). [`status`] is its client,
//! `sidecar-shim status`.
//!
//! It runs on the same single-threaded runtime as the CRI relay, so every
//! handler is quick: ListPods copies a snapshot under the machine's lock
//! (never held across an await), Health makes one Version call to the
//! runtime bounded by [`RUNTIME_CHECK_TIMEOUT`].

pub mod status;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::lifecycle::machine::view::{HeldKind, PodView, RoleView, StateView};
use crate::lifecycle::service::Lifecycle;
use crate::lifecycle::store::StoreHealth;

/// The generated wire types and service of `sidecarshim.v1`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("sidecarshim.v1");
}

/// How long Health waits for the runtime's answer to Version (connect
/// included) before it calls the runtime unreachable.
pub const RUNTIME_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the accept loop pauses after a failed accept (out of file
/// descriptors and the like) instead of spinning on the shared runtime.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The Admin service.
pub struct AdminService {
    lifecycle: Lifecycle,
    runtime_socket: PathBuf,
    started: SystemTime,
}

impl AdminService {
    pub fn new(lifecycle: Lifecycle, runtime_socket: PathBuf) -> AdminService {
        AdminService {
            lifecycle,
            runtime_socket,
            started: SystemTime::now(),
        }
    }
}

/// Serves the admin API on `listener` until the future is dropped (the
/// caller aborts it once the CRI proxy has drained).
pub async fn serve(listener: UnixListener, service: AdminService) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(proto::admin_server::AdminServer::new(service))
        .serve_with_incoming(Incoming {
            listener,
            backoff: None,
        })
        .await?;
    Ok(())
}

/// Accepted connections, pausing after a failed accept (tonic's own loop
/// retries at once, which on a single-threaded runtime would starve the
/// CRI relay while the error lasts).
struct Incoming {
    listener: UnixListener,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(sleep) = self.backoff.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => Poll::Ready(Some(Ok(stream))),
            Poll::Ready(Err(e)) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn list_pods(
        &self,
        _: tonic::Request<proto::ListPodsRequest>,
    ) -> Result<tonic::Response<proto::ListPodsResponse>, tonic::Status> {
        let clock = Clock::now();
        let pods = self
            .lifecycle
            .view()
            .iter()
            .map(|p| pod_to_proto(p, &clock))
            .collect();
        Ok(tonic::Response::new(proto::ListPodsResponse {
            pods,
            now_unix_nanos: clock.unix_nanos(clock.instant),
        }))
    }

    async fn health(
        &self,
        _: tonic::Request<proto::HealthRequest>,
    ) -> Result<tonic::Response<proto::HealthResponse>, tonic::Status> {
        let runtime = runtime_health(&self.runtime_socket).await;
        let store = self.lifecycle.store_health().map(store_to_proto);
        let pods = self.lifecycle.view();
        let clock = Clock::now();
        Ok(tonic::Response::new(proto::HealthResponse {
            healthy: runtime.reachable && store.as_ref().is_none_or(|s| s.writable),
            runtime: Some(runtime),
            store,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at_unix_nanos: system_nanos(self.started),
            now_unix_nanos: clock.unix_nanos(clock.instant),
            managed_pods: pods.len() as u32,
            held_calls: pods.iter().map(|p| p.held.len() as u32).sum(),
        }))
    }
}

/// One CRI Version call to the runtime on a new connection (so the answer
/// says whether the runtime can be reached now, not whether an old
/// connection still works).
async fn runtime_health(socket: &Path) -> proto::RuntimeHealth {
    let started = Instant::now();
    let answer = tokio::time::timeout(RUNTIME_CHECK_TIMEOUT, async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let channel = channel_over(stream)
            .await
            .map_err(|e| format!("HTTP/2 connection failed: {e}"))?;
        RuntimeServiceClient::new(channel)
            .version(k8s_cri::v1::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("Version failed: {:?}: {}", s.code(), s.message()))
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "no answer to Version within {RUNTIME_CHECK_TIMEOUT:?}"
        ))
    });
    let latency_micros = started.elapsed().as_micros() as u64;
    let endpoint = socket.display().to_string();
    match answer {
        Ok(v) => proto::RuntimeHealth {
            endpoint,
            reachable: true,
            runtime_name: v.runtime_name,
            runtime_version: v.runtime_version,
            runtime_api_version: v.runtime_api_version,
            error: String::new(),
            latency_micros,
        },
        Err(error) => proto::RuntimeHealth {
            endpoint,
            reachable: false,
            error,
            latency_micros,
            ..Default::default()
        },
    }
}

/// A gRPC channel over an already connected Unix stream (connecting first
/// keeps the connect error an `io::Error` the caller can explain). The
/// channel does not reconnect: it is for a few calls.
pub(crate) async fn channel_over(stream: UnixStream) -> Result<Channel, tonic::transport::Error> {
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            async move {
                stream.map(TokioIo::new).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotConnected, "the connection was closed")
                })
            }
        }))
        .await
}

/// Monotonic instants as wall-clock times, against one reading of both.
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    fn unix_nanos(&self, at: Instant) -> i64 {
        let wall = if at >= self.instant {
            self.system + (at - self.instant)
        } else {
            self.system - (self.instant - at)
        };
        system_nanos(wall)
    }
}

fn system_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn pod_to_proto(p: &PodView, clock: &Clock) -> proto::Pod {
    // The machine names pods namespace/name (kubelet's sandbox metadata).
    let (namespace, name) = p.name.split_once('/').unwrap_or(("", p.name.as_str()));
    let name_of = |id: &str| {
        p.containers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    };
    proto::Pod {
        sandbox_id: p.sandbox_id.clone(),
        namespace: namespace.into(),
        name: name.into(),
        sidecars: p.sidecars.clone(),
        containers: p
            .containers
            .iter()
            .map(|c| {
                use proto::ContainerState as S;
                let (state, exit_code, reason, message, deferral) = match &c.state {
                    StateView::Created => (S::Created, 0, "", "", None),
                    StateView::Deferred { since, deadline } => (
                        S::Deferred,
                        0,
                        "",
                        "",
                        Some(proto::Deferral {
                            since_unix_nanos: clock.unix_nanos(*since),
                            deadline_unix_nanos: clock.unix_nanos(*deadline),
                        }),
                    ),
                    StateView::Starting => (S::Starting, 0, "", "", None),
                    StateView::Running => (S::Running, 0, "", "", None),
                    StateView::Exited { code } => (S::Exited, *code, "", "", None),
                    StateView::NeverStarted {
                        code,
                        reason,
                        message,
                    } => (
                        S::NeverStarted,
                        *code,
                        reason.as_str(),
                        message.as_str(),
                        None,
                    ),
                };
                let (role, sidecar_index) = match c.role {
                    RoleView::Sidecar(i) => (proto::Role::Sidecar, i as u32),
                    RoleView::Normal => (proto::Role::Normal, 0),
                    RoleView::Init => (proto::Role::Init, 0),
                };
                proto::Container {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    role: role as i32,
                    sidecar_index,
                    state: state as i32,
                    exit_code,
                    reason: reason.into(),
                    message: message.into(),
                    ready: c.ready,
                    ready_check: c.ready_check.clone().unwrap_or_default(),
                    stopped_by_shim: c.stopped_by_shim,
                    deferral,
                }
            })
            .collect(),
        held_calls: p
            .held
            .iter()
            .map(|h| proto::HeldCall {
                kind: match h.kind {
                    HeldKind::Start => proto::HeldKind::Start,
                    HeldKind::Stop => proto::HeldKind::Stop,
                    HeldKind::PreStop => proto::HeldKind::PreStop,
                    HeldKind::StopPod => proto::HeldKind::StopPod,
                } as i32,
                container_id: h.container.clone().unwrap_or_default(),
                container_name: h.container.as_deref().map(name_of).unwrap_or_default(),
                since_unix_nanos: h.since.map_or(0, |t| clock.unix_nanos(t)),
                until_unix_nanos: h.until.map_or(0, |t| clock.unix_nanos(t)),
            })
            .collect(),
        terminating: p.terminating,
        job_complete: p.job_complete,
    }
}

fn store_to_proto(s: StoreHealth) -> proto::StoreHealth {
    proto::StoreHealth {
        state_dir: s.dir.display().to_string(),
        writable: s.writable,
        failed_writes: s.failed_writes,
        last_error: s.last_error.unwrap_or_default(),
        pending: s.pending as u32,
    }
}
