//! The proxy against a real containerd: every test starts a private
//! containerd and a `sidecar-shim` process in front of it, sends CRI calls
//! through the shim and checks them against what containerd itself answers
//! (directly, on its own socket), never against the shim's logs.
//!
//! - CRI calls through the shim: runtime, images, pod and container
//!   lifecycle, ExecSync (also with output spanning many flow-control
//!   windows), ListContainers filters and a response larger than 64 KiB.
//! - Identical answers direct and through the shim: unknown methods, the
//!   v1alpha2 API (gone in containerd 2.x), a server-streaming method
//!   (UNIMPLEMENTED in containerd 1.6, a stream of events in 1.7 and 2.x),
//!   and the response headers and trailers of a call.
//! - `grpc-timeout` reaches containerd.
//! - Any `:authority` is accepted.
//! - containerd killed and restarted (or not yet started) under the shim.
//! - Graceful shutdown on SIGTERM, with and without calls outliving the drain
//!   timeout.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes};
use hyper::body::{Body as _, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Container, ContainerFilter, ContainerState, ContainerStateValue, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, GetEventsRequest, ImageSpec,
    ImageStatusRequest, ListContainersRequest, ListContainersResponse, ListImagesRequest,
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxState, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, StartContainerRequest, StatusRequest,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest, VersionResponse,
};
use nix::sys::signal::Signal;
use prost::Message as _;
use tokio::net::UnixStream;
use tonic::client::{Grpc, GrpcService};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::StdError;
use tonic::transport::{Channel, Uri};
use tonic::{Code, Status};

use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);
/// What "fails fast" means while the runtime is down: before the shim could
/// have spent its 2 s connect timeout on the runtime (`CONNECT_TIMEOUT` in
/// src/proxy/conn.rs; a Unix socket connects or fails at once), let alone
/// waited for the runtime to come back (a call would then hang: the callers
/// give up after 10 s). A healthy answer takes milliseconds.
const FAST: Duration = Duration::from_secs(2);
/// The HTTP/2 default (and smallest useful) flow-control window.
const SPEC_WINDOW: u32 = 65_535;

// ---------------------------------------------------------------------------
// Setup helpers

/// A private containerd and a shim in front of it (listening in the
/// containerd's directory).
async fn containerd_and_shim(extra_args: &[&str]) -> Result<(PrivateContainerd, ShimProcess)> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), extra_args).await?;
    Ok((containerd, shim))
}

/// Prints the tails of the given logs when a test fails by returning an
/// error (`tests/support` prints them only on a panic). Declare it after the
/// containerd and shim so it runs while their files still exist; call
/// [`LogsOnError::passed`] at the end.
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

fn v1() -> VersionRequest {
    VersionRequest {
        version: "v1".into(),
    }
}

/// RunPodSandbox + CreateContainer + StartContainer of a busybox container
/// running `script`, through `rt`. Returns the pod config, pod id and
/// container id.
async fn pod_with_container(
    rt: &mut RuntimeServiceClient<Channel>,
    containerd: &PrivateContainerd,
    name: &str,
    script: &str,
) -> Result<(PodSandboxConfig, String, String)> {
    let pod_config = pod_sandbox_config(name, &containerd.pod_log_root());
    let pod_id = run_pod(rt, &pod_config).await?;
    let mut config = container_config("main", &[]);
    config.command = sh(script);
    let container_id = start_container(rt, &pod_id, &pod_config, &config).await?;
    Ok((pod_config, pod_id, container_id))
}

/// Poll (on containerd directly) until `path` exists inside the container.
async fn wait_for_file_in_container(
    direct: &RuntimeServiceClient<Channel>,
    container_id: &str,
    path: &str,
) -> Result<()> {
    wait_for(TIMEOUT, &format!("{path} in container"), || {
        let mut rt = direct.clone();
        let id = container_id.to_string();
        let path = path.to_string();
        async move {
            exec_sync(&mut rt, &id, &["test", "-e", &path], 10)
                .await
                .is_ok_and(|o| o.exit_code == 0)
        }
    })
    .await
}

/// ListContainers, sorted by id.
async fn list_containers(
    rt: &mut RuntimeServiceClient<Channel>,
    filter: Option<ContainerFilter>,
) -> Result<Vec<Container>> {
    let mut containers = rt
        .list_containers(ListContainersRequest { filter })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers;
    containers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(containers)
}

fn ids(containers: &[Container]) -> BTreeSet<String> {
    containers.iter().map(|c| c.id.clone()).collect()
}

/// `path` with every byte outside RFC 3986's unreserved set percent-encoded,
/// as grpc-go based clients put a Unix socket path into `:authority`.
fn percent_encode(path: &Path) -> String {
    path.to_string_lossy()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A status as something comparable: code, message and details.
fn status_parts(status: &Status) -> (Code, String, Bytes) {
    (
        status.code(),
        status.message().to_string(),
        status.details().to_vec().into(),
    )
}

/// StopPodSandbox + RemovePodSandbox.
async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<()> {
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .context("StopPodSandbox")?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.to_string(),
    })
    .await
    .context("RemovePodSandbox")?;
    Ok(())
}

/// How a GetContainerEvents call went.
#[derive(Debug, PartialEq)]
enum EventsAnswer {
    /// It ended with this status (code, message, details).
    Status((Code, String, Bytes)),
    /// A stream: a pod's events.
    Events(Vec<PodEvent>),
}

/// A pod's event without what differs from pod to pod (ids, times).
#[derive(Debug, PartialEq)]
struct PodEvent {
    kind: i32,
    /// The sandbox's name and state, as the event carries them.
    sandbox: Option<(String, i32)>,
    containers: usize,
}

