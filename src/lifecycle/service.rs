//! The lifecycle's gRPC side: the [`Interceptor`] that turns the calls it
//! claims into machine events, carries out the machine's actions against the
//! runtime, runs readiness checks and watches exits.
//!
//! Every intercepted handler has the same shape: decode what it must, ask the
//! machine, then forward the original bytes, answer, or wait for the machine
//! to release the call. Calls of pods without a sidecar annotation are
//! forwarded as they came (over the shim's own connection to the runtime).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use prost::Message;
use tokio::sync::{oneshot, Notify};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn, Instrument};

use super::machine::{
    Action, CallId, Event, Machine, PodRecord, RuntimeContainer, RuntimePod, RuntimeState,
    Settings, StatusOverride, WallClock,
};
use super::probe;
use super::spec::{self, Defaults, PodSpec, ReadyCheck};
use super::store::{self, Store, StoreHealth};
use crate::failpoint;
use crate::metrics::{Hold, Metrics};
use crate::proxy::{CallFuture, Interceptor, LocalCall, StreamFuture};

mod events;
mod task_exits;

const RUNTIME: &str = "/runtime.v1.RuntimeService/";
const IMAGE: &str = "/runtime.v1.ImageService/";

/// The container annotation the newest kubelets set to init, container or
/// ephemeral (not to be relied on: older kubelets omit it).
const CONTAINER_TYPE: &str = "io.kubernetes.container.type";

/// How often the exits of watched containers are polled (the runtime's
/// GetContainerEvents stream is not implemented by containerd 1.6).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often a sidecar's readiness is checked until it passes: TCP and HTTP
/// checks are a connect on loopback (about 0.2 ms with the thread that enters
/// the pod's network namespace); exec and running checks are runtime calls.
const PROBE_INTERVAL_NET: Duration = Duration::from_millis(10);
const PROBE_INTERVAL_RUNTIME: Duration = Duration::from_millis(50);
/// How long an intercepted call waits for the start-up reconcile (it takes
/// milliseconds when the runtime answers; when the runtime is down, calls
/// fail anyway).
const RECONCILE_WAIT: Duration = Duration::from_secs(5);
/// How often the start-up reconcile is tried while the runtime is down.
const RECONCILE_RETRY: Duration = Duration::from_millis(200);
/// How often failed state writes are tried again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How often the sandboxes of managed pods are checked for pods that went
/// away without a RemovePodSandbox through the shim.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Methods whose calls may be sent to the runtime again when the connection
/// broke under them: doing them twice is doing them once.
const REPEATABLE: &[&str] = &[
    "StopContainer",
    "StopPodSandbox",
    "RemoveContainer",
    "RemovePodSandbox",
    "ContainerStatus",
    "ListContainers",
    "PodSandboxStatus",
];
/// How long such a call is retried: up to its client's deadline less this
/// margin, or this long when the client set none.
const FORWARD_RETRY_MARGIN: Duration = Duration::from_secs(2);
const FORWARD_RETRY_MAX: Duration = Duration::from_secs(60);
/// The shim's own starts and stops, when the runtime is unreachable: tried
/// again this often (until the start's deferral deadline; stops until the
/// container is gone).
const ACTION_RETRY: Duration = Duration::from_millis(200);

/// The methods the lifecycle looks at. `Always`: every call (they carry what
/// tells managed pods apart). `Managed`: only while some pod has a sidecar
/// spec. `Rewrites`: only while some container's status is being rewritten.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum When {
    Always,
    Managed,
    Rewrites,
}

const INTERCEPTED: &[(&str, When)] = &[
    ("CreateContainer", When::Always),
    ("StartContainer", When::Always),
    ("StopContainer", When::Managed),
    ("ExecSync", When::Managed),
    ("Exec", When::Managed),
    ("StopPodSandbox", When::Managed),
    ("RemoveContainer", When::Managed),
    ("RemovePodSandbox", When::Managed),
    ("ContainerStatus", When::Rewrites),
    ("ListContainers", When::Rewrites),
    ("PodSandboxStatus", When::Rewrites),
    // Server-streaming: answered from the shim's own subscription, see
    // `events`.
    ("GetContainerEvents", When::Always),
];

const GET_CONTAINER_EVENTS: &str = "/runtime.v1.RuntimeService/GetContainerEvents";
/// Seen for the pod they name (when pods are managed), then forwarded:
/// kubelet's first step for each container of a pod is an ImageStatus
/// carrying the pod's annotations, then, if the image is missing, a
/// PullImage carrying its sandbox config (see [`Event::PodWork`]).
const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
/// The annotation kubelet gives every pod when it first sees it, a
/// timestamp in nanoseconds, kept for the pod's life (kubelet source:
/// pkg/kubelet/config/config.go). kubelet's ImageStatus requests carry the
/// pod's annotations, so this tells which pod one is for.
const FIRST_SEEN: &str = "kubernetes.io/config.seen";

/// The lifecycle interceptor.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    machine: Mutex<Machine>,
    runtime: RuntimeServiceClient<Channel>,
    raw: tonic::client::Grpc<Channel>,
    defaults: Defaults,
    /// Held calls waiting for the machine's decision.
    pending: Mutex<HashMap<CallId, oneshot::Sender<Decision>>>,
    next_call: AtomicU64,
    /// Wakes the driver (new deadlines, probes, watches).
    wake: Notify,
    managed: AtomicBool,
    rewrites: AtomicBool,
    /// Pods whose annotations were rejected (warned about once).
    rejected: Mutex<HashSet<String>>,
    /// Pod specs by sandbox id (parsed once).
    specs: Mutex<HashMap<String, Arc<PodSpec>>>,
    /// Sandbox ids of managed pods by what names them in image calls: the
    /// pod's uid (a PullImage's sandbox config) and kubelet's first-seen
    /// annotation (an ImageStatus's annotations).
    pod_keys: Mutex<HashMap<PodKey, String>>,
    /// Probe and watch tasks running, by container id.
    probing: Mutex<HashSet<String>>,
    /// Watched containers read once since they became watched, while exits
    /// come from events (an exit the events brought before the container
    /// mattered, to a shim that was not running yet, is not missed).
    read_once: Mutex<HashSet<String>>,
    /// Network namespaces by sandbox id.
    netns: Mutex<HashMap<String, Option<PathBuf>>>,
    /// Maps the machine's instants to wall-clock time (records, timestamps).
    clock: WallClock,
    /// The state directory (None: state is kept in memory only).
    store: Option<Mutex<Store>>,
    /// The start-up reconcile with the runtime is done.
    reconciled: AtomicBool,
    reconciled_notify: Notify,
    /// StopPodSandbox calls being forwarded, by sandbox id (one at a time).
    stop_pod_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Since when each held call is held (for the admin API).
    held_at: Mutex<HashMap<CallId, Instant>>,
    /// The runtime's container events (see `events`).
    events: events::Events,
    metrics: Arc<Metrics>,
}