/// GetContainerEvents over `channel`, as its only subscriber: its status,
/// or the events of a pod run and removed while it is open.
async fn container_events(
    containerd: &PrivateContainerd,
    channel: &Channel,
) -> Result<EventsAnswer> {
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let call = tokio::spawn(async move { rt.get_container_events(GetEventsRequest {}).await });
    // An open stream's response headers go out with its first event: until
    // the call has answered (an error, or an event), make events with pods
    // run and removed. (One that reaches containerd after a pod's events
    // waits for the next pod's.)
    let (mut direct, _) = containerd.cri();
    let started = Instant::now();
    while !call.is_finished() {
        ensure!(
            started.elapsed() < TIMEOUT,
            "GetContainerEvents: no answer after {TIMEOUT:?} of pods coming and going"
        );
        let config = pod_sandbox_config("events-warm-up", &containerd.pod_log_root());
        let pod = run_pod(&mut direct, &config).await?;
        remove_pod(&mut direct, &pod).await?;
    }
    let mut stream = match call.await? {
        Err(status) => return Ok(EventsAnswer::Status(status_parts(&status))),
        Ok(response) => response.into_inner(),
    };
    let config = pod_sandbox_config("events", &containerd.pod_log_root());
    let pod = run_pod(&mut direct, &config).await?;
    remove_pod(&mut direct, &pod).await?;
    // containerd sends events in order: the pod's are all there once one of
    // a pod run after it comes (which events a sandbox has depends on the
    // version, so none of the pod's own can mark the end).
    let config = pod_sandbox_config("events-then", &containerd.pod_log_root());
    let then = run_pod(&mut direct, &config).await?;
    let mut events = Vec::new();
    let mut others = Vec::new();
    loop {
        let event = within(TIMEOUT, "GetContainerEvents", stream.message())
            .await
            .with_context(|| format!("{pod}'s events so far: {events:?}; others: {others:?}"))??
            .with_context(|| format!("the stream ended before {then}'s events: {events:?}"))?;
        let of = |id: &str| {
            event.container_id == id
                || event
                    .pod_sandbox_status
                    .as_ref()
                    .is_some_and(|s| s.id == id)
        };
        if of(&then) {
            break;
        }
        if of(&pod) {
            let sandbox = event.pod_sandbox_status.as_ref().map(|s| {
                let name = s.metadata.as_ref().map(|m| m.name.clone());
                (name.unwrap_or_default(), s.state)
            });
            events.push(PodEvent {
                kind: event.container_event_type,
                sandbox,
                containers: event.containers_statuses.len(),
            });
        } else {
            others.push((event.container_id, event.container_event_type));
        }
    }
    remove_pod(&mut direct, &then).await?;
    Ok(EventsAnswer::Events(events))
}

// ---------------------------------------------------------------------------
// gRPC without generated clients: a raw-bytes codec (messages encoded and
// decoded with prost by the caller) for arbitrary paths, and a client over a
// bare hyper HTTP/2 connection.

/// Passes message bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A unary call to any `path`, with prost messages.
async fn unary<T, Req, Resp>(
    grpc: &mut Grpc<T>,
    path: &str,
    request: tonic::Request<Req>,
) -> Result<tonic::Response<Resp>, Status>
where
    T: GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: hyper::body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as hyper::body::Body>::Error: Into<StdError> + Send,
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))?;
    let path = http::uri::PathAndQuery::try_from(path)
        .map_err(|e| Status::internal(format!("bad path {path}: {e}")))?;
    let request = request.map(|m| Bytes::from(m.encode_to_vec()));
    let (metadata, bytes, extensions) = grpc.unary(request, path, RawCodec).await?.into_parts();
    let message =
        Resp::decode(bytes).map_err(|e| Status::internal(format!("decoding the response: {e}")))?;
    Ok(tonic::Response::from_parts(metadata, message, extensions))
}

type H2Sender = hyper::client::conn::http2::SendRequest<tonic::body::Body>;

/// A bare hyper HTTP/2 client connection to a Unix socket, with the given
/// flow-control windows (None: hyper's defaults). Unlike a tonic `Channel`
/// it has no timeout layer: a `grpc-timeout` header does not arm a client
/// timer, so whatever happens at the deadline comes from the server.
async fn h2_connect(socket: &Path, window: Option<u32>) -> Result<H2Sender> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = window {
        builder
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
    }
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A tower service over an [`H2Sender`], for `tonic::client::Grpc`.
#[derive(Clone)]
struct H2(H2Sender);

impl tower::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// A gRPC client over a bare hyper HTTP/2 connection (`:authority`
/// `localhost`).
async fn plain_grpc(socket: &Path, window: Option<u32>) -> Result<Grpc<H2>> {
    let sender = h2_connect(socket, window).await?;
    Ok(
        Grpc::with_origin(H2(sender), Uri::from_static("http://localhost"))
            .max_decoding_message_size(MAX_MESSAGE_SIZE),
    )
}

/// A request body of one chunk.
struct Full(Option<Bytes>);

impl hyper::body::Body for Full {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.take().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// `fut`, or an error naming `what` after `timeout`.
async fn within<F: Future>(timeout: Duration, what: &str, fut: F) -> Result<F::Output> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("{what}: nothing after {timeout:?}"))
}

/// An HTTP/2 response exactly as received: status, headers, body bytes,
/// trailers.
#[derive(Debug, PartialEq)]
struct RawResponse {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// POST one gRPC message to `path` on a fresh bare HTTP/2 connection and
/// return the response as received.
async fn raw_grpc_post(socket: &Path, path: &str, message: &[u8]) -> Result<RawResponse> {
    let mut sender = within(TIMEOUT, "HTTP/2 handshake", h2_connect(socket, None)).await??;
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.put_u32(u32::try_from(message.len())?);
    body.extend_from_slice(message);
    let request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Full(Some(body.into()))))?;
    let response = within(TIMEOUT, "response headers", sender.send_request(request)).await??;
    let (parts, mut incoming) = response.into_parts();
    let mut body = Vec::new();
    let mut trailers = None;
    while let Some(frame) = within(
        TIMEOUT,
        "response body",
        std::future::poll_fn(|cx| Pin::new(&mut incoming).poll_frame(cx)),
    )
    .await?
    {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => body.extend_from_slice(&data),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    ensure!(trailers.is_none(), "two trailer blocks");
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.into(),
        trailers,
    })
}