enum Decision {
    Forward,
    ForwardStop(Duration),
    Answer(Result<(), String>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lifecycle {
    /// The lifecycle over the runtime at `runtime` (its own connection,
    /// opened lazily and re-opened as needed), keeping its state in
    /// `state_dir` when given. Loads what the state directory holds, then
    /// reconciles it with the runtime in the background (intercepted calls
    /// wait for that, see [`RECONCILE_WAIT`]). Must be called inside a tokio
    /// runtime: it starts the driver tasks.
    pub fn new(
        runtime: PathBuf,
        settings: Settings,
        defaults: Defaults,
        state_dir: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Lifecycle {
        let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let path = runtime.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }),
        );
        let exit_events = settings.exit_events;
        let inner = Arc::new(Inner {
            machine: Mutex::new(Machine::new(settings)),
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            raw: tonic::client::Grpc::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            defaults,
            pending: Mutex::default(),
            next_call: AtomicU64::new(1),
            wake: Notify::new(),
            managed: AtomicBool::new(false),
            rewrites: AtomicBool::new(false),
            rejected: Mutex::default(),
            specs: Mutex::default(),
            pod_keys: Mutex::default(),
            probing: Mutex::default(),
            read_once: Mutex::default(),
            netns: Mutex::default(),
            clock: WallClock::now(),
            store: state_dir.map(|d| Mutex::new(Store::open(&d))),
            reconciled: AtomicBool::new(false),
            reconciled_notify: Notify::new(),
            stop_pod_turns: Mutex::default(),
            held_at: Mutex::default(),
            events: events::Events::new(exit_events),
            metrics,
        });
        inner.load_state();
        tokio::spawn(start_up(inner.clone()));
        Lifecycle { inner }
    }

    /// How the state directory is doing (None: no state directory).
    pub fn store_health(&self) -> Option<StoreHealth> {
        self.inner.store.as_ref().map(|s| lock(s).health())
    }
}

impl Interceptor for Lifecycle {
    fn intercepts(&self, method: &str) -> bool {
        // Until the start-up reconcile is done any pod may turn out to be
        // managed: everything the lifecycle may need passes by (and waits
        // for the reconcile).
        let settling = !self.inner.reconciled.load(Ordering::Acquire);
        if method == PULL_IMAGE || method == IMAGE_STATUS {
            return settling || self.inner.managed.load(Ordering::Relaxed);
        }
        let Some(name) = method.strip_prefix(RUNTIME) else {
            return false;
        };
        match INTERCEPTED.iter().find(|(m, _)| *m == name) {
            Some((_, When::Always)) => true,
            Some(_) if settling => true,
            Some((_, When::Managed)) => self.inner.managed.load(Ordering::Relaxed),
            Some((_, When::Rewrites)) => self.inner.rewrites.load(Ordering::Relaxed),
            None => false,
        }
    }

    fn streams(&self, method: &str) -> bool {
        method == GET_CONTAINER_EVENTS
    }

    fn call_stream(&self, _call: LocalCall) -> StreamFuture {
        Box::pin(events::subscribe(self.inner.clone()))
    }

    fn call(&self, call: LocalCall) -> CallFuture {
        let inner = self.inner.clone();
        let name = call
            .method
            .strip_prefix(RUNTIME)
            .or(call.method.strip_prefix(IMAGE))
            .unwrap_or_default()
            .to_string();
        // Every intercepted call's request starts with the id it is about.
        let id = match name.as_str() {
            "ListContainers" | "PullImage" | "ImageStatus" => String::new(),
            _ => FirstId::decode(call.message.clone())
                .map(|f| f.id)
                .unwrap_or_default(),
        };
        let about_pod = matches!(
            name.as_str(),
            "CreateContainer" | "StopPodSandbox" | "RemovePodSandbox" | "PodSandboxStatus"
        );
        let span = tracing::debug_span!(
            "cri",
            rpc.method = %name,
            pod.id = if about_pod { id.as_str() } else { "" },
            container.id = if about_pod { "" } else { id.as_str() },
        );
        Box::pin(
            async move {
                inner.wait_reconciled().await;
                let started = Instant::now();
                let result = match name.as_str() {
                    "PullImage" => inner.pull_image(call).await,
                    "ImageStatus" => inner.image_status(call).await,
                    "CreateContainer" => inner.create_container(call).await,
                    "StartContainer" => inner.start_container(call).await,
                    "StopContainer" => inner.stop_container(call).await,
                    "ExecSync" => inner.exec_sync(call).await,
                    "Exec" => inner.exec(call).await,
                    "StopPodSandbox" => inner.stop_pod_sandbox(call).await,
                    "RemoveContainer" => inner.remove_container(call).await,
                    "RemovePodSandbox" => inner.remove_pod_sandbox(call).await,
                    "ContainerStatus" => inner.container_status(call).await,
                    "ListContainers" => inner.list_containers(call).await,
                    "PodSandboxStatus" => inner.pod_sandbox_status(call).await,
                    _ => inner.forward(&call, call.message.clone()).await,
                };
                debug!(
                    latency_us = started.elapsed().as_micros() as u64,
                    code = ?result.as_ref().err().map(|s| s.code()),
                    "intercepted call"
                );
                result
            }
            .instrument(span),
        )
    }
}

fn decode<M: Message + Default>(bytes: &Bytes) -> Result<M, tonic::Status> {
    M::decode(bytes.clone())
        .map_err(|e| tonic::Status::invalid_argument(format!("sidecar-shim: bad request: {e}")))
}

fn encode<M: Message>(m: &M) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// Headers that are HTTP/2 or gRPC protocol, not call metadata.
fn is_protocol_header(name: &[u8]) -> bool {
    name.starts_with(b":")
        || matches!(
            name,
            b"content-type"
                | b"te"
                | b"grpc-timeout"
                | b"grpc-encoding"
                | b"grpc-accept-encoding"
                | b"user-agent"
                | b"content-length"
        )
}