// ---------------------------------------------------------------------------
// 1. CRI calls through the shim

/// Version, Status, ListImages and ImageStatus through the shim answer what
/// containerd answers directly.
#[tokio::test]
async fn runtime_and_image_calls_through_the_shim() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, mut direct_img) = containerd.cri();
    let (mut rt, mut img) = shim.cri();

    let version = rt.version(v1()).await.context("Version")?.into_inner();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    assert_eq!(version, direct.version(v1()).await?.into_inner());

    let status = rt
        .status(StatusRequest { verbose: false })
        .await
        .context("Status")?
        .into_inner()
        .status
        .context("Status without status")?;
    for condition in ["RuntimeReady", "NetworkReady"] {
        let c = status
            .conditions
            .iter()
            .find(|c| c.r#type == condition)
            .with_context(|| format!("no {condition} condition in {status:?}"))?;
        ensure!(c.status, "{condition} is false: {c:?}");
    }
    let direct_status = direct
        .status(StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .context("direct Status without status")?;
    assert_eq!(status.conditions, direct_status.conditions);

    let mut images = img
        .list_images(ListImagesRequest { filter: None })
        .await
        .context("ListImages")?
        .into_inner()
        .images;
    for want in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        ensure!(
            images.iter().any(|i| i.repo_tags.iter().any(|t| t == want)),
            "{want} not in ListImages through the shim: {images:?}"
        );
    }
    let mut direct_images = direct_img
        .list_images(ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    images.sort_by(|a, b| a.id.cmp(&b.id));
    direct_images.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(images, direct_images);

    for want in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        let request = ImageStatusRequest {
            image: Some(ImageSpec {
                image: want.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let status = img
            .image_status(request.clone())
            .await
            .with_context(|| format!("ImageStatus {want}"))?
            .into_inner();
        let image = status
            .image
            .as_ref()
            .with_context(|| format!("ImageStatus({want}) through the shim found nothing"))?;
        ensure!(image.repo_tags.iter().any(|t| t == want), "{image:?}");
        assert_eq!(status, direct_img.image_status(request).await?.into_inner());
    }
    // An image that is not there: the same (empty) answer.
    let request = ImageStatusRequest {
        image: Some(ImageSpec {
            image: "localhost/sidecar-shim/no-such-image:test".into(),
            ..Default::default()
        }),
        verbose: false,
    };
    let missing = img.image_status(request.clone()).await?.into_inner();
    ensure!(missing.image.is_none(), "{missing:?}");
    assert_eq!(
        missing,
        direct_img.image_status(request).await?.into_inner()
    );
    logs.passed()
}

/// A pod and a container through their whole lifecycle, every call through
/// the shim, every effect checked on containerd directly.
#[tokio::test]
async fn pod_and_container_lifecycle_through_the_shim() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (mut rt, _) = shim.cri();

    let pod_config = pod_sandbox_config("lifecycle", &containerd.pod_log_root());
    let pod_id = run_pod(&mut rt, &pod_config).await?;
    let pod_request = PodSandboxStatusRequest {
        pod_sandbox_id: pod_id.clone(),
        verbose: false,
    };
    let pod_status = rt
        .pod_sandbox_status(pod_request.clone())
        .await
        .context("PodSandboxStatus")?
        .into_inner();
    let status = pod_status.status.as_ref().context("no pod status")?;
    assert_eq!(status.id, pod_id);
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    let ip = status.network.as_ref().map(|n| n.ip.as_str()).unwrap_or("");
    ensure!(!ip.is_empty(), "pod has no IP: {pod_status:?}");
    assert_eq!(
        pod_status,
        direct
            .pod_sandbox_status(pod_request.clone())
            .await?
            .into_inner()
    );

    // A PID 1 that exits 7 on SIGTERM, so the exit code is ours.
    let mut config = container_config("main", &[]);
    config.command = sh("trap 'exit 7' TERM; echo started; sleep 1000 & wait");
    let container_id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    ensure!(!container_id.is_empty());
    assert_eq!(
        container_state(&mut direct, &container_id).await?,
        ContainerState::ContainerCreated
    );

    rt.start_container(StartContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .context("StartContainer")?;
    let status_request = ContainerStatusRequest {
        container_id: container_id.clone(),
        verbose: false,
    };
    let status = rt
        .container_status(status_request.clone())
        .await
        .context("ContainerStatus")?
        .into_inner();
    let s = status.status.as_ref().context("no container status")?;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    ensure!(s.started_at > 0, "started_at not set: {s:?}");
    assert_eq!(s.metadata.as_ref().map(|m| m.name.as_str()), Some("main"));
    assert_eq!(
        status,
        direct
            .container_status(status_request.clone())
            .await?
            .into_inner()
    );

    let out = exec_sync(
        &mut rt,
        &container_id,
        &["sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3"],
        10,
    )
    .await?;
    assert_eq!(out.exit_code, 3, "{out:?}");
    assert_eq!(out.stdout, "out-42\n");
    assert_eq!(out.stderr, "err\n");
    let out = exec_sync(&mut rt, &container_id, &["cat", "/etc/hostname"], 10).await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "lifecycle");

    rt.stop_container(StopContainerRequest {
        container_id: container_id.clone(),
        timeout: 10,
    })
    .await
    .context("StopContainer")?;
    let s = direct
        .container_status(status_request.clone())
        .await?
        .into_inner()
        .status
        .context("no container status")?;
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert_eq!(s.exit_code, 7, "{s:?}");
    ensure!(s.finished_at >= s.started_at, "{s:?}");

    rt.remove_container(RemoveContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .context("RemoveContainer")?;
    let gone = direct.container_status(status_request).await;
    ensure!(
        matches!(&gone, Err(s) if s.code() == Code::NotFound),
        "ContainerStatus after RemoveContainer: {gone:?}"
    );
    ensure!(list_containers(&mut direct, None).await?.is_empty());

    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    let s = direct
        .pod_sandbox_status(pod_request.clone())
        .await?
        .into_inner()
        .status
        .context("no pod status")?;
    assert_eq!(s.state, PodSandboxState::SandboxNotready as i32, "{s:?}");

    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .context("RemovePodSandbox")?;
    let left = direct
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(left.is_empty(), "pods left: {left:?}");
    logs.passed()
}

/// ExecSync output of 2 MB arrives complete: with the CRI client, and with a
/// client whose windows are the HTTP/2 default of 64 KiB, so the response
/// only flows as WINDOW_UPDATEs travel through the shim (about 30 windows).
#[tokio::test]
async fn exec_sync_output_spanning_many_flow_control_windows() -> Result<()> {
    const SIZE: usize = 2_000_000;
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (_, _, container_id) =
        pod_with_container(&mut direct, &containerd, "bigexec", "sleep 1000").await?;
    let script = format!("head -c {SIZE} /dev/zero | tr '\\0' a; echo done >&2");
    let cmd = ["sh", "-c", script.as_str()];

    let (mut rt, _) = shim.cri();
    let started = Instant::now();
    let out = exec_sync(&mut rt, &container_id, &cmd, 30).await?;
    eprintln!("2 MB ExecSync through the shim: {:?}", started.elapsed());
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stderr, "done\n");
    assert_eq!(out.stdout.len(), SIZE);
    ensure!(out.stdout.bytes().all(|b| b == b'a'), "stdout corrupted");

    // Several calls, one after the other, on one connection with small
    // windows: the connection-level window must keep being replenished.
    let mut grpc = plain_grpc(shim.listen(), Some(SPEC_WINDOW)).await?;
    for round in 0..2 {
        let started = Instant::now();
        let out: ExecSyncResponse = unary(
            &mut grpc,
            "/runtime.v1.RuntimeService/ExecSync",
            tonic::Request::new(ExecSyncRequest {
                container_id: container_id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            }),
        )
        .await
        .with_context(|| format!("ExecSync with 64 KiB windows, round {round}"))?
        .into_inner();
        eprintln!(
            "2 MB ExecSync through the shim with 64 KiB windows: {:?}",
            started.elapsed()
        );
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stderr, b"done\n");
        assert_eq!(out.stdout.len(), SIZE);
        ensure!(out.stdout.iter().all(|&b| b == b'a'), "stdout corrupted");
    }
    logs.passed()
}

/// ListContainers filters (id, state, pod, label, combined) through the shim
/// select what they select directly.
#[tokio::test]
async fn list_containers_filters_through_the_shim() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (mut rt, _) = shim.cri();

    let (pod_a_config, pod_a, main) =
        pod_with_container(&mut rt, &containerd, "filter-a", "sleep 1000").await?;
    let idle = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_a.clone(),
            config: Some(container_config("idle", &["sleep", "1000"])),
            sandbox_config: Some(pod_a_config),
        })
        .await
        .context("CreateContainer idle")?
        .into_inner()
        .container_id;
    let (_, pod_b, other) =
        pod_with_container(&mut rt, &containerd, "filter-b", "sleep 1000").await?;

    let set = |ids: &[&String]| -> BTreeSet<String> { ids.iter().map(|s| s.to_string()).collect() };
    let by_label = |name: &str| ContainerFilter {
        label_selector: HashMap::from([(
            "io.kubernetes.container.name".to_string(),
            name.to_string(),
        )]),
        ..Default::default()
    };
    let running = Some(ContainerStateValue {
        state: ContainerState::ContainerRunning as i32,
    });
    let cases: Vec<(&str, Option<ContainerFilter>, BTreeSet<String>)> = vec![
        ("no filter", None, set(&[&main, &idle, &other])),
        (
            "by id",
            Some(ContainerFilter {
                id: idle.clone(),
                ..Default::default()
            }),
            set(&[&idle]),
        ),
        (
            "by state RUNNING",
            Some(ContainerFilter {
                state: running,
                ..Default::default()
            }),
            set(&[&main, &other]),
        ),
        (
            "by state CREATED",
            Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerCreated as i32,
                }),
                ..Default::default()
            }),
            set(&[&idle]),
        ),
        (
            "by pod A",
            Some(ContainerFilter {
                pod_sandbox_id: pod_a.clone(),
                ..Default::default()
            }),
            set(&[&main, &idle]),
        ),
        (
            "by pod B",
            Some(ContainerFilter {
                pod_sandbox_id: pod_b.clone(),
                ..Default::default()
            }),
            set(&[&other]),
        ),
        (
            "by label main",
            Some(by_label("main")),
            set(&[&main, &other]),
        ),
        ("by label idle", Some(by_label("idle")), set(&[&idle])),
        (
            "by pod A and state RUNNING",
            Some(ContainerFilter {
                pod_sandbox_id: pod_a.clone(),
                state: running,
                ..Default::default()
            }),
            set(&[&main]),
        ),
        (
            "by unknown id",
            Some(ContainerFilter {
                id: "0".repeat(64),
                ..Default::default()
            }),
            BTreeSet::new(),
        ),
    ];
    for (what, filter, want) in cases {
        let through_shim = list_containers(&mut rt, filter.clone())
            .await
            .with_context(|| format!("ListContainers {what}"))?;
        assert_eq!(ids(&through_shim), want, "ListContainers {what}");
        let direct_answer = list_containers(&mut direct, filter).await?;
        assert_eq!(through_shim, direct_answer, "ListContainers {what}");
    }
    logs.passed()
}