impl Inner {
    /// Send a call's bytes to the runtime as they are, with the client's
    /// metadata and deadline. A call that is safe to repeat (a stop, a
    /// removal, a status read) and fails because the runtime went away
    /// (containerd restarting) is sent again until the runtime answers or
    /// the client's deadline comes near: the shim answers it over its own
    /// connection, which outlives the client's (see the relay), and a stop
    /// kubelet sent for an app must reach the runtime before the sidecar
    /// stops it holds can go ahead.
    async fn forward(&self, call: &LocalCall, message: Bytes) -> Result<Bytes, tonic::Status> {
        let started = Instant::now();
        let deadline = call.timeout.map(|t| started + t);
        let give_up = started
            + call.timeout.map_or(FORWARD_RETRY_MAX, |t| {
                t.saturating_sub(FORWARD_RETRY_MARGIN)
            });
        let repeatable = REPEATABLE
            .iter()
            .any(|m| call.method.strip_prefix(RUNTIME) == Some(m));
        loop {
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.forward_once(call, message.clone(), timeout).await {
                Err(e)
                    if repeatable
                        && unreachable(&e)
                        && Instant::now() + RECONCILE_RETRY < give_up =>
                {
                    info!(rpc.method = %call.method, error = %e, "runtime unreachable; sending the call again");
                    tokio::time::sleep(RECONCILE_RETRY).await;
                }
                result => return result,
            }
        }
    }

    async fn forward_once(
        &self,
        call: &LocalCall,
        message: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, tonic::Status> {
        let mut req = tonic::Request::new(message);
        for (name, value) in &call.headers {
            if is_protocol_header(name) {
                continue;
            }
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(name),
                tonic::metadata::AsciiMetadataValue::try_from(&value[..]),
            ) {
                req.metadata_mut().insert(k, v);
            }
        }
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        let path: http::uri::PathAndQuery = call
            .method
            .parse()
            .map_err(|_| tonic::Status::internal("sidecar-shim: bad method path"))?;
        let mut raw = self.raw.clone();
        raw.ready().await.map_err(|e| {
            tonic::Status::unavailable(format!("sidecar-shim: runtime unavailable: {e}"))
        })?;
        raw.unary(req, path, RawCodec).await.map(|r| r.into_inner())
    }

    fn call_id(&self) -> CallId {
        CallId(self.next_call.fetch_add(1, Ordering::Relaxed))
    }

    /// Feed the machine, write what changed to the state directory, and
    /// carry out what the machine says (in that order: a promise to kubelet
    /// is on disk before kubelet hears it).
    fn feed(self: &Arc<Self>, event: Event) {
        let point = failpoint::enabled().then(|| self.point_name(&event));
        if let Some(p) = &point {
            failpoint::hit(&format!("before:{p}"));
        }
        let actions = {
            let mut m = lock(&self.machine);
            let actions = m.handle(Instant::now(), event);
            self.persist(&mut m);
            self.refresh_flags(&m);
            actions
        };
        if let Some(p) = &point {
            failpoint::hit(&format!("after:{p}"));
        }
        self.execute(actions);
        self.wake.notify_one();
    }

    /// Which methods the lifecycle must see, after the machine changed.
    fn refresh_flags(&self, m: &Machine) {
        // Pods whose annotations were rejected keep RemovePodSandbox coming
        // by, so that their entry is forgotten with them.
        let rejected = !lock(&self.rejected).is_empty();
        self.managed.store(
            m.held_calls() > 0 || m.knows_any() || rejected,
            Ordering::Relaxed,
        );
        self.rewrites.store(m.rewrites_active(), Ordering::Relaxed);
    }

    /// `<event>:<container name>`, the name of a failpoint.
    fn point_name(&self, event: &Event) -> String {
        let m = lock(&self.machine);
        let name = |id: &str| m.container_name(id).unwrap_or("?").to_string();
        match event {
            Event::Created { name, .. } => format!("created:{name}"),
            Event::StartCalled { container, .. } => format!("start:{}", name(container)),
            Event::StartDone { container, .. } => format!("started:{}", name(container)),
            Event::StartLost { container } => format!("start-lost:{}", name(container)),
            Event::PodWork { .. } => "pod-work".into(),
            Event::Observed { container, .. } => format!("observed:{}", name(container)),
            Event::Ready { container } => format!("ready:{}", name(container)),
            Event::Exited { container, .. } => format!("exited:{}", name(container)),
            Event::StopCalled { container, .. } => format!("stop:{}", name(container)),
            Event::PreStopCalled { container, .. } => format!("prestop:{}", name(container)),
            Event::StopPodCalled { .. } => "stop-pod".into(),
            Event::Cancelled { .. } => "cancelled".into(),
            Event::ContainerRemoved { container } => format!("removed:{}", name(container)),
            Event::PodRemoved { .. } => "pod-removed".into(),
            Event::Tick => "tick".into(),
        }
    }

    /// Write the records of the pods whose state may have changed.
    fn persist(&self, m: &mut Machine) {
        let touched = m.take_touched();
        let Some(store) = &self.store else {
            return;
        };
        let mut store = lock(store);
        let failed = store.failed_writes();
        for pod in touched {
            match m.record(&pod, &self.clock) {
                Some(record) => match serde_json::to_vec(&record) {
                    Ok(body) => store.save(&pod, body),
                    Err(e) => warn!(pod.id = %pod, error = %e, "cannot encode the pod's state"),
                },
                None => store.remove(&pod),
            }
        }
        for _ in failed..store.failed_writes() {
            self.metrics.state_write_error();
        }
    }

    /// Read the state directory into the machine (before any call is
    /// served). A file that cannot be used is dropped for its pod alone.
    fn load_state(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let mut store = lock(store);
        let loaded = store.load();
        let mut m = lock(&self.machine);
        let now = Instant::now();
        let (mut restored, mut dropped) = (0, 0);
        for (pod, result) in loaded {
            let record = result.map_err(|e| e.to_string()).and_then(|body| {
                serde_json::from_slice::<PodRecord>(&body)
                    .map_err(|e| format!("pod {pod}: cannot decode its state: {e}"))
            });
            match record {
                Ok(r) if r.version == super::machine::RECORD_VERSION && r.pod == pod => {
                    lock(&self.specs).insert(pod.clone(), Arc::new(r.spec().clone()));
                    m.restore(now, &self.clock, r);
                    restored += 1;
                }
                Ok(r) => {
                    warn!(pod.id = %pod, version = r.version, "state file of another version or pod dropped");
                    store.remove(&pod);
                    dropped += 1;
                }
                Err(e) => {
                    store::report_unusable(&pod, &e);
                    if !pod.is_empty() {
                        store.remove(&pod);
                    }
                    dropped += 1;
                }
            }
        }
        // Nothing changed yet: the records are what is on disk.
        m.take_touched();
        self.refresh_flags(&m);
        info!(dir = %store.dir().display(), restored, dropped, "state directory read");
    }

    async fn wait_reconciled(&self) {
        if self.reconciled.load(Ordering::Acquire) {
            return;
        }
        let notified = self.reconciled_notify.notified();
        if self.reconciled.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(RECONCILE_WAIT, notified).await;
    }

    fn execute(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Forward(call) => self.decide(call, Decision::Forward),
                Action::ForwardStop { call, timeout } => {
                    self.decide(call, Decision::ForwardStop(timeout))
                }
                Action::Answer { call, result } => {
                    self.decide(call, Decision::Answer(result.map_err(|r| r.message)))
                }
                Action::Start(id) => {
                    tokio::spawn(self.clone().start_owed(id));
                }
                Action::Stop { container, timeout } => {
                    tokio::spawn(self.clone().stop_own(container, timeout));
                }
                Action::Read(container) => {
                    tokio::spawn(self.clone().read(container));
                }
                Action::Log(note) => {
                    self.metrics.decision(&note);
                    info!(pod = %note.pod, container = %note.container, detail = %note.detail, "{}", note.what)
                }
                Action::Warn(note) => {
                    self.metrics.decision(&note);
                    warn!(pod = %note.pod, container = %note.container, detail = %note.detail, "{}", note.what)
                }
            }
        }
    }

    /// The shim's own start of a deferred container. While the runtime is
    /// unreachable (restarting, say) it is tried again, for as long as the
    /// machine still owes it; any other error ends it (the container then
    /// reads as exited 128, as a failed start does). A connection that
    /// broke under the start may have lost the answer of a start that
    /// landed: the container is read first, and started again only if it
    /// is still created.
    async fn start_owed(self: Arc<Self>, id: String) {
        loop {
            let mut rt = self.runtime.clone();
            let r = rt
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await;
            match r {
                Err(e) if unreachable(&e) && lock(&self.machine).owes_start(&id) => {
                    debug!(container.id = %id, error = %e, "runtime unreachable; starting the deferred container again shortly");
                    let Some(state) = self.read_state(&id).await else {
                        return;
                    };
                    if state != RuntimeState::Created {
                        self.feed(Event::Observed {
                            container: id,
                            state,
                        });
                        return;
                    }
                }
                r => {
                    if let Err(e) = &r {
                        warn!(container.id = %id, error = %e, "starting a deferred container failed");
                    }
                    self.feed(Event::StartDone {
                        container: id,
                        ok: r.is_ok(),
                    });
                    return;
                }
            }
        }
    }

    /// The machine asked for a container's state ([`Action::Read`]).
    async fn read(self: Arc<Self>, id: String) {
        if let Some(state) = self.read_state(&id).await {
            self.feed(Event::Observed {
                container: id,
                state,
            });
        }
    }

    /// The runtime's state of a container, asked again while the runtime
    /// is unreachable (None: the machine forgot the container meanwhile,
    /// or the runtime no longer has it).
    async fn read_state(&self, id: &str) -> Option<RuntimeState> {
        loop {
            tokio::time::sleep(ACTION_RETRY).await;
            if !lock(&self.machine).knows(id) {
                return None;
            }
            let mut rt = self.runtime.clone();
            let r = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: false,
                })
                .await;
            match r {
                Ok(r) => return r.into_inner().status.as_ref().map(runtime_state),
                Err(e) if unreachable(&e) => continue,
                Err(e) => {
                    debug!(container.id = %id, error = %e, "cannot read the container's state");
                    return None;
                }
            }
        }
    }

    /// The shim's own stop (Job completion, teardown, a stop owed from
    /// before a restart). Tried again while the runtime is unreachable and
    /// the container is still known and not seen exited.
    async fn stop_own(self: Arc<Self>, container: String, timeout: Duration) {
        loop {
            let mut rt = self.runtime.clone();
            let r = rt
                .stop_container(cri::StopContainerRequest {
                    container_id: container.clone(),
                    timeout: timeout.as_secs() as i64,
                })
                .await;
            match r {
                Err(e) if unreachable(&e) && lock(&self.machine).is_running(&container) => {
                    debug!(container.id = %container, error = %e, "runtime unreachable; stopping again shortly");
                    tokio::time::sleep(ACTION_RETRY).await;
                }
                r => {
                    if let Err(e) = r {
                        warn!(container.id = %container, error = %e, "stopping a container failed");
                    }
                    self.observe_exit(&container).await;
                    return;
                }
            }
        }
    }

    fn decide(&self, call: CallId, decision: Decision) {
        lock(&self.held_at).remove(&call);
        if let Some(tx) = lock(&self.pending).remove(&call) {
            let _ = tx.send(decision);
        }
    }

    /// Register a held call (`call`: its method, for the metrics); the
    /// guard reports it cancelled if dropped.
    fn hold(
        self: &Arc<Self>,
        call: &'static str,
    ) -> (CallId, Hold<oneshot::Receiver<Decision>>, HeldGuard) {
        let id = self.call_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        lock(&self.held_at).insert(id, Instant::now());
        (
            id,
            self.metrics.hold(call, rx),
            HeldGuard {
                inner: self.clone(),
                id,
                armed: true,
            },
        )
    }

    /// Ask the runtime whether the container exited; tell the machine.
    async fn observe_exit(self: &Arc<Self>, id: &str) {
        let mut rt = self.runtime.clone();
        if let Ok(r) = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
        {
            if let Some(s) = r.into_inner().status {
                if s.state == cri::ContainerState::ContainerExited as i32 {
                    self.feed(Event::Exited {
                        container: id.to_string(),
                        code: s.exit_code,
                    });
                }
            }
        }
    }

    fn pod_spec(
        &self,
        pod_id: &str,
        config: Option<&cri::PodSandboxConfig>,
    ) -> Option<Arc<PodSpec>> {
        if let Some(spec) = lock(&self.specs).get(pod_id) {
            return Some(spec.clone());
        }
        let config = config?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        match spec::parse(&config.annotations, &config.labels, &self.defaults) {
            Ok(Some(spec)) => {
                let spec = Arc::new(spec);
                lock(&self.specs).insert(pod_id.to_string(), spec.clone());
                Some(spec)
            }
            Ok(None) => None,
            Err(e) => {
                if lock(&self.rejected).insert(pod_id.to_string()) {
                    warn!(pod = %name, pod.id = %pod_id, error = %e, "annotation rejected: the pod's calls are forwarded untouched");
                    self.managed.store(true, Ordering::Relaxed);
                }
                None
            }
        }
    }

    async fn create_container(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::CreateContainerRequest = decode(&call.message)?;
        let spec = self.pod_spec(&req.pod_sandbox_id, req.sandbox_config.as_ref());
        if spec.is_some() {
            if let Some(config) = req.sandbox_config.as_ref() {
                let uid = config.metadata.as_ref().map(|m| m.uid.as_str());
                self.remember_keys(&req.pod_sandbox_id, uid, &config.annotations);
            }
            self.pod_work(&req.pod_sandbox_id, "CreateContainer");
        }
        let answer = self.forward(&call, call.message.clone()).await?;
        // Newer kubelets say what kind of container this is; init and
        // ephemeral containers are none of the lifecycle's business. Older
        // ones don't: the machine then tells init containers apart by
        // kubelet waiting for them (Settings::init_window).
        let kind = req
            .config
            .as_ref()
            .and_then(|c| c.annotations.get(CONTAINER_TYPE))
            .map(String::as_str);
        let regular = !matches!(kind, Some("init") | Some("ephemeral"));
        if let (Some(spec), true) = (spec, regular) {
            let resp: cri::CreateContainerResponse = decode(&answer)?;
            let config = req.config.unwrap_or_default();
            let meta = config.metadata.unwrap_or_default();
            let pod_name = req
                .sandbox_config
                .as_ref()
                .and_then(|c| c.metadata.as_ref())
                .map(|m| format!("{}/{}", m.namespace, m.name))
                .unwrap_or_default();
            self.feed(Event::Created {
                pod: req.pod_sandbox_id,
                pod_name,
                spec,
                container: resp.container_id,
                name: meta.name,
                attempt: meta.attempt,
                pre_stop: spec::parse_pre_stop(&config.annotations),
                grace: spec::grace_period(&config.annotations),
            });
        }
        Ok(answer)
    }

    /// A PullImage names the pod it is for (its sandbox config): kubelet is
    /// working on another container of that pod ([`Event::PodWork`]).
    async fn pull_image(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::PullImageRequest = decode(&call.message)?;
        if let Some(uid) = pod_uid(req.sandbox_config.as_ref()) {
            self.pod_work_by(PodKey::Uid(uid.to_string()), "PullImage");
        }
        self.forward(&call, call.message.clone()).await
    }

    /// kubelet's ImageStatus for a container carries its pod's annotations,
    /// and it is kubelet's first call for each container: the pod is named
    /// by its first-seen annotation ([`FIRST_SEEN`]). This comes at once,
    /// also when kubelet's PullImage then waits its turn behind other pods'
    /// pulls (kubelet pulls one image at a time by default).
    async fn image_status(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::ImageStatusRequest = decode(&call.message)?;
        if let Some(seen) = req
            .image
            .as_ref()
            .and_then(|i| i.annotations.get(FIRST_SEEN))
        {
            self.pod_work_by(PodKey::FirstSeen(seen.clone()), "ImageStatus");
        }
        self.forward(&call, call.message.clone()).await
    }

    /// Remember what names a managed pod in image calls.
    fn remember_keys(&self, pod: &str, uid: Option<&str>, annotations: &HashMap<String, String>) {
        let mut keys = lock(&self.pod_keys);
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            keys.insert(PodKey::Uid(uid.to_string()), pod.to_string());
        }
        if let Some(seen) = annotations.get(FIRST_SEEN).filter(|s| !s.is_empty()) {
            keys.insert(PodKey::FirstSeen(seen.clone()), pod.to_string());
        }
    }

    fn pod_work_by(self: &Arc<Self>, key: PodKey, via: &str) {
        let pod = lock(&self.pod_keys).get(&key).cloned();
        if let Some(pod) = pod {
            self.pod_work(&pod, via);
        }
    }

    /// kubelet works on a container of `pod` (its `via` request names it):
    /// [`Event::PodWork`].
    fn pod_work(self: &Arc<Self>, pod: &str, via: &str) {
        let Some(name) = lock(&self.machine).pod_name(pod).map(str::to_string) else {
            return;
        };
        debug!(pod = %name, via, "kubelet works on the pod");
        self.feed(Event::PodWork {
            pod: pod.to_string(),
        });
    }

    async fn start_container(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::StartContainerRequest = decode(&call.message)?;
        if !lock(&self.machine).knows(&req.container_id) {
            return self.forward(&call, call.message.clone()).await;
        }
        let (id, rx, guard) = self.hold("StartContainer");
        self.feed(Event::StartCalled {
            call: id,
            container: req.container_id.clone(),
            deadline: call.timeout.map(|t| Instant::now() + t),
        });
        let decision = rx
            .await
            .map_err(|_| tonic::Status::internal("sidecar-shim: held call dropped"))?;
        guard.disarm();
        match decision {
            Decision::Forward | Decision::ForwardStop(_) => {
                let r = self.forward(&call, call.message.clone()).await;
                let container = req.container_id;
                self.feed(match &r {
                    Err(e) if unreachable(e) => Event::StartLost { container },
                    r => Event::StartDone {
                        container,
                        ok: r.is_ok(),
                    },
                });
                r
            }
            Decision::Answer(Ok(())) => Ok(encode(&cri::StartContainerResponse {})),
            Decision::Answer(Err(msg)) => Err(tonic::Status::failed_precondition(msg)),
        }
    }

    async fn stop_container(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::StopContainerRequest = decode(&call.message)?;
        if !lock(&self.machine).knows(&req.container_id) {
            return self.forward(&call, call.message.clone()).await;
        }
        let (id, rx, guard) = self.hold("StopContainer");
        self.feed(Event::StopCalled {
            call: id,
            container: req.container_id.clone(),
            timeout: Duration::from_secs(req.timeout.max(0) as u64),
            deadline: call.timeout.map(|t| Instant::now() + t),
        });
        let decision = rx
            .await
            .map_err(|_| tonic::Status::internal("sidecar-shim: held call dropped"))?;
        guard.disarm();
        let r = match decision {
            Decision::Forward => self.forward(&call, call.message.clone()).await,
            Decision::ForwardStop(timeout) => {
                let req = cri::StopContainerRequest {
                    container_id: req.container_id.clone(),
                    timeout: timeout.as_secs() as i64,
                };
                self.forward(&call, encode(&req)).await
            }
            Decision::Answer(Ok(())) => return Ok(encode(&cri::StopContainerResponse {})),
            Decision::Answer(Err(msg)) => return Err(tonic::Status::failed_precondition(msg)),
        };
        self.observe_exit(&req.container_id).await;
        r
    }

    async fn exec_sync(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::ExecSyncRequest = decode(&call.message)?;
        let (refusal, pre_stop) = {
            let m = lock(&self.machine);
            (
                m.exec_refusal(&req.container_id),
                m.exec_pre_stop(&req.container_id)
                    .map(|c| c == req.cmd.as_slice()),
            )
        };
        if let Some(msg) = refusal {
            return Err(tonic::Status::failed_precondition(msg));
        }
        // kubelet runs exec hooks with timeout 0; probes always have one.
        if pre_stop == Some(true) && req.timeout == 0 {
            let (id, rx, guard) = self.hold("ExecSync");
            self.feed(Event::PreStopCalled {
                call: id,
                container: req.container_id.clone(),
            });
            let _ = rx.await;
            guard.disarm();
        }
        self.forward(&call, call.message.clone()).await
    }

    async fn exec(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::ExecRequest = decode(&call.message)?;
        if let Some(msg) = lock(&self.machine).exec_refusal(&req.container_id) {
            return Err(tonic::Status::failed_precondition(msg));
        }
        self.forward(&call, call.message.clone()).await
    }

    async fn stop_pod_sandbox(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::StopPodSandboxRequest = decode(&call.message)?;
        if lock(&self.machine).knows_pod(&req.pod_sandbox_id) {
            let (id, rx, guard) = self.hold("StopPodSandbox");
            self.feed(Event::StopPodCalled {
                call: id,
                pod: req.pod_sandbox_id.clone(),
                deadline: call.timeout.map(|t| Instant::now() + t),
            });
            let _ = rx.await;
            guard.disarm();
        }
        // Repeated StopPodSandbox calls of one pod reach the runtime one at
        // a time: containerd 1.6 tears a sandbox's network down twice when
        // two arrive together, and the second fails ("failed to delete
        // eth0"). One after the other, the second finds the pod stopped.
        let turn = {
            let mut turns = lock(&self.stop_pod_turns);
            turns.entry(req.pod_sandbox_id.clone()).or_default().clone()
        };
        let r = {
            let _mine = turn.lock().await;
            self.forward(&call, call.message.clone()).await
        };
        let mut turns = lock(&self.stop_pod_turns);
        if Arc::strong_count(&turn) == 2 {
            turns.remove(&req.pod_sandbox_id);
        }
        r
    }

    async fn remove_container(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::RemoveContainerRequest = decode(&call.message)?;
        let r = self.forward(&call, call.message.clone()).await?;
        if lock(&self.machine).knows(&req.container_id) {
            self.feed(Event::ContainerRemoved {
                container: req.container_id,
            });
        }
        Ok(r)
    }

    async fn remove_pod_sandbox(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::RemovePodSandboxRequest = decode(&call.message)?;
        let r = self.forward(&call, call.message.clone()).await?;
        self.forget_pod(&req.pod_sandbox_id);
        Ok(r)
    }

    /// Forget everything about a pod whose sandbox is gone.
    fn forget_pod(self: &Arc<Self>, pod: &str) {
        lock(&self.specs).remove(pod);
        lock(&self.pod_keys).retain(|_, id| id != pod);
        lock(&self.rejected).remove(pod);
        lock(&self.netns).remove(pod);
        if lock(&self.machine).knows_pod(pod) {
            self.feed(Event::PodRemoved {
                pod: pod.to_string(),
            });
        }
    }

    fn nanos(&self, t: Instant) -> i64 {
        self.clock.to_unix_nanos(t)
    }

    fn patch_status(&self, s: &mut cri::ContainerStatus) {
        let o = lock(&self.machine).status_override(&s.id);
        match o {
            Some(StatusOverride::Running { since }) => {
                s.state = cri::ContainerState::ContainerRunning as i32;
                s.started_at = self.nanos(since);
            }
            Some(StatusOverride::Exited {
                code,
                reason,
                message,
                at,
            }) => {
                if s.state != cri::ContainerState::ContainerExited as i32 {
                    // Never started: kubelet must not take it for CREATED.
                    // Its times stay fixed: kubelet measures the crash-loop
                    // backoff from finished_at.
                    s.state = cri::ContainerState::ContainerExited as i32;
                    let at = self.nanos(at);
                    if s.started_at == 0 {
                        s.started_at = at;
                    }
                    if s.finished_at == 0 {
                        s.finished_at = at;
                    }
                }
                s.exit_code = code;
                s.reason = reason;
                s.message = message;
            }
            Some(StatusOverride::IfExited {
                code,
                reason,
                message,
            }) if s.state == cri::ContainerState::ContainerExited as i32 => {
                s.exit_code = code;
                s.reason = reason;
                s.message = message;
            }
            Some(StatusOverride::IfExited { .. }) | None => {}
        }
    }

    fn patch_state(&self, id: &str, state: &mut i32) {
        match lock(&self.machine).status_override(id) {
            Some(StatusOverride::Running { .. }) => {
                *state = cri::ContainerState::ContainerRunning as i32
            }
            Some(StatusOverride::Exited { .. }) => {
                *state = cri::ContainerState::ContainerExited as i32
            }
            Some(StatusOverride::IfExited { .. }) | None => {}
        }
    }

    async fn container_status(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let req: cri::ContainerStatusRequest = decode(&call.message)?;
        let answer = self.forward(&call, call.message.clone()).await?;
        if lock(&self.machine)
            .status_override(&req.container_id)
            .is_none()
        {
            return Ok(answer);
        }
        let mut resp: cri::ContainerStatusResponse = decode(&answer)?;
        if let Some(s) = resp.status.as_mut() {
            self.patch_status(s);
        }
        Ok(encode(&resp))
    }

    async fn list_containers(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let mut req: cri::ListContainersRequest = decode(&call.message)?;
        // The state filter is applied here, after rewriting: the runtime
        // would filter on the state it knows.
        let wanted = req.filter.as_mut().and_then(|f| f.state.take());
        let answer = self.forward(&call, encode(&req)).await?;
        let mut resp: cri::ListContainersResponse = decode(&answer)?;
        for c in &mut resp.containers {
            self.patch_state(&c.id, &mut c.state);
        }
        if let Some(w) = wanted {
            resp.containers.retain(|c| c.state == w.state);
        }
        Ok(encode(&resp))
    }

    async fn pod_sandbox_status(self: &Arc<Self>, call: LocalCall) -> Result<Bytes, tonic::Status> {
        let answer = self.forward(&call, call.message.clone()).await?;
        let mut resp: cri::PodSandboxStatusResponse = decode(&answer)?;
        if resp.containers_statuses.is_empty() {
            return Ok(answer);
        }
        for s in &mut resp.containers_statuses {
            self.patch_status(s);
        }
        Ok(encode(&resp))
    }
}