/// 300 containers (created through the shim, several calls at a time on one
/// connection) make a ListContainers response far larger than 64 KiB; it
/// arrives whole, with the CRI client and with 64 KiB windows.
#[tokio::test]
async fn list_containers_larger_than_a_flow_control_window() -> Result<()> {
    const CONTAINERS: usize = 300;
    const IN_FLIGHT: usize = 8;
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (rt, _) = shim.cri();

    let pod_config = pod_sandbox_config("many", &containerd.pod_log_root());
    let pod_id = run_pod(&mut rt.clone(), &pod_config).await?;
    let started = Instant::now();
    let mut created = BTreeSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONTAINERS {
        if tasks.len() >= IN_FLIGHT {
            let id = tasks.join_next().await.context("no task")???;
            created.insert(id);
        }
        let mut rt = rt.clone();
        let pod_id = pod_id.clone();
        let pod_config = pod_config.clone();
        tasks.spawn(async move {
            let mut config = container_config(&format!("c{i:03}"), &["sleep", "1000"]);
            // About 400 bytes more per container, for a response of more
            // than three 64 KiB windows.
            config.annotations.insert(
                "test.sidecar-shim/padding".into(),
                format!("{i:03}-{}", "x".repeat(400)),
            );
            let id = rt
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod_id,
                    config: Some(config),
                    sandbox_config: Some(pod_config),
                })
                .await
                .with_context(|| format!("CreateContainer c{i:03}"))?
                .into_inner()
                .container_id;
            anyhow::Ok(id)
        });
    }
    while let Some(id) = tasks.join_next().await {
        created.insert(id??);
    }
    eprintln!(
        "created {CONTAINERS} containers through the shim in {:?}",
        started.elapsed()
    );
    assert_eq!(created.len(), CONTAINERS);

    let direct_list = list_containers(&mut direct, None).await?;
    assert_eq!(ids(&direct_list), created);
    let size = ListContainersResponse {
        containers: direct_list.clone(),
    }
    .encoded_len();
    eprintln!("ListContainers response: {size} bytes");
    ensure!(size > 3 * 65_536, "response only {size} bytes");

    let through_shim = list_containers(&mut rt.clone(), None).await?;
    assert_eq!(through_shim.len(), CONTAINERS);
    assert_eq!(through_shim, direct_list);

    let mut grpc = plain_grpc(shim.listen(), Some(SPEC_WINDOW)).await?;
    for round in 0..2 {
        let mut small_windows: Vec<Container> = unary::<_, _, ListContainersResponse>(
            &mut grpc,
            "/runtime.v1.RuntimeService/ListContainers",
            tonic::Request::new(ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod_id.clone(),
                    ..Default::default()
                }),
            }),
        )
        .await
        .with_context(|| format!("ListContainers with 64 KiB windows, round {round}"))?
        .into_inner()
        .containers;
        small_windows.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(small_windows, direct_list);
    }
    logs.passed()
}