// ---------------------------------------------------------------------------
// Read-only access for the admin API (src/admin).

impl Lifecycle {
    /// The pods the machine manages now. The machine is locked only while
    /// copying; held calls the machine has no arrival time for get the
    /// time they were held here.
    pub fn view(&self) -> Vec<super::machine::view::PodView> {
        let mut pods = lock(&self.inner.machine).view();
        let held_at = lock(&self.inner.held_at);
        for h in pods.iter_mut().flat_map(|p| p.held.iter_mut()) {
            h.since = h.since.or_else(|| held_at.get(&h.call).copied());
        }
        pods
    }
}

/// Reports a held call as cancelled when its future is dropped before the
/// machine decided (the client reset the call or the connection closed).
struct HeldGuard {
    inner: Arc<Inner>,
    id: CallId,
    armed: bool,
}

impl HeldGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.inner.pending).remove(&self.id);
            lock(&self.inner.held_at).remove(&self.id);
            debug!(call = self.id.0, "held call cancelled by the client");
            self.inner.feed(Event::Cancelled { call: self.id });
        }
    }
}

/// What names a pod in kubelet's image calls.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum PodKey {
    /// The pod's uid, in a PullImage's sandbox config.
    Uid(String),
    /// kubelet's [`FIRST_SEEN`] annotation, in an ImageStatus's annotations.
    FirstSeen(String),
}