// ---------------------------------------------------------------------------
// 2. Identical answers

/// Calls containerd does not serve get the same status (code, message,
/// details) through the shim as directly: an unknown method, an unknown
/// service. So does the v1alpha2 Version (served by 1.6, "unknown service"
/// from 2.x).
#[tokio::test]
async fn unknown_and_old_methods_answer_identically() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let direct_channel = channel_with_authority(containerd.socket(), "localhost");
    let shim_channel = channel_with_authority(shim.listen(), "localhost");

    for path in [
        "/runtime.v1.RuntimeService/NoSuchMethod",
        "/runtime.v1.NoSuchService/Version",
        "/runtime.v1.ImageService/NoSuchMethod",
    ] {
        let mut answers = Vec::new();
        for channel in [&direct_channel, &shim_channel] {
            let mut grpc = Grpc::new(channel.clone());
            let answer = unary::<_, _, VersionResponse>(&mut grpc, path, tonic::Request::new(v1()))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| status_parts(&s));
            answers.push(answer);
        }
        eprintln!("{path}: {:?}", answers[0]);
        ensure!(
            matches!(&answers[0], Err((Code::Unimplemented, _, _))),
            "containerd answered {path} with {:?}",
            answers[0]
        );
        assert_eq!(
            answers[1], answers[0],
            "{path} through the shim vs directly"
        );
    }

    // runtime.v1alpha2 Version.
    let mut answers = Vec::new();
    for channel in [&direct_channel, &shim_channel] {
        let mut rt =
            k8s_cri::v1alpha2::runtime_service_client::RuntimeServiceClient::new(channel.clone());
        let answer = rt
            .version(k8s_cri::v1alpha2::VersionRequest {
                version: "v1alpha2".into(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| status_parts(&s));
        answers.push(answer);
    }
    eprintln!("v1alpha2 Version: {:?}", answers[0]);
    assert_eq!(
        answers[1], answers[0],
        "v1alpha2 Version through the shim vs directly"
    );
    logs.passed()
}

/// GetContainerEvents (server-streaming): containerd 1.6 answers
/// UNIMPLEMENTED; 1.7 and later keep the stream open and send an event for
/// every change of a sandbox or container. Either way a client of the shim
/// gets containerd's answer: the same status, or the same events (the shim
/// answers from its own subscription; for pods without sidecars it changes
/// nothing). containerd 1.7 hands each event to only one of its
/// subscribers, and the shim is one as soon as it runs: the direct answer
/// is taken before the shim starts.
#[tokio::test]
async fn container_events_through_the_shim_are_containerds() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let direct = container_events(
        &containerd,
        &channel_with_authority(containerd.socket(), "localhost"),
    )
    .await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let via_shim =
        container_events(&containerd, &channel_with_authority(&listen, "localhost")).await?;
    eprintln!("GetContainerEvents: {direct:?}");
    if let EventsAnswer::Events(events) = &direct {
        ensure!(!events.is_empty(), "no events of the pod");
    }
    assert_eq!(
        via_shim, direct,
        "GetContainerEvents through the shim vs directly"
    );
    logs.passed()
}

/// A successful call's response — status, headers, message bytes and
/// trailers — is the same through the shim as directly; so are the bytes of
/// an error answer (Trailers-Only). Also through a shim with metrics on,
/// whose relay decodes the response header blocks too.
#[tokio::test]
async fn response_headers_and_trailers_are_identical() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let with_metrics = ShimProcess::start(
        &containerd.dir().join("shim-metrics.sock"),
        containerd.socket(),
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await?;
    let logs = LogsOnError::new(&[
        containerd.log_path(),
        shim.log_path().to_path_buf(),
        with_metrics.log_path().to_path_buf(),
    ]);
    for (path, message) in [
        ("/runtime.v1.RuntimeService/Version", v1().encode_to_vec()),
        (
            "/runtime.v1.RuntimeService/ContainerStatus",
            ContainerStatusRequest {
                container_id: "no-such-container".into(),
                verbose: false,
            }
            .encode_to_vec(),
        ),
        ("/runtime.v1.RuntimeService/NoSuchMethod", Vec::new()),
    ] {
        let direct = raw_grpc_post(containerd.socket(), path, &message)
            .await
            .with_context(|| format!("{path} directly"))?;
        let via_shim = raw_grpc_post(shim.listen(), path, &message)
            .await
            .with_context(|| format!("{path} through the shim"))?;
        let via_metrics_shim = raw_grpc_post(with_metrics.listen(), path, &message)
            .await
            .with_context(|| format!("{path} through the shim with metrics"))?;
        eprintln!("{path} directly: {direct:?}");
        assert_eq!(direct.status, http::StatusCode::OK);
        ensure!(
            direct.headers.get("content-type").is_some(),
            "no content-type: {direct:?}"
        );
        let grpc_status = direct
            .trailers
            .as_ref()
            .unwrap_or(&direct.headers)
            .get("grpc-status");
        ensure!(grpc_status.is_some(), "no grpc-status: {direct:?}");
        assert_eq!(via_shim, direct, "{path}: through the shim vs directly");
        assert_eq!(
            via_metrics_shim, direct,
            "{path}: through the shim with metrics vs directly"
        );
    }
    logs.passed()
}

// ---------------------------------------------------------------------------
// 3. Deadlines

/// A `grpc-timeout` header reaches containerd: an ExecSync of `sleep 5` with
/// a 2 s deadline ends after about 2 s with containerd's deadline error,
/// through the shim exactly as directly. The client is a bare HTTP/2
/// connection, so the header does not arm a timer in the client (a tonic
/// Channel would, and would answer CANCELLED itself).
///
/// containerd 1.6 does not answer DEADLINE_EXCEEDED here: when the exec's
/// context expires it tries to kill the exec with that same expired context
/// and answers UNKNOWN "failed to exec in container: failed to kill exec
/// \"ID\": context deadline exceeded: unknown". Either code is accepted as
/// long as the message says the deadline was exceeded (1.7 answers either,
/// by timing). containerd 2.x (newer grpc-go) may answer no status at all:
/// at the deadline the server resets the stream (RST_STREAM CANCEL),
/// leaving the status to the client's own timer. The answer through the
/// shim must be of the same kind as the direct one.
#[tokio::test]
async fn grpc_timeout_reaches_containerd() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (_, _, container_id) =
        pod_with_container(&mut direct, &containerd, "deadline", "sleep 1000").await?;

    let mut answers = Vec::new();
    for (what, socket) in [
        ("directly", containerd.socket()),
        ("through the shim", shim.listen()),
    ] {
        let mut grpc = plain_grpc(socket, None).await?;
        let mut request = tonic::Request::new(ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec!["sleep".into(), "5".into()],
            timeout: 0,
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", "2000m".parse()?);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            unary::<_, _, ExecSyncResponse>(
                &mut grpc,
                "/runtime.v1.RuntimeService/ExecSync",
                request,
            ),
        )
        .await
        .with_context(|| format!("ExecSync {what} did not end"))?;
        let elapsed = started.elapsed();
        eprintln!("ExecSync sleep 5 with grpc-timeout 2 s {what}: {answer:?} after {elapsed:?}");
        let status = match answer {
            Ok(r) => bail!("ExecSync {what} succeeded after {elapsed:?}: {r:?}"),
            Err(status) => status,
        };
        let answer = match reset_by_server(&status) {
            Some(reason) => {
                ensure!(
                    reason == h2::Reason::CANCEL,
                    "ExecSync {what}: stream reset with {reason:?} after {elapsed:?}"
                );
                format!("RST_STREAM {reason:?}")
            }
            None => {
                ensure!(
                    matches!(status.code(), Code::DeadlineExceeded | Code::Unknown)
                        && status.message().contains("deadline exceeded"),
                    "ExecSync {what}: {status:?} after {elapsed:?}, not a deadline error"
                );
                format!("{:?} {}", status.code(), without_ids(status.message()))
            }
        };
        ensure!(
            elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_millis(4500),
            "ExecSync {what} ended after {elapsed:?}, deadline 2 s"
        );
        answers.push(answer);
    }
    // Which of containerd's two deadline statuses comes is timing (1.7
    // answered DEADLINE_EXCEEDED directly and UNKNOWN "failed to kill exec"
    // through the shim in one CI run); a reset must be a reset both ways.
    let kind = |a: &str| match a.starts_with("RST_STREAM") {
        true => a.to_string(),
        false => "a deadline status".to_string(),
    };
    assert_eq!(
        kind(&answers[1]),
        kind(&answers[0]),
        "through the shim ({}) vs directly ({})",
        answers[1],
        answers[0]
    );
    logs.passed()
}

/// The reason of the RST_STREAM the server ended the call with, if that is
/// how it ended (rather than with a status).
fn reset_by_server(status: &Status) -> Option<h2::Reason> {
    support::h2_error(status).and_then(|e| e.is_remote().then(|| e.reason()).flatten())
}