/// The pod uid in a sandbox config, if any.
fn pod_uid(config: Option<&cri::PodSandboxConfig>) -> Option<&str> {
    config
        .and_then(|c| c.metadata.as_ref())
        .map(|m| m.uid.as_str())
        .filter(|uid| !uid.is_empty())
}

/// A container's state as the runtime's ContainerStatus gives it.
fn runtime_state(s: &cri::ContainerStatus) -> RuntimeState {
    match cri::ContainerState::try_from(s.state) {
        Ok(cri::ContainerState::ContainerCreated) => RuntimeState::Created,
        Ok(cri::ContainerState::ContainerRunning) => RuntimeState::Running,
        Ok(cri::ContainerState::ContainerExited) => RuntimeState::Exited { code: s.exit_code },
        _ => RuntimeState::Unknown,
    }
}

/// Whether a runtime call failed because the runtime could not be reached
/// (as opposed to the runtime refusing it).
fn unreachable(e: &tonic::Status) -> bool {
    match e.code() {
        tonic::Code::Unavailable => true,
        // tonic's answer when the connection broke under the call, and
        // containerd's while its CRI plugin is still starting up.
        tonic::Code::Unknown => {
            e.message().contains("transport error")
                || e.message().contains("server is not initialized yet")
        }
        // hyper's answer when the runtime's connection died mid-call (seen
        // when containerd is killed while a stop is on its way).
        tonic::Code::Internal => e.message().contains("h2 protocol error"),
        _ => false,
    }
}