/// `text` with every run of 64 hex digits (container, exec ids) replaced.
fn without_ids(text: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        if run.len() == 64 {
            out.push_str("<id>");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

// ---------------------------------------------------------------------------
// 4. :authority

/// Clients sending `localhost` or the percent-encoded listen path as
/// `:authority` (older kubelets, crictl 1.26) are served.
#[tokio::test]
async fn any_authority_is_accepted() -> Result<()> {
    let (containerd, shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (_, _, container_id) =
        pod_with_container(&mut direct, &containerd, "authority", "sleep 1000").await?;
    let direct_list = list_containers(&mut direct, None).await?;
    assert_eq!(ids(&direct_list), BTreeSet::from([container_id]));
    let direct_version = direct.version(v1()).await?.into_inner();

    let encoded = percent_encode(shim.listen());
    ensure!(encoded.contains("%2F"), "{encoded}");
    for authority in ["localhost", encoded.as_str()] {
        let (mut rt, _) = cri_client_with_authority(shim.listen(), authority);
        // Two rounds on one connection: the HPACK state stays in step.
        for round in 0..2 {
            let version = rt
                .version(v1())
                .await
                .with_context(|| format!("Version with :authority {authority}, round {round}"))?
                .into_inner();
            assert_eq!(version, direct_version);
            let list = list_containers(&mut rt, None)
                .await
                .with_context(|| format!("ListContainers with :authority {authority}"))?;
            assert_eq!(list, direct_list, ":authority {authority}");
        }
    }
    logs.passed()
}

// ---------------------------------------------------------------------------
// 5. The runtime going away and coming back

/// A Version call on a fresh connection to `socket` fails with UNAVAILABLE,
/// fast. Returns how long it took.
async fn expect_unavailable_fast(socket: &Path, what: &str) -> Result<Duration> {
    let (mut rt, _) = cri_client(socket);
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), rt.version(v1())).await;
    let elapsed = started.elapsed();
    match answer {
        Err(_) => bail!("{what}: Version hung for 10 s"),
        Ok(Ok(v)) => bail!("{what}: Version succeeded: {v:?}"),
        Ok(Err(status)) => ensure!(
            status.code() == Code::Unavailable,
            "{what}: Version failed with {status:?}, not UNAVAILABLE"
        ),
    }
    ensure!(elapsed < FAST, "{what}: UNAVAILABLE took {elapsed:?}");
    Ok(elapsed)
}

/// Calls on `rt` until one succeeds (UNAVAILABLE is expected on the way).
async fn wait_until_served(rt: &RuntimeServiceClient<Channel>, what: &str) -> Result<()> {
    wait_for_value(TIMEOUT, what, || {
        let mut rt = rt.clone();
        async move {
            match rt.version(v1()).await {
                Ok(v) => Ok(Some(v.into_inner())),
                Err(s) if s.code() == Code::Unavailable => Err(anyhow!("{s:?}")),
                Err(s) => bail!("unexpected answer: {s:?}"),
            }
        }
    })
    .await
    .map(|v| assert_eq!(v.runtime_name, "containerd"))
}

/// containerd SIGKILLed under a running shim: calls fail fast with
/// UNAVAILABLE; once containerd is back on the same socket, the same shim
/// process serves calls again, and containers from before are there.
#[tokio::test]
async fn containerd_killed_and_restarted_under_the_shim() -> Result<()> {
    let (mut containerd, mut shim) = containerd_and_shim(&[]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let shim_pid = shim.pid();
    let (mut rt, _) = shim.cri();
    let (_, _, container_id) =
        pod_with_container(&mut rt, &containerd, "runtime-restart", "sleep 1000").await?;

    containerd.kill()?;

    // The client whose connection was relayed: the shim drained that
    // connection with GOAWAY (NO_ERROR) when containerd's side closed. The
    // first call may still be sent on it and fail in the client (tonic:
    // INTERNAL from h2's GoAway, or UNKNOWN "transport error" if the call
    // raced the close); the next one reconnects and must get UNAVAILABLE.
    for attempt in 0..2 {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), rt.version(v1())).await;
        let elapsed = started.elapsed();
        eprintln!("old client, call {attempt} after the kill: {answer:?} after {elapsed:?}");
        match answer {
            Err(_) => bail!("Version {attempt} on the old client hung"),
            Ok(Ok(v)) => bail!("Version {attempt} on the old client succeeded: {v:?}"),
            Ok(Err(s)) if s.code() == Code::Unavailable => {}
            Ok(Err(s))
                if attempt == 0
                    && s.code() == Code::Unknown
                    && s.message() == "transport error" => {}
            Ok(Err(s))
                if attempt == 0
                    && s.code() == Code::Internal
                    && format!("{s:?}").contains("GoAway(")
                    && format!("{s:?}").contains("NO_ERROR") => {}
            Ok(Err(s)) => bail!("Version {attempt} on the old client: {s:?}"),
        }
        ensure!(
            elapsed < FAST,
            "old client: call {attempt} took {elapsed:?}"
        );
    }
    // New connections, and several calls on one of them.
    let mut times = Vec::new();
    for i in 0..3 {
        times.push(expect_unavailable_fast(shim.listen(), &format!("new connection {i}")).await?);
    }
    let (mut one, _) = shim.cri();
    for i in 0..3 {
        let started = Instant::now();
        let answer = one
            .list_containers(ListContainersRequest { filter: None })
            .await;
        let elapsed = started.elapsed();
        ensure!(
            matches!(&answer, Err(s) if s.code() == Code::Unavailable),
            "ListContainers {i} while containerd is down: {answer:?}"
        );
        ensure!(
            elapsed < FAST,
            "ListContainers {i}: UNAVAILABLE took {elapsed:?}"
        );
        times.push(elapsed);
    }
    eprintln!("UNAVAILABLE answers took {times:?}");
    ensure!(shim.try_status()?.is_none(), "the shim exited");

    containerd.restart().await?;
    wait_until_served(&rt, "Version through the shim on the first client").await?;
    wait_until_served(&one, "Version through the shim on the second client").await?;
    let (mut fresh, _) = shim.cri();
    let (mut direct, _) = containerd.cri();
    let via_shim = list_containers(&mut fresh, None).await?;
    ensure!(
        ids(&via_shim).contains(&container_id),
        "container lost: {via_shim:?}"
    );
    assert_eq!(via_shim, list_containers(&mut direct, None).await?);
    let out = exec_sync(&mut fresh, &container_id, &["echo", "back"], 10).await?;
    assert_eq!(out.stdout, "back\n");

    ensure!(shim.try_status()?.is_none(), "the shim exited");
    assert_eq!(shim.pid(), shim_pid);
    ensure!(pid_alive(shim_pid));
    logs.passed()
}