/// Start-up: reconcile with the runtime (retried until it answers), then
/// the driver, the store's retries and the sweep of vanished pods.
async fn start_up(me: Arc<Inner>) {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match me.reconcile().await {
            Ok(()) => break,
            Err(e) => {
                if attempts == 1 {
                    warn!(error = %e, "cannot list the runtime to reconcile with; trying again until it answers");
                }
                if started.elapsed() >= RECONCILE_WAIT {
                    // Calls stop waiting for it; the state as recorded holds.
                    me.reconciled.store(true, Ordering::Release);
                    me.reconciled_notify.notify_waiters();
                }
                tokio::time::sleep(RECONCILE_RETRY).await;
            }
        }
    }
    tokio::spawn(driver(me.clone()));
    tokio::spawn(events::hold::<events::CriEvents>(me.clone()));
    if me.events.for_exits() {
        tokio::spawn(events::hold::<task_exits::TaskExits>(me.clone()));
    }
    if me.store.is_some() {
        tokio::spawn(store_retry(me.clone()));
    }
    tokio::spawn(sweep(me));
}

impl Inner {
    /// Square the machine with the runtime: list sandboxes and containers
    /// (two calls, plus a ContainerStatus per exited container of a pod with
    /// sidecars, for its exit code) and let the machine carry on.
    async fn reconcile(self: &Arc<Self>) -> Result<(), tonic::Status> {
        let started = Instant::now();
        let runtime = self.list_runtime().await?;
        let (actions, report) = {
            let mut m = lock(&self.machine);
            let (actions, report) = m.reconcile(Instant::now(), runtime);
            self.persist(&mut m);
            self.refresh_flags(&m);
            (actions, report)
        };
        for pod in &report.vanished {
            self.forget_pod(pod);
        }
        info!(
            kept = report.kept,
            rebuilt = report.rebuilt,
            vanished = report.vanished.len(),
            changed = report.changed,
            took_ms = started.elapsed().as_millis() as u64,
            "reconciled with the runtime"
        );
        self.reconciled.store(true, Ordering::Release);
        self.reconciled_notify.notify_waiters();
        self.execute(actions);
        self.wake.notify_one();
        Ok(())
    }

    /// The runtime's sandboxes and containers, as the machine wants them.
    async fn list_runtime(self: &Arc<Self>) -> Result<Vec<RuntimePod>, tonic::Status> {
        let mut rt = self.runtime.clone();
        let sandboxes = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items;
        let containers = rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await?
            .into_inner()
            .containers;
        let mut by_pod: HashMap<String, Vec<cri::Container>> = HashMap::new();
        for c in containers {
            by_pod.entry(c.pod_sandbox_id.clone()).or_default().push(c);
        }
        let mut out = Vec::new();
        for sb in sandboxes {
            let known = lock(&self.machine).knows_pod(&sb.id);
            let name = sb
                .metadata
                .as_ref()
                .map(|m| format!("{}/{}", m.namespace, m.name))
                .unwrap_or_default();
            let spec = if known {
                lock(&self.specs).get(&sb.id).cloned()
            } else {
                match spec::parse(&sb.annotations, &sb.labels, &self.defaults) {
                    Ok(Some(spec)) => {
                        let spec = Arc::new(spec);
                        lock(&self.specs).insert(sb.id.clone(), spec.clone());
                        Some(spec)
                    }
                    Ok(None) => None,
                    Err(_) => {
                        // Warned about when the pod was created; its calls
                        // stay untouched, and RemovePodSandbox forgets it.
                        lock(&self.rejected).insert(sb.id.clone());
                        None
                    }
                }
            };
            if !known && spec.is_none() {
                continue;
            }
            let uid = sb.metadata.as_ref().map(|m| m.uid.as_str());
            self.remember_keys(&sb.id, uid, &sb.annotations);
            let mut listed = Vec::new();
            for c in by_pod.remove(&sb.id).unwrap_or_default() {
                let meta = c.metadata.clone().unwrap_or_default();
                let state = match cri::ContainerState::try_from(c.state) {
                    Ok(cri::ContainerState::ContainerExited) => rt
                        .container_status(cri::ContainerStatusRequest {
                            container_id: c.id.clone(),
                            verbose: false,
                        })
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().status)
                        .map_or(RuntimeState::Unknown, |s| runtime_state(&s)),
                    Ok(cri::ContainerState::ContainerCreated) => RuntimeState::Created,
                    Ok(cri::ContainerState::ContainerRunning) => RuntimeState::Running,
                    _ => RuntimeState::Unknown,
                };
                let kind = c.annotations.get(CONTAINER_TYPE).map(String::as_str);
                listed.push(RuntimeContainer {
                    id: c.id.clone(),
                    name: meta.name,
                    attempt: meta.attempt,
                    state,
                    pre_stop: spec::parse_pre_stop(&c.annotations),
                    grace: spec::grace_period(&c.annotations),
                    regular: !matches!(kind, Some("init") | Some("ephemeral")),
                });
            }
            out.push(RuntimePod {
                id: sb.id,
                name,
                spec,
                containers: listed,
            });
        }
        Ok(out)
    }
}