/// A shim started while no containerd exists at its runtime socket answers
/// UNAVAILABLE, then serves calls once containerd starts.
#[tokio::test]
async fn shim_started_before_containerd() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let logs = LogsOnError::new(&[containerd.log_path(), containerd.dir().join("shim.log")]);
    // The private containerd must be created to have a directory and
    // socket path; take it away again, socket file and all.
    containerd.kill()?;
    let socket: PathBuf = containerd.socket().to_path_buf();
    if socket.exists() {
        std::fs::remove_file(&socket)?;
    }
    ensure!(!socket.exists());

    let listen = containerd.dir().join("shim.sock");
    let mut shim = ShimProcess::start(&listen, &socket, &[]).await?;
    let shim_pid = shim.pid();
    let (rt, _) = shim.cri();
    for i in 0..3 {
        expect_unavailable_fast(&listen, &format!("new connection {i}")).await?;
    }
    let started = Instant::now();
    let answer = rt.clone().version(v1()).await;
    ensure!(
        matches!(&answer, Err(s) if s.code() == Code::Unavailable),
        "Version before containerd started: {answer:?}"
    );
    ensure!(started.elapsed() < FAST);

    containerd.restart().await?;
    wait_until_served(&rt, "Version through the shim after containerd started").await?;
    let (mut fresh, mut img) = shim.cri();
    let (mut direct, _) = containerd.cri();
    assert_eq!(
        fresh.version(v1()).await?.into_inner(),
        direct.version(v1()).await?.into_inner()
    );
    let images = img
        .list_images(ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    ensure!(
        images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t == BUSYBOX_IMAGE)),
        "{images:?}"
    );
    ensure!(shim.try_status()?.is_none(), "the shim exited");
    assert_eq!(shim.pid(), shim_pid);
    logs.passed()
}

// ---------------------------------------------------------------------------
// 6. Graceful shutdown

/// Can a new connection be made to `socket`?
async fn connects(socket: &Path) -> bool {
    UnixStream::connect(socket).await.is_ok()
}

/// SIGTERM with an ExecSync (3 s) in flight: new connections are refused, the call
/// completes with its output, the shim exits 0 and removes its socket.
#[tokio::test]
async fn sigterm_lets_the_call_in_flight_finish() -> Result<()> {
    let (containerd, mut shim) = containerd_and_shim(&["--drain-timeout", "10s"]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (_, _, container_id) =
        pod_with_container(&mut direct, &containerd, "drain", "sleep 1000").await?;

    let (mut rt, _) = shim.cri();
    // Connected and working before the call of interest.
    rt.version(v1()).await?;
    let id = container_id.clone();
    let call = tokio::spawn(async move {
        exec_sync(
            &mut rt,
            &id,
            &[
                "sh",
                "-c",
                "touch /tmp/exec-started; sleep 3; echo finished",
            ],
            0,
        )
        .await
    });
    wait_for_file_in_container(&direct, &container_id, "/tmp/exec-started").await?;
    ensure!(
        !call.is_finished(),
        "ExecSync ended early: {:?}",
        call.await?
    );

    let sigterm = Instant::now();
    shim.signal(Signal::SIGTERM)?;
    let listen = shim.listen().to_path_buf();
    wait_for(Duration::from_secs(5), "new connections refused", || {
        let listen = listen.clone();
        async move { !connects(&listen).await }
    })
    .await?;
    eprintln!(
        "connections refused {:?} after SIGTERM; ExecSync still in flight: {}",
        sigterm.elapsed(),
        !call.is_finished()
    );

    let out = tokio::time::timeout(TIMEOUT, call)
        .await
        .context("ExecSync did not end")???;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, "finished\n");
    let status = shim.wait_exit(Duration::from_secs(15)).await?;
    eprintln!(
        "shim exited {:?} after SIGTERM: {status}",
        sigterm.elapsed()
    );
    ensure!(status.success(), "shim exited with {status}");
    ensure!(!listen.exists(), "socket {} left behind", listen.display());
    ensure!(!connects(&listen).await, "the socket still accepts");
    let (mut rt, _) = cri_client(&listen);
    ensure!(rt.version(v1()).await.is_err());
    logs.passed()
}

/// SIGTERM with an ExecSync in flight that outlives --drain-timeout 1s: the
/// shim waits about the drain timeout, then exits 0 anyway.
#[tokio::test]
async fn sigterm_drain_timeout_bounds_the_exit() -> Result<()> {
    let (containerd, mut shim) = containerd_and_shim(&["--drain-timeout", "1s"]).await?;
    let logs = LogsOnError::new(&[containerd.log_path(), shim.log_path().to_path_buf()]);
    let (mut direct, _) = containerd.cri();
    let (_, _, container_id) =
        pod_with_container(&mut direct, &containerd, "drain-timeout", "sleep 1000").await?;

    let (mut rt, _) = shim.cri();
    let id = container_id.clone();
    let call = tokio::spawn(async move {
        exec_sync(
            &mut rt,
            &id,
            &["sh", "-c", "touch /tmp/exec-started; sleep 30"],
            0,
        )
        .await
    });
    wait_for_file_in_container(&direct, &container_id, "/tmp/exec-started").await?;
    ensure!(
        !call.is_finished(),
        "ExecSync ended early: {:?}",
        call.await?
    );

    let sigterm = Instant::now();
    shim.signal(Signal::SIGTERM)?;
    let status = shim.wait_exit(Duration::from_secs(10)).await?;
    let elapsed = sigterm.elapsed();
    eprintln!("shim exited {elapsed:?} after SIGTERM: {status}");
    // The cut-off call fails rather than hangs.
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .context("the cut-off ExecSync hung")??;
    eprintln!("the cut-off ExecSync: {answer:?}");
    ensure!(answer.is_err(), "cut-off ExecSync succeeded: {answer:?}");
    ensure!(status.success(), "shim exited with {status}");
    ensure!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "shim exited {elapsed:?} after SIGTERM with --drain-timeout 1s"
    );
    ensure!(!shim.listen().exists(), "socket left behind");
    logs.passed()
}