/// Writes to the state directory that failed are tried again.
async fn store_retry(me: Arc<Inner>) {
    let Some(store) = &me.store else {
        return;
    };
    loop {
        tokio::time::sleep(STORE_RETRY).await;
        let pending = lock(store).has_pending();
        if pending {
            // Under the machine's lock, so that a newer record written by
            // `feed` meanwhile is not overwritten by an older one.
            let _m = lock(&me.machine);
            let mut store = lock(store);
            let failed = store.failed_writes();
            store.retry();
            for _ in failed..store.failed_writes() {
                me.metrics.state_write_error();
            }
        }
    }
}

/// Pods whose sandbox went away without the shim seeing RemovePodSandbox
/// (removed straight at the runtime, or while the shim was down and the
/// reconcile missed it) are forgotten, with their state files.
async fn sweep(me: Arc<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        let known = lock(&me.machine).pod_ids();
        if known.is_empty() {
            continue;
        }
        let mut rt = me.runtime.clone();
        let Ok(r) = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
        else {
            continue;
        };
        let present: HashSet<String> = r.into_inner().items.into_iter().map(|s| s.id).collect();
        for pod in known.into_iter().filter(|p| !present.contains(p)) {
            info!(pod.id = %pod, "sandbox gone from the runtime: forgetting the pod");
            me.forget_pod(&pod);
        }
    }
}

/// Deadlines, readiness checks and exit watches.
async fn driver(me: Arc<Inner>) {
    loop {
        let (deadline, probes, watched) = {
            let m = lock(&me.machine);
            (m.next_deadline(), m.probes(), m.watched())
        };
        for (container, pod) in probes {
            if lock(&me.probing).insert(format!("probe:{container}")) {
                tokio::spawn(probe_loop(me.clone(), container, pod));
            }
        }
        // Exits are polled only while the runtime's events do not come (or
        // may not all come to the shim); otherwise a container is read once
        // when it starts to matter.
        if me.events.watch_interval().is_some() {
            for container in watched {
                if lock(&me.probing).insert(format!("watch:{container}")) {
                    tokio::spawn(watch_loop(me.clone(), container));
                }
            }
        } else {
            let mut read = lock(&me.read_once);
            read.retain(|c| watched.contains(c));
            for container in watched {
                if read.insert(container.clone()) {
                    let me = me.clone();
                    tokio::spawn(async move { me.observe_exit(&container).await });
                }
            }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            me.feed(Event::Tick);
            // Never monopolise the (single-threaded) runtime.
            tokio::task::yield_now().await;
            continue;
        }
        let wait = deadline
            .map(|d| d - now)
            .unwrap_or(Duration::from_secs(3600));
        let wake = me.wake.notified();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake => {}
        }
    }
}

async fn probe_loop(me: Arc<Inner>, container: String, pod: String) {
    let key = format!("probe:{container}");
    let check = lock(&me.machine).ready_check(&container);
    let Some(check) = check else {
        lock(&me.probing).remove(&key);
        return;
    };
    let mut target: Option<probe::Target> = None;
    let mut last = String::new();
    loop {
        if !lock(&me.machine).needs_probe(&container) {
            break;
        }
        let mut rt = me.runtime.clone();
        // The pod's network namespace, asked of the runtime once it answers:
        // a lookup that fails (the runtime restarting, say) is tried again
        // on the next round rather than taken for a host-network pod, whose
        // checks would go to the host's loopback.
        if target.is_none() {
            let cached = lock(&me.netns).get(&pod).cloned();
            let netns = match cached {
                Some(n) => Some(n),
                None => match probe::pod_netns(&mut rt, &pod).await {
                    Ok(n) => {
                        lock(&me.netns).insert(pod.clone(), n.clone());
                        Some(n)
                    }
                    Err(e) => {
                        let why = format!("cannot find the pod's network namespace yet: {e}");
                        if why != last {
                            warn!(pod.id = %pod, error = %e, "cannot find the pod's network namespace yet; trying again");
                            last = why;
                        }
                        None
                    }
                },
            };
            target = netns.map(|netns| probe::Target {
                netns,
                container_id: container.clone(),
            });
        }
        let outcome = match &target {
            Some(target) => {
                let outcome = probe::check(&check, target, &mut rt).await;
                me.metrics.readiness_check(&check, outcome.is_ready());
                outcome
            }
            None => probe::Outcome::NotReady(last.clone()),
        };
        match outcome {
            probe::Outcome::Ready => {
                me.feed(Event::Ready {
                    container: container.clone(),
                });
                break;
            }
            probe::Outcome::NotReady(why) => {
                if why != last {
                    debug!(container.id = %container, why = %why, "sidecar not ready yet");
                    last = why;
                }
            }
        }
        tokio::time::sleep(match check {
            ReadyCheck::Tcp { .. } | ReadyCheck::Http { .. } => PROBE_INTERVAL_NET,
            _ => PROBE_INTERVAL_RUNTIME,
        })
        .await;
    }
    lock(&me.probing).remove(&key);
    me.wake.notify_one();
}

async fn watch_loop(me: Arc<Inner>, container: String) {
    let key = format!("watch:{container}");
    loop {
        let interval = me.events.watch_interval();
        let Some(interval) = interval.filter(|_| lock(&me.machine).is_watched(&container)) else {
            break;
        };
        me.observe_exit(&container).await;
        tokio::time::sleep(interval).await;
    }
    lock(&me.probing).remove(&key);
    me.wake.notify_one();
}

/// The first field of a request: the container or sandbox id it is about.
#[derive(Clone, PartialEq, prost::Message)]
struct FirstId {
    #[prost(string, tag = "1")]
    id: String,
}

/// A codec that passes message bytes through untouched.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
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

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, Self::Error> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}
