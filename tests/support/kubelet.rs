//! A kubelet simulator: drives a CRI endpoint (the shim's socket, or
//! containerd directly) the way kubelet's pod worker, PLEG and killPod do, so
//! that tests can compare what happens with and without the shim.
//!
//! It follows kubelet v1.28's CRI behaviour as read from kubelet's source
//! (`pkg/kubelet/kuberuntime/`, `pod_workers.go`, `pleg/generic.go`) and as
//! observed on the real kubelet of `hack/cluster` (`tests/e2e_cluster.rs`).
//! Where it relies on a particular piece of kubelet's behaviour, a comment
//! says so ("kubelet source:" with the function it comes from, or
//! "observed").
//!
//! Per pod:
//! - [`Kubelet::run_pod`] runs the sandbox (`RunPodSandbox`,
//!   `PodSandboxStatus`) and spawns the pod worker, whose first sync starts
//!   the containers one at a time in spec order (`ImageStatus`, `PullImage` if
//!   missing, `ImageStatus`, `CreateContainer`, `StartContainer`), going on
//!   after a failed start. As kubelet's, the pod carries the
//!   `kubernetes.io/config.source` and `.seen` annotations, every
//!   `ImageSpec` carries the pod's annotations, and pulls go one at a time
//!   node-wide (`serializeImagePulls`, kubelet's default).
//! - A PLEG task relists every second (`ListPodSandbox`, `ListContainers`,
//!   both unfiltered) and wakes the worker when the pod's containers or
//!   sandbox changed state. The worker then reads the pod's status
//!   (`ListPodSandbox` and `ListContainers` filtered by the pod uid,
//!   `PodSandboxStatus` and `ContainerStatus` for each), computes the phase
//!   (kubelet's getPhase), and restarts containers per kubelet's rules:
//!   CREATED or UNKNOWN ones always (recorded as [`Duplicate`]s: with a correct
//!   runtime this never happens), exited ones per restart policy with
//!   crash-loop backoff. A terminal phase makes it kill the pod.
//! - [`PodHandle::delete`] is kubelet's killPod: preStop hooks and
//!   `StopContainer` for every running container in parallel, then
//!   `StopPodSandbox`, then (garbage collection's) `RemovePodSandbox`;
//!   [`PodHandle::terminate`] stops before that last step, so the stopped
//!   containers can still be read.
//!
//! Every CRI call is recorded with its start and end ([`CriCall`]), and the
//! pod's notable moments as [`PodEvent`]s.
//!
//! Calibration against kubelet v1.28.7 (each straight at containerd 1.6.20,
//! the per-pod sequence of CRI calls as containerd logs them at trace
//! level, for app-first, sidecar-first, a Job and a deletion with an exec
//! preStop hook): startup is the same call for call (RunPodSandbox,
//! PodSandboxStatus, then per container in spec order ImageStatus twice,
//! CreateContainer, StartContainer, each right after the previous one
//! returned), and so are stops (all in parallel; an exec preStop hook with
//! timeout 0 beside the other stops, its container's StopContainer right
//! after it; timeout the grace less the hook's whole seconds, at least 2 s;
//! StopPodSandbox once every stop returned), the first restart (right after
//! the status read that shows the exit) and the 1 s relist. What differs,
//! and why the simulator may keep it:
//! - kubelet's PLEG reads a changed pod's status itself, node-wide, also
//!   while the pod worker's StartContainer or StopContainer is in flight
//!   (ContainerStatus of a container whose start is on its way reads
//!   CREATED); here only the worker reads it, between its own calls. This
//!   matters to a proxy that holds starts and stops (its status answers
//!   must not wait for them): `tests/e2e_cluster.rs` covers it on the real
//!   kubelet, and `tests/restart_window.rs` and `tests/admin.rs` read
//!   statuses during holds.
//! - kubelet's syncs that no relist triggered (a deletion, a restart after
//!   crash-loop backoff) read no status first: they act on the cached one.
//!   Here `terminate` and each sync read it fresh. The shim answers the
//!   unfiltered ListContainers and ContainerStatus alike (one rewrite for
//!   both), which is what a cached status would show up.
//! - A container first seen CREATED does not wake kubelet's worker (kubelet
//!   source); a sync that failed is retried 10 to 15 s later, and a pod in
//!   crash-loop backoff restarts 14 to 17 s after the exit with a 10 s
//!   backoff. Here both come at once (or at the backoff's expiry): the tests
//!   see retries sooner, never in another order.
//! - kubelet removes a container's older dead attempts while the pod runs,
//!   and every container about 0.5 s after StopPodSandbox; garbage
//!   collection removes the sandbox 5 to 60 s later, after a second
//!   StopPodSandbox. Here nothing is removed but the sandbox, right away.
//!   The shim forgets removed containers (`ContainerRemoved`; the
//!   real-kubelet tests with restarted apps see kubelet remove them) and
//!   takes repeated StopPodSandbox calls (`tests/repeat.rs`).
//! - kubelet has two connections to the runtime (image and runtime
//!   services), a node-wide relist, and periodic calls this does not make
//!   (ListContainers filtered to RUNNING every 2 s, a log manager's
//!   ContainerStatus every 10 s, stats). A state-filtered ListContainers is
//!   answered with the shim's rewrites (README, Startup).
//! - `delete(Some(ZERO))` sends a 2 s StopContainer timeout, as kubelet does
//!   for `--grace-period=1`; `--grace-period=0 --force` makes kubelet use
//!   the pod's own grace period.
//! - kubelet gives each container a PID namespace of its own unless the pod
//!   sets `shareProcessNamespace`; here containers share the pod's unless
//!   [`KubeletConfig::pid_namespace_per_container`] is on (the tests'
//!   trap-less containers rely on SIGTERM killing a process that is not PID
//!   1). The difference is containerd's: with a shared PID namespace its
//!   runc shim runs `runc kill --all` on every container exit before it
//!   reports the exit, about 20 ms on these machines, which once made the
//!   lifecycle bench's exit -> SIGTERM 20 ms longer than a kubelet's.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerFilter, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest, ListContainersRequest,
    ListPodSandboxRequest, Mount, PodSandboxConfig, PodSandboxFilter, PodSandboxState,
    PodSandboxStatus, PodSandboxStatusRequest, PullImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tokio::task::{AbortHandle, JoinSet};
use tonic::transport::Channel;

use super::{
    container_config, cri_client, kubelet_namespaces, pod_sandbox_config_in, state_of, wait_for,
    BUSYBOX_IMAGE,
};

// ---------------------------------------------------------------------------
// Kubelet's label and annotation keys

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const ANNOTATION_HASH: &str = "io.kubernetes.container.hash";
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const ANNOTATION_TERMINATION_MESSAGE_PATH: &str =
    "io.kubernetes.container.terminationMessagePath";
pub const ANNOTATION_TERMINATION_MESSAGE_POLICY: &str =
    "io.kubernetes.container.terminationMessagePolicy";
pub const ANNOTATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";
pub const ANNOTATION_PRE_STOP: &str = "io.kubernetes.container.preStopHandler";
/// Job controller labels on the pods it creates.
pub const LABEL_JOB_NAME: &str = "batch.kubernetes.io/job-name";
pub const LABEL_JOB_NAME_LEGACY: &str = "job-name";
pub const LABEL_CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
pub const LABEL_CONTROLLER_UID_LEGACY: &str = "controller-uid";

/// kubelet's minimumGracePeriodInSeconds: StopContainer never gets less.
const MIN_GRACE_SECS: i64 = 2;
/// How long the Drop cleanup may take per pod.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Pod description

/// `pod.spec.restartPolicy`. Not in the CRI: only the simulator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

/// A container's preStop hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreStop {
    /// An exec hook: `ExecSync` with timeout 0 (no deadline).
    Exec(Vec<String>),
    /// A sleep hook, run by the simulator itself (never reaches the CRI).
    /// Kubernetes counts it in whole seconds: a fraction is rounded up, both
    /// in the annotation and in the sleep.
    Sleep(Duration),
}

/// One container of a [`PodDef`].
#[derive(Clone, Debug)]
pub struct ContainerDef {
    pub name: String,
    pub command: Vec<String>,
    pub pre_stop: Option<PreStop>,
    /// Default [`BUSYBOX_IMAGE`].
    pub image: String,
    /// Bind mounts: host directory → path in the container (read-write).
    pub mounts: Vec<(PathBuf, String)>,
}

impl ContainerDef {
    /// A busybox container running `command` (e.g. `sh("...")`).
    pub fn new(name: &str, command: Vec<String>) -> Self {
        ContainerDef {
            name: name.to_string(),
            command,
            pre_stop: None,
            image: BUSYBOX_IMAGE.to_string(),
            mounts: Vec::new(),
        }
    }

    pub fn pre_stop(mut self, hook: PreStop) -> Self {
        self.pre_stop = Some(hook);
        self
    }

    pub fn image(mut self, image: &str) -> Self {
        self.image = image.to_string();
        self
    }

    /// Bind-mount the host directory `host` at `container_path`.
    pub fn mount(mut self, host: impl Into<PathBuf>, container_path: &str) -> Self {
        self.mounts.push((host.into(), container_path.to_string()));
        self
    }
}

/// A pod as the API server would hand it to kubelet (the parts that matter
/// here).
#[derive(Clone, Debug)]
pub struct PodDef {
    pub name: String,
    pub namespace: String,
    pub labels: HashMap<String, String>,
    /// The pod's annotations: `PodSandboxConfig.annotations`, verbatim.
    pub annotations: HashMap<String, String>,
    pub restart_policy: RestartPolicy,
    /// `terminationGracePeriodSeconds` (whole seconds are used).
    pub termination_grace: Duration,
    /// Regular containers, in spec order.
    pub containers: Vec<ContainerDef>,
}

impl PodDef {
    /// A pod in namespace `default`, restart policy Always, grace 30 s (the
    /// API defaults), no containers yet.
    pub fn new(name: &str) -> Self {
        PodDef {
            name: name.to_string(),
            namespace: "default".to_string(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
            restart_policy: RestartPolicy::Always,
            termination_grace: Duration::from_secs(30),
            containers: Vec::new(),
        }
    }

    /// A pod as the Job controller creates it for Job `job_name`: named
    /// `<job_name>-<5 chars>`, restart policy Never (set OnFailure if
    /// wanted; a Job refuses Always), with the controller's labels.
    pub fn job(job_name: &str) -> Self {
        let suffix = super::unique_uid("x");
        let suffix: String = suffix
            .chars()
            .rev()
            .filter(|c| c.is_ascii_hexdigit())
            .take(5)
            .collect();
        PodDef::new(&format!("{job_name}-{suffix}"))
            .restart_policy(RestartPolicy::Never)
            .with_job_labels(job_name)
    }

    /// Add the Job controller's labels (`batch.kubernetes.io/job-name`,
    /// `job-name`, `batch.kubernetes.io/controller-uid`, `controller-uid`).
    pub fn with_job_labels(mut self, job_name: &str) -> Self {
        let controller_uid = super::unique_uid(job_name);
        for (k, v) in [
            (LABEL_JOB_NAME, job_name),
            (LABEL_JOB_NAME_LEGACY, job_name),
            (LABEL_CONTROLLER_UID, &controller_uid),
            (LABEL_CONTROLLER_UID_LEGACY, &controller_uid),
        ] {
            self.labels.insert(k.to_string(), v.to_string());
        }
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart_policy = policy;
        self
    }

    pub fn termination_grace(mut self, grace: Duration) -> Self {
        self.termination_grace = grace;
        self
    }

    pub fn container(mut self, container: ContainerDef) -> Self {
        self.containers.push(container);
        self
    }

    fn grace_secs(&self) -> i64 {
        i64::try_from(self.termination_grace.as_secs()).unwrap_or(i64::MAX)
    }

    fn container_def(&self, name: &str) -> Option<&ContainerDef> {
        self.containers.iter().find(|c| c.name == name)
    }
}

// ---------------------------------------------------------------------------
// What the simulator records

/// The pod phase, as kubelet's getPhase computes it. (Current kubelets
/// never report Unknown; it is here for completeness.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// Which part of kubelet made a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The pod worker's first sync (sandbox and containers in spec order).
    Start,
    /// A later pod worker sync (status reads, restarts).
    Sync,
    /// The PLEG relist.
    Pleg,
    /// Killing the pod (deletion or a terminal phase) or a container in it.
    Kill,
    /// [`Kubelet::stop_container`] (a liveness-probe kill, say).
    Manual,
}

/// A gRPC error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    pub code: tonic::Code,
    pub message: String,
}

impl From<&tonic::Status> for CallError {
    fn from(status: &tonic::Status) -> Self {
        CallError {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// One CRI call the simulator made. Recorded when it is sent (`end` None
/// while it is in flight) and completed when it returns.
#[derive(Clone, Debug)]
pub struct CriCall {
    /// The CRI method, e.g. `StartContainer`.
    pub method: &'static str,
    pub origin: Origin,
    /// The spec name of the container the call is about, if any.
    pub container: Option<String>,
    /// The container's attempt, for CreateContainer.
    pub attempt: Option<u32>,
    /// The container or sandbox id (of the request, or CreateContainer's and
    /// RunPodSandbox's answer).
    pub id: Option<String>,
    /// `StopContainerRequest.timeout` or `ExecSyncRequest.timeout`.
    pub timeout: Option<i64>,
    pub start: Instant,
    pub end: Option<Instant>,
    pub error: Option<CallError>,
}

impl CriCall {
    /// How long it took (None while in flight).
    pub fn duration(&self) -> Option<Duration> {
        self.end.map(|e| e.duration_since(self.start))
    }

    /// Returned without an error.
    pub fn ok(&self) -> bool {
        self.end.is_some() && self.error.is_none()
    }

    pub fn in_flight(&self) -> bool {
        self.end.is_none()
    }

    fn is(&self, method: &str, container: Option<&str>) -> bool {
        self.method == method && container.is_none_or(|c| self.container.as_deref() == Some(c))
    }
}

/// kubelet created a new attempt of a container because the latest one was
/// CREATED or UNKNOWN (kubelet: "to be started again"). With a correct
/// runtime (or shim) this never happens for a container kubelet started.
#[derive(Clone, Debug)]
pub struct Duplicate {
    pub at: Instant,
    pub container: String,
    pub old_id: String,
    pub old_state: ContainerState,
    pub old_attempt: u32,
    pub new_attempt: u32,
    /// What StartContainer of the old one answered (None: the simulator
    /// never got an answer for it).
    pub start_answer: Option<Result<(), CallError>>,
}

/// A preStop hook run.
#[derive(Clone, Debug)]
pub struct PreStopRun {
    pub start: Instant,
    /// When kubelet stopped waiting: the hook finished, or the grace period
    /// ran out (`timed_out`; the hook then goes on in the background).
    pub end: Instant,
    pub timed_out: bool,
    /// The hook failed (exec error or non-zero exit).
    pub error: Option<String>,
}

/// How one container was stopped by [`PodHandle::delete`] (or a kill).
#[derive(Clone, Debug)]
pub struct StopTiming {
    pub container: String,
    pub id: String,
    pub pre_stop: Option<PreStopRun>,
    /// `StopContainerRequest.timeout` (seconds).
    pub timeout: i64,
    /// When StopContainer was sent and when it returned.
    pub sent: Instant,
    pub returned: Instant,
    pub error: Option<CallError>,
}

/// Why kubelet killed the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The phase became Succeeded or Failed.
    Terminal,
    /// [`PodHandle::delete`].
    Deleted,
}

/// Something the simulator did or saw.
#[derive(Clone, Debug)]
pub enum Event {
    /// CreateContainer answered; `origin` Start for the first sync.
    Created {
        container: String,
        id: String,
        attempt: u32,
        origin: Origin,
    },
    /// Starting an attempt failed at `step` (ImageStatus, PullImage,
    /// CreateContainer or StartContainer).
    StartFailed {
        container: String,
        attempt: u32,
        step: &'static str,
        error: CallError,
    },
    /// A new attempt because the latest exited (restart policy allows).
    Restart {
        container: String,
        previous_id: String,
        exit_code: i32,
        attempt: u32,
    },
    Duplicate(Duplicate),
    /// Not restarted yet: in crash-loop backoff for `remaining`.
    BackOff {
        container: String,
        remaining: Duration,
    },
    PreStop {
        container: String,
        id: String,
        run: PreStopRun,
    },
    PhaseChanged {
        from: Phase,
        to: Phase,
    },
    /// The sandbox is not ready while the pod should run (kubelet would
    /// kill the pod and create a new sandbox; the simulator only records it).
    SandboxNotReady {
        sandbox_id: String,
    },
    Killing(KillReason),
    /// Killing the pod failed (a StopContainer or StopPodSandbox, or reading
    /// the status, failed): it is tried again after `kill_retry`.
    KillFailed(String),
    /// Reading the pod's status failed (the sync is retried).
    StatusError(String),
}

#[derive(Clone, Debug)]
pub struct PodEvent {
    pub at: Instant,
    pub event: Event,
}

// ---------------------------------------------------------------------------
// Time helpers

struct Anchor {
    instant: Instant,
    system: SystemTime,
    uptime: f64,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let uptime = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| parse_uptime(&s))
            .unwrap_or(0.0);
        Anchor {
            instant: Instant::now(),
            system: SystemTime::now(),
            uptime,
        }
    })
}

fn signed_secs(at: Instant, base: Instant) -> f64 {
    if at >= base {
        at.duration_since(base).as_secs_f64()
    } else {
        -base.duration_since(at).as_secs_f64()
    }
}

/// The first number of a `/proc/uptime` text (seconds since boot), as
/// containers write it for tests.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `/proc/uptime` at `at` (to compare with what containers read there;
/// 10 ms resolution). Assumes no suspend between now and `at`.
pub fn uptime_at(at: Instant) -> f64 {
    let a = anchor();
    a.uptime + signed_secs(at, a.instant)
}

/// Wall-clock nanoseconds since the epoch at `at`, comparable with the CRI's
/// `created_at`, `started_at` and `finished_at`.
pub fn unix_nanos_at(at: Instant) -> i64 {
    let a = anchor();
    let base = a
        .system
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as f64)
        .unwrap_or(0.0);
    (base + signed_secs(at, a.instant) * 1e9) as i64
}

fn system_time_of_nanos(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

// ---------------------------------------------------------------------------
// The kubelet

/// Knobs; the defaults are kubelet's.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// PLEG relist period (kubelet: 1 s).
    pub relist_period: Duration,
    /// The pod worker's periodic resync (kubelet `--sync-frequency`, 1 min).
    pub resync_period: Duration,
    /// Crash-loop backoff: the first delay (kubelet: 10 s), doubled per
    /// restart up to `max_backoff` (300 s).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// `--runtime-request-timeout` (2 min): the deadline of most calls.
    pub runtime_request_timeout: Duration,
    /// When killing a pod fails, the pod worker tries again after this long
    /// (kubelet source: pod_workers.go completeWork requeues a failed
    /// SyncTerminatingPod after kubelet.go's backOffPeriod, 10 s, with
    /// jitter).
    pub kill_retry: Duration,
    /// Each container in a PID namespace of its own, as kubelet does for a
    /// pod without `shareProcessNamespace` (its containers' init processes
    /// are then PID 1 and ignore a SIGTERM they have no handler for; and
    /// containerd reports an exit without first running `runc kill --all`,
    /// about 20 ms sooner). Off by default, unlike kubelet: the tests
    /// written for the simulator assume the pod's shared PID namespace.
    pub pid_namespace_per_container: bool,
    /// Pull one image at a time, node-wide, in the order asked (kubelet's
    /// `serializeImagePulls`, true by default: pkg/kubelet/images/puller.go
    /// queues each PullImage until the one before it is done; the
    /// ImageStatus before it is sent at once).
    pub serialize_image_pulls: bool,
    /// Send the pod's annotations in every `ImageSpec`, as kubelet does
    /// (off: an ImageStatus that names no pod, so that only the PullImage
    /// and CreateContainer tell the shim kubelet went on).
    pub image_spec_annotations: bool,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            relist_period: Duration::from_secs(1),
            resync_period: Duration::from_secs(60),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            runtime_request_timeout: Duration::from_secs(120),
            kill_retry: Duration::from_secs(10),
            pid_namespace_per_container: false,
            serialize_image_pulls: true,
            image_spec_annotations: true,
        }
    }
}

struct KubeletInner {
    endpoint: PathBuf,
    log_root: PathBuf,
    config: KubeletConfig,
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    /// Taken for each PullImage with `serialize_image_pulls` (FIFO).
    pulls: tokio::sync::Mutex<()>,
}

/// The simulated kubelet: one CRI connection (as kubelet has), any number
/// of pods. Create it inside a tokio runtime.
pub struct Kubelet {
    inner: Arc<KubeletInner>,
}

impl Kubelet {
    /// A kubelet with default settings talking to the CRI socket `endpoint`;
    /// pod log directories go under `log_root`.
    pub fn new(endpoint: &Path, log_root: &Path) -> Self {
        Self::with_config(endpoint, log_root, KubeletConfig::default())
    }

    pub fn with_config(endpoint: &Path, log_root: &Path, config: KubeletConfig) -> Self {
        let (rt, img) = cri_client(endpoint);
        Kubelet {
            inner: Arc::new(KubeletInner {
                endpoint: endpoint.to_path_buf(),
                log_root: log_root.to_path_buf(),
                config,
                rt,
                img,
                pulls: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.inner.config
    }

    pub fn endpoint(&self) -> &Path {
        &self.inner.endpoint
    }

    /// Admit a pod: RunPodSandbox and PodSandboxStatus (errors are returned),
    /// then start the pod worker (which starts the containers in spec order,
    /// one at a time, in the background: see [`PodHandle::wait_started`])
    /// and the PLEG relist.
    pub async fn run_pod(&self, def: PodDef) -> Result<PodHandle> {
        if def.containers.is_empty() {
            bail!("pod {} has no containers", def.name);
        }
        let mut names = HashSet::new();
        for c in &def.containers {
            if !names.insert(c.name.as_str()) {
                bail!("pod {}: container name {} used twice", def.name, c.name);
            }
        }
        let inner = self.inner.clone();
        let mut sandbox_config = pod_sandbox_config_in(&def.name, &def.namespace, &inner.log_root);
        let uid = sandbox_config
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        // The pod's labels plus kubelet's three (kubelet's win: newPodLabels).
        let mut labels = def.labels.clone();
        labels.extend(sandbox_config.labels.drain());
        sandbox_config.labels = labels;
        // The pod's annotations plus the two kubelet adds to every pod it
        // is given (pkg/kubelet/config/config.go): its source and when it
        // first saw the pod, in nanoseconds, which names the pod in the
        // ImageStatus requests (they carry the pod's annotations).
        sandbox_config.annotations = def.annotations.clone();
        sandbox_config
            .annotations
            .insert("kubernetes.io/config.source".into(), "api".into());
        sandbox_config
            .annotations
            .insert("kubernetes.io/config.seen".into(), first_seen());

        let state = Arc::new(PodState {
            kubelet: inner.clone(),
            def,
            uid,
            sandbox_config,
            sandbox_id: OnceLock::new(),
            worker: Arc::new(tokio::sync::Mutex::new(())),
            wake: tokio::sync::Notify::new(),
            terminating: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            data: Mutex::new(PodData::default()),
        });
        // The pod worker owns the pod from here: nothing else (delete, a
        // manual stop) runs before the first sync is done.
        let guard = state.worker.clone().lock_owned().await;

        let deadline = inner.config.runtime_request_timeout;
        let mut rt = inner.rt.clone();
        let (idx, res) = state
            .cri(
                Rec::new("RunPodSandbox", Origin::Start),
                rt.run_pod_sandbox(request(
                    RunPodSandboxRequest {
                        config: Some(state.sandbox_config.clone()),
                        runtime_handler: String::new(),
                    },
                    // kubelet: RunPodSandbox gets twice the request timeout.
                    Some(deadline * 2),
                )),
            )
            .await;
        let sandbox_id = res
            .map_err(|s| anyhow!("RunPodSandbox for pod {}: {s}", state.def.name))?
            .pod_sandbox_id;
        state.set_call_id(idx, &sandbox_id);
        let _ = state.sandbox_id.set(sandbox_id.clone());

        // kubelet reads the sandbox's IPs right away.
        let (_, res) = state
            .cri(
                Rec::new("PodSandboxStatus", Origin::Start).id(&sandbox_id),
                rt.pod_sandbox_status(request(
                    PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox_id.clone(),
                        verbose: false,
                    },
                    Some(deadline),
                )),
            )
            .await;
        let status = res
            .map_err(|s| anyhow!("PodSandboxStatus for pod {}: {s}", state.def.name))?
            .status;
        state.data().pod_ip = status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();

        let worker = tokio::spawn(worker_loop(state.clone(), guard)).abort_handle();
        let pleg = tokio::spawn(pleg_loop(state.clone())).abort_handle();
        Ok(PodHandle {
            state,
            tasks: vec![worker, pleg],
        })
    }

    /// Stop one container of the pod the way kubelet kills a container whose
    /// liveness probe failed: StopContainer of just that container (its
    /// latest attempt) with `timeout`, inside the pod worker; the worker then
    /// restarts it per restart policy. (kubelet's killContainer would first
    /// run the preStop hook and derive the timeout from the grace period;
    /// here the caller picks the timeout and no hook runs.)
    pub async fn stop_container(
        &self,
        pod: &PodHandle,
        name: &str,
        timeout: Duration,
    ) -> Result<()> {
        let st = &pod.state;
        let guard = st.worker.lock().await;
        let id = st
            .container_ids(name)
            .pop()
            .with_context(|| format!("no container {name} in pod {}", st.def.name))?;
        let secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
        let mut rt = self.inner.rt.clone();
        let (_, res) = st
            .cri(
                Rec::new("StopContainer", Origin::Manual)
                    .container(name)
                    .id(&id)
                    .timeout(secs),
                rt.stop_container(request(
                    StopContainerRequest {
                        container_id: id.clone(),
                        timeout: secs,
                    },
                    Some(self.inner.config.runtime_request_timeout + timeout),
                )),
            )
            .await;
        drop(guard);
        st.wake.notify_one();
        res.map(|_| ())
            .map_err(|s| anyhow!("StopContainer {name} ({id}): {s}"))
    }
}

// ---------------------------------------------------------------------------
// Per-pod state

#[derive(Default)]
struct PodData {
    calls: Vec<CriCall>,
    events: Vec<PodEvent>,
    /// Every container the simulator created: (name, id, attempt).
    created: Vec<(String, String, u32)>,
    /// StartContainer's answer per container id.
    start_answers: HashMap<String, Result<(), CallError>>,
    /// The pod's containers at the last status read, newest first.
    statuses: Vec<ContainerStatus>,
    /// Container ids once seen RUNNING (kubelet's old API status).
    seen_running: HashSet<String>,
    phase: Option<Phase>,
    backoff: HashMap<String, BackoffEntry>,
    sandbox_not_ready_reported: bool,
    initial_sync_done: bool,
    removed: bool,
    pod_ip: String,
    background: Vec<AbortHandle>,
}

struct BackoffEntry {
    backoff: Duration,
    last_update: SystemTime,
}

struct PodState {
    kubelet: Arc<KubeletInner>,
    def: PodDef,
    uid: String,
    sandbox_config: PodSandboxConfig,
    sandbox_id: OnceLock<String>,
    /// The pod worker: one sync (or kill) at a time.
    worker: Arc<tokio::sync::Mutex<()>>,
    /// PLEG events and manual stops wake the worker.
    wake: tokio::sync::Notify,
    /// Deletion requested: the worker syncs no more.
    terminating: AtomicBool,
    /// Killed (terminal phase or deleted): no more syncs, relists stop.
    finished: AtomicBool,
    data: Mutex<PodData>,
}

/// A CRI call to record.
struct Rec {
    method: &'static str,
    origin: Origin,
    container: Option<String>,
    attempt: Option<u32>,
    id: Option<String>,
    timeout: Option<i64>,
}

impl Rec {
    fn new(method: &'static str, origin: Origin) -> Self {
        Rec {
            method,
            origin,
            container: None,
            attempt: None,
            id: None,
            timeout: None,
        }
    }
    fn container(mut self, name: &str) -> Self {
        self.container = Some(name.to_string());
        self
    }
    fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }
    fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }
    fn timeout(mut self, timeout: i64) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A request with kubelet's client deadline (None: no deadline).
fn request<T>(message: T, deadline: Option<Duration>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    req
}

/// The pod's status as kubelet's GetPodStatus reads it.
struct Snapshot {
    sandboxes: Vec<PodSandboxStatus>,
    /// Newest first (kubelet sorts by creation time).
    containers: Vec<ContainerStatus>,
}

impl Snapshot {
    fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ContainerStatus> + 'a {
        self.containers
            .iter()
            .filter(move |c| status_name(c) == name)
    }
}

fn status_name(c: &ContainerStatus) -> &str {
    c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("")
}

/// kubelet reads the restart count from its annotation (kubelet source:
/// kuberuntime labels.go getContainerInfoFromAnnotations); a new attempt is
/// the latest's count + 1.
fn restart_count(c: &ContainerStatus) -> u32 {
    c.annotations
        .get(ANNOTATION_RESTART_COUNT)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0))
}

impl PodState {
    fn data(&self) -> MutexGuard<'_, PodData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_id(&self) -> &str {
        self.sandbox_id.get().map(String::as_str).unwrap_or("")
    }

    fn event(&self, event: Event) {
        self.data().events.push(PodEvent {
            at: Instant::now(),
            event,
        });
    }

    /// Make and record a CRI call; returns the record's index and the answer.
    async fn cri<T>(
        &self,
        rec: Rec,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> (usize, Result<T, tonic::Status>) {
        let idx = {
            let mut d = self.data();
            d.calls.push(CriCall {
                method: rec.method,
                origin: rec.origin,
                container: rec.container,
                attempt: rec.attempt,
                id: rec.id,
                timeout: rec.timeout,
                start: Instant::now(),
                end: None,
                error: None,
            });
            d.calls.len() - 1
        };
        let res = call.await.map(tonic::Response::into_inner);
        let mut d = self.data();
        let c = &mut d.calls[idx];
        c.end = Some(Instant::now());
        c.error = res.as_ref().err().map(CallError::from);
        (idx, res)
    }

    fn set_call_id(&self, idx: usize, id: &str) {
        self.data().calls[idx].id = Some(id.to_string());
    }

    fn container_ids(&self, name: &str) -> Vec<String> {
        self.data()
            .created
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, id, _)| id.clone())
            .collect()
    }

    fn phase(&self) -> Phase {
        self.data().phase.unwrap_or(Phase::Pending)
    }

    /// The hash kubelet puts in `io.kubernetes.container.hash`: FNV-32a of
    /// the container spec's JSON, in hex (kubelet: HashContainer).
    fn container_hash(def: &ContainerDef) -> String {
        let mounts: Vec<String> = def
            .mounts
            .iter()
            .map(|(h, c)| {
                format!(
                    "{{\"hostPath\":{},\"mountPath\":{}}}",
                    json_string(&h.to_string_lossy()),
                    json_string(c)
                )
            })
            .collect();
        let json = format!(
            "{{\"name\":{},\"image\":{},\"command\":{},\"lifecycle\":{},\"volumeMounts\":[{}]}}",
            json_string(&def.name),
            json_string(&def.image),
            json_string_array(&def.command),
            def.pre_stop
                .as_ref()
                .map(pre_stop_json)
                .unwrap_or_else(|| "null".into()),
            mounts.join(",")
        );
        let mut hash: u32 = 0x811c_9dc5;
        for b in json.bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        format!("{hash:x}")
    }

    /// The ContainerConfig kubelet builds (generateContainerConfig): command,
    /// mounts, log path `<name>/<attempt>.log`, kubelet's labels and
    /// annotations. (Not modelled: kubelet's /etc/hosts and termination-log
    /// mounts, service environment variables, resources.)
    fn container_config(
        &self,
        def: &ContainerDef,
        attempt: u32,
        image_ref: &str,
    ) -> k8s_cri::v1::ContainerConfig {
        let mut config = container_config(&def.name, &[]);
        config.metadata = Some(ContainerMetadata {
            name: def.name.clone(),
            attempt,
        });
        if self.kubelet.config.pid_namespace_per_container {
            config.linux = Some(k8s_cri::v1::LinuxContainerConfig {
                security_context: Some(k8s_cri::v1::LinuxContainerSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        config.image = Some(ImageSpec {
            // kubelet passes the image reference ImageStatus answered (the
            // image id) and the image as the user wrote it (kubelet source:
            // kuberuntime_container.go startContainer).
            image: image_ref.to_string(),
            user_specified_image: def.image.clone(),
            ..Default::default()
        });
        config.command = def.command.clone();
        config.log_path = format!("{}/{attempt}.log", def.name);
        config.labels = HashMap::from([
            (LABEL_POD_NAME.to_string(), self.def.name.clone()),
            (LABEL_POD_NAMESPACE.to_string(), self.def.namespace.clone()),
            (LABEL_POD_UID.to_string(), self.uid.clone()),
            (LABEL_CONTAINER_NAME.to_string(), def.name.clone()),
        ]);
        let mut annotations = HashMap::from([
            (ANNOTATION_HASH.to_string(), Self::container_hash(def)),
            (ANNOTATION_RESTART_COUNT.to_string(), attempt.to_string()),
            (
                ANNOTATION_TERMINATION_MESSAGE_PATH.to_string(),
                "/dev/termination-log".to_string(),
            ),
            (
                ANNOTATION_TERMINATION_MESSAGE_POLICY.to_string(),
                "File".to_string(),
            ),
            (
                ANNOTATION_GRACE_PERIOD.to_string(),
                self.def.grace_secs().to_string(),
            ),
        ]);
        if let Some(hook) = &def.pre_stop {
            annotations.insert(ANNOTATION_PRE_STOP.to_string(), pre_stop_json(hook));
        }
        config.annotations = annotations;
        config.mounts = def
            .mounts
            .iter()
            .map(|(host, path)| Mount {
                container_path: path.clone(),
                host_path: host.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .collect();
        config
    }

    /// kubelet's startContainer: ensure the image, create, start. Returns the
    /// new container's id if CreateContainer succeeded (whatever
    /// StartContainer answered).
    async fn start_container(
        &self,
        def: &ContainerDef,
        attempt: u32,
        origin: Origin,
    ) -> Option<String> {
        let k = &self.kubelet;
        let deadline = Some(k.config.runtime_request_timeout);
        let mut rt = k.rt.clone();
        let mut img = k.img.clone();
        let name = def.name.as_str();
        let failed = |step: &'static str, status: &tonic::Status| {
            self.event(Event::StartFailed {
                container: name.to_string(),
                attempt,
                step,
                error: CallError::from(status),
            });
        };
        // kubelet's ImageSpec carries the pod's annotations (EnsureImageExists).
        let spec = ImageSpec {
            image: def.image.clone(),
            annotations: match k.config.image_spec_annotations {
                true => self.sandbox_config.annotations.clone(),
                false => HashMap::new(),
            },
            ..Default::default()
        };
        let image_status = || ImageStatusRequest {
            image: Some(spec.clone()),
            verbose: false,
        };

        // EnsureImageExists: ImageStatus; PullImage only if missing (policy
        // IfNotPresent).
        let (_, res) = self
            .cri(
                Rec::new("ImageStatus", origin).container(name),
                img.image_status(request(image_status(), deadline)),
            )
            .await;
        let mut image = match res {
            Ok(r) => r.image,
            Err(s) => {
                failed("ImageStatus", &s);
                return None;
            }
        };
        if image.is_none() {
            let _turn = match k.config.serialize_image_pulls {
                true => Some(k.pulls.lock().await),
                false => None,
            };
            let (_, res) = self
                .cri(
                    Rec::new("PullImage", origin).container(name),
                    img.pull_image(request(
                        PullImageRequest {
                            image: Some(spec.clone()),
                            auth: None,
                            sandbox_config: Some(self.sandbox_config.clone()),
                        },
                        None,
                    )),
                )
                .await;
            if let Err(s) = res {
                failed("PullImage", &s);
                return None;
            }
        }
        // generateContainerConfig reads the image again (getImageUser, for
        // the image's user). kubelet source: kuberuntime_container.go.
        let (_, res) = self
            .cri(
                Rec::new("ImageStatus", origin).container(name),
                img.image_status(request(image_status(), deadline)),
            )
            .await;
        match res {
            Ok(r) => image = r.image.or(image),
            Err(s) => {
                failed("ImageStatus", &s);
                return None;
            }
        }
        let image_ref = image
            .map(|i| i.id)
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| def.image.clone());

        let config = self.container_config(def, attempt, &image_ref);
        let (idx, res) = self
            .cri(
                Rec::new("CreateContainer", origin)
                    .container(name)
                    .attempt(attempt),
                rt.create_container(request(
                    CreateContainerRequest {
                        pod_sandbox_id: self.sandbox_id().to_string(),
                        config: Some(config),
                        sandbox_config: Some(self.sandbox_config.clone()),
                    },
                    deadline,
                )),
            )
            .await;
        let id = match res {
            Ok(r) => r.container_id,
            Err(s) => {
                failed("CreateContainer", &s);
                return None;
            }
        };
        self.set_call_id(idx, &id);
        self.data()
            .created
            .push((name.to_string(), id.clone(), attempt));
        self.event(Event::Created {
            container: name.to_string(),
            id: id.clone(),
            attempt,
            origin,
        });

        let (_, res) = self
            .cri(
                Rec::new("StartContainer", origin).container(name).id(&id),
                rt.start_container(request(
                    StartContainerRequest {
                        container_id: id.clone(),
                    },
                    deadline,
                )),
            )
            .await;
        let answer = res.as_ref().map(|_| ()).map_err(CallError::from);
        if let Err(s) = &res {
            failed("StartContainer", s);
        }
        self.data().start_answers.insert(id.clone(), answer);
        // (No postStart hooks in this model.)
        Some(id)
    }

    /// kubelet's GetPodStatus: the pod's sandboxes and containers by pod uid
    /// label, with PodSandboxStatus and ContainerStatus for each.
    async fn get_pod_status(&self, origin: Origin) -> Result<Snapshot> {
        let k = &self.kubelet;
        let deadline = Some(k.config.runtime_request_timeout);
        let mut rt = k.rt.clone();
        let selector = HashMap::from([(LABEL_POD_UID.to_string(), self.uid.clone())]);

        let (_, res) = self
            .cri(
                Rec::new("ListPodSandbox", origin),
                rt.list_pod_sandbox(request(
                    ListPodSandboxRequest {
                        filter: Some(PodSandboxFilter {
                            label_selector: selector.clone(),
                            ..Default::default()
                        }),
                    },
                    deadline,
                )),
            )
            .await;
        let items = res.context("ListPodSandbox")?.items;
        let mut sandboxes = Vec::new();
        for item in items {
            let (_, res) = self
                .cri(
                    Rec::new("PodSandboxStatus", origin).id(&item.id),
                    rt.pod_sandbox_status(request(
                        PodSandboxStatusRequest {
                            pod_sandbox_id: item.id.clone(),
                            verbose: false,
                        },
                        deadline,
                    )),
                )
                .await;
            match res {
                Ok(r) => sandboxes.extend(r.status),
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(anyhow!("PodSandboxStatus {}: {s}", item.id)),
            }
        }

        let (_, res) = self
            .cri(
                Rec::new("ListContainers", origin),
                rt.list_containers(request(
                    ListContainersRequest {
                        filter: Some(ContainerFilter {
                            label_selector: selector,
                            ..Default::default()
                        }),
                    },
                    deadline,
                )),
            )
            .await;
        let listed = res.context("ListContainers")?.containers;
        let mut containers = Vec::new();
        for c in listed {
            let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
            let (_, res) = self
                .cri(
                    Rec::new("ContainerStatus", origin)
                        .container(name)
                        .id(&c.id),
                    rt.container_status(request(
                        ContainerStatusRequest {
                            container_id: c.id.clone(),
                            verbose: false,
                        },
                        deadline,
                    )),
                )
                .await;
            match res {
                Ok(r) => containers.extend(r.status),
                // Removed meanwhile: kubelet skips it.
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(anyhow!("ContainerStatus {}: {s}", c.id)),
            }
        }
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(Snapshot {
            sandboxes,
            containers,
        })
    }

    /// Take in a status read: remember it and compute the phase (terminal
    /// phases stick, as kubelet's generateAPIPodStatus keeps them).
    fn take_status(&self, snap: &Snapshot, pod_is_terminal: bool) {
        let (from, to) = {
            let mut d = self.data();
            for c in &snap.containers {
                if state_of(c) == ContainerState::ContainerRunning {
                    d.seen_running.insert(c.id.clone());
                }
            }
            d.statuses = snap.containers.clone();
            let computed = get_phase(&self.def, snap, &d.seen_running, pod_is_terminal);
            let old = d.phase.unwrap_or(Phase::Pending);
            let new = if old.is_terminal() { old } else { computed };
            d.phase = Some(new);
            (old, new)
        };
        if from != to {
            self.event(Event::PhaseChanged { from, to });
        }
    }

    /// kubelet's crash-loop backoff (kubelet source: client-go
    /// flowcontrol.Backoff keyed by pod, container name and hash;
    /// kuberuntime_manager.go doBackOff, measured from the newest exited
    /// attempt's finishedAt): Some(remaining) while in backoff; otherwise
    /// advances the backoff and returns None.
    fn check_backoff(&self, def: &ContainerDef, finished_at: i64) -> Option<Duration> {
        let cfg = &self.kubelet.config;
        let key = format!("{}_{}", def.name, Self::container_hash(def));
        let event_time = system_time_of_nanos(finished_at);
        let now = SystemTime::now();
        let expired = |last: SystemTime| {
            event_time
                .duration_since(last)
                .is_ok_and(|d| d > cfg.max_backoff * 2)
        };
        let mut d = self.data();
        if let Some(entry) = d.backoff.get(&key) {
            if !expired(entry.last_update) {
                let since = now.duration_since(event_time).unwrap_or_default();
                if since < entry.backoff {
                    return Some(entry.backoff - since);
                }
            }
        }
        // Next: the first entry (or one idle for 2 × max) starts at the
        // initial backoff, later ones double up to the maximum. So the first
        // restart is immediate and the second waits the initial backoff.
        let backoff = match d.backoff.get(&key) {
            Some(e) if !expired(e.last_update) => (e.backoff * 2).min(cfg.max_backoff),
            _ => cfg.initial_backoff,
        };
        d.backoff.insert(
            key,
            BackoffEntry {
                backoff,
                last_update: now,
            },
        );
        None
    }

    /// kubelet's killContainer: the preStop hook (bounded by the grace
    /// period), the elapsed whole seconds subtracted, at least 2 s, then
    /// StopContainer.
    async fn kill_container(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        grace: i64,
        origin: Origin,
    ) -> StopTiming {
        let mut grace = grace;
        let mut pre_stop = None;
        if let Some(hook) = self
            .def
            .container_def(name)
            .and_then(|d| d.pre_stop.clone())
        {
            if grace > 0 {
                let start = Instant::now();
                let st = self.clone();
                let (n, i) = (name.to_string(), id.to_string());
                let task = tokio::spawn(async move { st.run_pre_stop(&n, &i, hook).await });
                self.data().background.push(task.abort_handle());
                let waited =
                    tokio::time::timeout(Duration::from_secs(grace.unsigned_abs()), task).await;
                let end = Instant::now();
                let (timed_out, error) = match waited {
                    // Out of grace: kubelet stops waiting; the hook goes on.
                    Err(_) => (true, None),
                    Ok(Ok(res)) => (false, res.err()),
                    Ok(Err(join)) => (false, Some(join.to_string())),
                };
                let run = PreStopRun {
                    start,
                    end,
                    timed_out,
                    error,
                };
                self.event(Event::PreStop {
                    container: name.to_string(),
                    id: id.to_string(),
                    run: run.clone(),
                });
                pre_stop = Some(run);
                let elapsed =
                    i64::try_from(end.duration_since(start).as_secs()).unwrap_or(i64::MAX);
                grace = grace.saturating_sub(elapsed);
            }
        }
        let timeout = grace.max(MIN_GRACE_SECS);
        let mut rt = self.kubelet.rt.clone();
        let sent = Instant::now();
        let mut sends = 0;
        let res = loop {
            let (_, res) = self
                .cri(
                    Rec::new("StopContainer", origin)
                        .container(name)
                        .id(id)
                        .timeout(timeout),
                    rt.stop_container(request(
                        StopContainerRequest {
                            container_id: id.to_string(),
                            timeout,
                        },
                        // kubelet: the request timeout plus the stop timeout.
                        Some(
                            self.kubelet.config.runtime_request_timeout
                                + Duration::from_secs(timeout.unsigned_abs()),
                        ),
                    )),
                )
                .await;
            sends += 1;
            // grpc-go resends at once, on a new connection, a call the
            // server refused unprocessed: a stream above the last-stream-id
            // of the GOAWAY that drained the connection (transparent retry;
            // kubelet's StopContainer went out again 0 ms later when
            // containerd restarted under it through the shim).
            match &res {
                Err(status) if sends == 1 && refused_unprocessed(status) => continue,
                _ => break res,
            }
        };
        StopTiming {
            container: name.to_string(),
            id: id.to_string(),
            pre_stop,
            timeout,
            sent,
            returned: Instant::now(),
            error: res.as_ref().err().map(CallError::from),
        }
    }

    /// Run a preStop hook: exec through ExecSync with timeout 0 (and no
    /// client deadline), or sleep (whole seconds, rounded up).
    async fn run_pre_stop(&self, name: &str, id: &str, hook: PreStop) -> Result<(), String> {
        match hook {
            PreStop::Exec(cmd) => {
                let mut rt = self.kubelet.rt.clone();
                let (_, res) = self
                    .cri(
                        Rec::new("ExecSync", Origin::Kill)
                            .container(name)
                            .id(id)
                            .timeout(0),
                        rt.exec_sync(request(
                            ExecSyncRequest {
                                container_id: id.to_string(),
                                cmd,
                                timeout: 0,
                            },
                            None,
                        )),
                    )
                    .await;
                match res {
                    Ok(r) if r.exit_code == 0 => Ok(()),
                    Ok(r) => Err(format!(
                        "exited with {}: {}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stderr)
                    )),
                    Err(s) => Err(s.to_string()),
                }
            }
            PreStop::Sleep(d) => {
                tokio::time::sleep(Duration::from_secs(whole_secs_up(d))).await;
                Ok(())
            }
        }
    }

    /// kubelet's killPodWithSyncResult: every RUNNING container of the status
    /// in parallel (one task each), wait for all, then StopPodSandbox for
    /// each sandbox. CREATED containers get no StopContainer.
    /// kubelet's killPod, tried again (with a fresh status) until it
    /// succeeds, as the pod worker does with a failed SyncTerminatingPod.
    /// Returns the stop timings of every try, in order.
    async fn kill_pod_until_done(
        self: &Arc<Self>,
        reason: KillReason,
        grace: i64,
        snap: Snapshot,
    ) -> Vec<StopTiming> {
        let mut timings = Vec::new();
        let mut snap = Some(snap);
        loop {
            let failure = match snap.take() {
                Some(snap) => {
                    let (t, failure) = self.kill_pod(reason, grace, &snap).await;
                    timings.extend(t);
                    failure
                }
                None => match self.get_pod_status(Origin::Kill).await {
                    Ok(snap) => {
                        self.take_status(&snap, false);
                        let (t, failure) = self.kill_pod(reason, grace, &snap).await;
                        timings.extend(t);
                        failure
                    }
                    Err(e) => Some(format!("reading the status: {e:#}")),
                },
            };
            match failure {
                None => return timings,
                Some(why) => {
                    self.event(Event::KillFailed(why));
                    tokio::time::sleep(self.kubelet.config.kill_retry).await;
                }
            }
        }
    }

    /// One try of kubelet's killPod. Returns the stop timings and, if
    /// anything failed, what.
    async fn kill_pod(
        self: &Arc<Self>,
        reason: KillReason,
        grace: i64,
        snap: &Snapshot,
    ) -> (Vec<StopTiming>, Option<String>) {
        self.event(Event::Killing(reason));
        let mut tasks = JoinSet::new();
        for c in &snap.containers {
            if state_of(c) != ContainerState::ContainerRunning {
                continue;
            }
            let st = self.clone();
            let (name, id) = (status_name(c).to_string(), c.id.clone());
            tasks.spawn(async move { st.kill_container(&name, &id, grace, Origin::Kill).await });
        }
        let mut timings = Vec::new();
        while let Some(res) = tasks.join_next().await {
            if let Ok(t) = res {
                timings.push(t);
            }
        }
        let order = |t: &StopTiming| {
            self.def
                .containers
                .iter()
                .position(|c| c.name == t.container)
                .unwrap_or(usize::MAX)
        };
        timings.sort_by_key(order);

        let mut rt = self.kubelet.rt.clone();
        let mut ids: Vec<String> = snap.sandboxes.iter().map(|s| s.id.clone()).collect();
        if ids.is_empty() {
            ids.push(self.sandbox_id().to_string());
        }
        let mut failure = timings
            .iter()
            .find_map(|t| t.error.as_ref())
            .map(|e| format!("StopContainer: {:?} {}", e.code, e.message));
        for id in ids {
            // kubelet stops the sandboxes even when a container's stop
            // failed (killPodWithSyncResult); NotFound counts as done.
            let (_, res) = self
                .cri(
                    Rec::new("StopPodSandbox", Origin::Kill).id(&id),
                    rt.stop_pod_sandbox(request(
                        StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        },
                        Some(self.kubelet.config.runtime_request_timeout),
                    )),
                )
                .await;
            if let Err(s) = res {
                if s.code() != tonic::Code::NotFound && failure.is_none() {
                    failure = Some(format!("StopPodSandbox: {s}"));
                }
            }
        }
        (timings, failure)
    }

    /// One pod worker sync after the first (kubelet's SyncPod with
    /// computePodActions). Returns when to sync again at the latest because
    /// of a backoff, or None when the pod is done (killed).
    async fn sync(self: &Arc<Self>) -> Option<Option<Instant>> {
        let snap = match self.get_pod_status(Origin::Sync).await {
            Ok(s) => s,
            Err(e) => {
                self.event(Event::StatusError(format!("{e:#}")));
                return Some(Some(Instant::now() + self.kubelet.config.relist_period));
            }
        };
        self.take_status(&snap, false);
        if self.phase().is_terminal() {
            // kubelet's SyncPod reports the pod terminal; the pod worker then
            // runs SyncTerminatingPod, which kills it with the pod's grace
            // period (kubelet source: kubelet.go SyncPod, pod_workers.go).
            self.kill_pod_until_done(KillReason::Terminal, self.def.grace_secs(), snap)
                .await;
            if let Ok(after) = self.get_pod_status(Origin::Kill).await {
                self.take_status(&after, true);
            }
            self.finished.store(true, Ordering::SeqCst);
            return None;
        }

        let sandbox_ready = snap
            .sandboxes
            .iter()
            .any(|s| s.id == self.sandbox_id() && s.state == PodSandboxState::SandboxReady as i32);
        if !sandbox_ready {
            let first = !std::mem::replace(&mut self.data().sandbox_not_ready_reported, true);
            if first {
                self.event(Event::SandboxNotReady {
                    sandbox_id: self.sandbox_id().to_string(),
                });
            }
            return Some(None);
        }

        let mut wake_at: Option<Instant> = None;
        for def in &self.def.containers {
            let latest = snap.of(&def.name).next();
            let Some(latest) = latest else {
                // Never created (CreateContainer failed, say): start it, with
                // the attempt counted from the log directory as kubelet does
                // when the runtime has no status.
                let attempt = self.attempt_from_logs(&def.name);
                self.start_container(def, attempt, Origin::Sync).await;
                continue;
            };
            let state = state_of(latest);
            let restart = match state {
                ContainerState::ContainerRunning => false,
                // "To be started again" whatever the restart policy.
                ContainerState::ContainerCreated | ContainerState::ContainerUnknown => true,
                ContainerState::ContainerExited => match self.def.restart_policy {
                    RestartPolicy::Never => false,
                    RestartPolicy::OnFailure => latest.exit_code != 0,
                    RestartPolicy::Always => true,
                },
            };
            if !restart {
                continue;
            }
            // doBackOff looks at the newest EXITED attempt.
            if let Some(exited) = snap
                .of(&def.name)
                .find(|c| state_of(c) == ContainerState::ContainerExited)
            {
                if let Some(remaining) = self.check_backoff(def, exited.finished_at) {
                    self.event(Event::BackOff {
                        container: def.name.clone(),
                        remaining,
                    });
                    let at = Instant::now() + remaining;
                    wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                    continue;
                }
            }
            let attempt = restart_count(latest) + 1;
            if state == ContainerState::ContainerExited {
                self.event(Event::Restart {
                    container: def.name.clone(),
                    previous_id: latest.id.clone(),
                    exit_code: latest.exit_code,
                    attempt,
                });
            } else {
                let start_answer = self.data().start_answers.get(&latest.id).cloned();
                self.event(Event::Duplicate(Duplicate {
                    at: Instant::now(),
                    container: def.name.clone(),
                    old_id: latest.id.clone(),
                    old_state: state,
                    old_attempt: restart_count(latest),
                    new_attempt: attempt,
                    start_answer,
                }));
                if state == ContainerState::ContainerUnknown {
                    // kubelet kills an UNKNOWN container before starting a new
                    // one, in case it still runs (computePodActions).
                    self.kill_container(&def.name, &latest.id, self.def.grace_secs(), Origin::Sync)
                        .await;
                }
            }
            self.start_container(def, attempt, Origin::Sync).await;
        }
        Some(wake_at)
    }

    /// calcRestartCountByLogDir (kubelet source: kuberuntime_container.go):
    /// one more than the highest `<n>.log` in the container's log directory,
    /// 0 if none.
    fn attempt_from_logs(&self, name: &str) -> u32 {
        let dir = Path::new(&self.sandbox_config.log_directory).join(name);
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.split('.').next()?.parse::<u32>().ok()
            })
            .max()
            .map_or(0, |n| n + 1)
    }
}

/// kubelet's getPhase for the regular containers, from their API statuses
/// as convertToAPIContainerStatuses derives them from the runtime's: the
/// latest attempt RUNNING → running; EXITED → terminated (succeeded if exit
/// 0); CREATED → waiting, or stopped if an earlier attempt terminated
/// (LastTerminationState); UNKNOWN → terminated (exit 137) if it was seen
/// running, else like CREATED; no container yet → waiting. (kubelet source:
/// kubelet_pods.go getPhase, convertToAPIContainerStatuses and
/// convertContainerStatus.)
fn get_phase(
    def: &PodDef,
    snap: &Snapshot,
    seen_running: &HashSet<String>,
    pod_is_terminal: bool,
) -> Phase {
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &def.containers {
        let mut attempts = snap.of(&c.name);
        let Some(latest) = attempts.next() else {
            waiting += 1;
            continue;
        };
        let previous_terminated = attempts.next().is_some_and(|p| {
            state_of(p) == ContainerState::ContainerExited
                || (state_of(p) == ContainerState::ContainerUnknown && seen_running.contains(&p.id))
        });
        match state_of(latest) {
            ContainerState::ContainerRunning => running += 1,
            ContainerState::ContainerExited => {
                stopped += 1;
                if latest.exit_code == 0 {
                    succeeded += 1;
                }
            }
            ContainerState::ContainerUnknown if seen_running.contains(&latest.id) => stopped += 1,
            ContainerState::ContainerCreated | ContainerState::ContainerUnknown => {
                if previous_terminated {
                    stopped += 1;
                } else {
                    waiting += 1;
                }
            }
        }
    }
    if waiting > 0 {
        return Phase::Pending;
    }
    if running > 0 {
        return Phase::Running;
    }
    if stopped > 0 {
        if pod_is_terminal {
            return if stopped == succeeded {
                Phase::Succeeded
            } else {
                Phase::Failed
            };
        }
        return match def.restart_policy {
            RestartPolicy::Always => Phase::Running,
            _ if stopped == succeeded => Phase::Succeeded,
            RestartPolicy::Never => Phase::Failed,
            RestartPolicy::OnFailure => Phase::Running,
        };
    }
    Phase::Pending
}

/// The pod worker: the first sync (containers in spec order, one at a time),
/// then a sync whenever the PLEG saw a change, a backoff expires, a manual
/// stop happened, or the resync period passed. (kubelet source:
/// pod_workers.go completeWork requeues a pod in backoff at the earliest
/// backoff expiry in recent kubelets; older ones retried after 10 s. Each
/// sync here reads the status itself, where kubelet's PLEG reads it into a
/// cache for the worker: the same calls.)
async fn worker_loop(st: Arc<PodState>, first: tokio::sync::OwnedMutexGuard<()>) {
    for def in &st.def.containers {
        // A failed start does not stop the loop.
        st.start_container(def, 0, Origin::Start).await;
    }
    st.data().initial_sync_done = true;
    drop(first);

    let cfg = &st.kubelet.config;
    let mut next_resync = Instant::now() + cfg.resync_period;
    let mut backoff_wake: Option<Instant> = None;
    loop {
        let wake_at = backoff_wake.map_or(next_resync, |b| b.min(next_resync));
        tokio::select! {
            _ = st.wake.notified() => {}
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => {}
        }
        // kubelet's SyncPod calls are not cancelled by a deletion: the kill
        // waits for the sync in progress, as it waits for this lock. Observed
        // on kubelet v1.28.7 (e2e_cluster's
        // deletion_during_a_held_start_ends_within_the_grace_period: before
        // the shim bounded its holds, a deletion waited for a held
        // StartContainer until the ready-timeout); 1.28's SyncPod does not
        // run under the pod worker's cancellable context.
        let _guard = st.worker.lock().await;
        if st.terminating.load(Ordering::SeqCst) || st.finished.load(Ordering::SeqCst) {
            return;
        }
        match st.sync().await {
            None => return,
            Some(wake) => backoff_wake = wake,
        }
        next_resync = Instant::now() + cfg.resync_period;
    }
}

/// Whether a call failed because the server refused its stream unprocessed
/// (h2: a stream above a GOAWAY's last-stream-id, or REFUSED_STREAM), which
/// grpc-go retries transparently.
fn refused_unprocessed(status: &tonic::Status) -> bool {
    super::h2_error(status)
        .is_some_and(|e| e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// kubelet's PLEG state of a container: CREATED counts as unknown (kubelet
/// source: pleg/generic.go convertState), so CREATED → UNKNOWN is no event.
fn pleg_state(state: i32) -> i32 {
    if state == ContainerState::ContainerCreated as i32 {
        ContainerState::ContainerUnknown as i32
    } else {
        state
    }
}

/// The PLEG: relist every period (ListPodSandbox and ListContainers, no
/// filter) and wake the pod worker when this pod's containers or sandbox
/// changed state.
async fn pleg_loop(st: Arc<PodState>) {
    let cfg = &st.kubelet.config;
    let deadline = Some(cfg.runtime_request_timeout);
    let mut interval = tokio::time::interval(cfg.relist_period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<Vec<(String, i32)>> = None;
    loop {
        interval.tick().await;
        if st.finished.load(Ordering::SeqCst) || st.data().removed {
            return;
        }
        let mut rt = st.kubelet.rt.clone();
        let (_, sandboxes) = st
            .cri(
                Rec::new("ListPodSandbox", Origin::Pleg),
                rt.list_pod_sandbox(request(ListPodSandboxRequest { filter: None }, deadline)),
            )
            .await;
        let (_, containers) = st
            .cri(
                Rec::new("ListContainers", Origin::Pleg),
                rt.list_containers(request(ListContainersRequest { filter: None }, deadline)),
            )
            .await;
        let (Ok(sandboxes), Ok(containers)) = (sandboxes, containers) else {
            continue;
        };
        let ours = |labels: &HashMap<String, String>| labels.get(LABEL_POD_UID) == Some(&st.uid);
        let mut seen: Vec<(String, i32)> = sandboxes
            .items
            .iter()
            .filter(|s| ours(&s.labels))
            .map(|s| (s.id.clone(), s.state))
            .chain(
                containers
                    .containers
                    .iter()
                    .filter(|c| ours(&c.labels))
                    .map(|c| (c.id.clone(), pleg_state(c.state))),
            )
            .collect();
        seen.sort();
        if previous.as_ref() != Some(&seen) {
            previous = Some(seen);
            st.wake.notify_one();
        }
    }
}

// ---------------------------------------------------------------------------
// The pod handle

/// A pod the simulator runs. Dropping it stops its worker and PLEG and, if
/// it was not deleted, stops and removes its sandbox.
pub struct PodHandle {
    state: Arc<PodState>,
    tasks: Vec<AbortHandle>,
}

impl PodHandle {
    pub fn def(&self) -> &PodDef {
        &self.state.def
    }

    pub fn name(&self) -> &str {
        &self.state.def.name
    }

    pub fn uid(&self) -> &str {
        &self.state.uid
    }

    pub fn sandbox_id(&self) -> &str {
        self.state.sandbox_id()
    }

    /// The PodSandboxConfig sent with RunPodSandbox and every CreateContainer.
    pub fn sandbox_config(&self) -> &PodSandboxConfig {
        &self.state.sandbox_config
    }

    /// The IP PodSandboxStatus answered after RunPodSandbox.
    pub fn ip(&self) -> String {
        self.state.data().pod_ip.clone()
    }

    /// The phase as of the pod worker's last status read.
    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// Ids of every attempt of container `name` the simulator created, oldest
    /// first.
    pub fn container_ids(&self, name: &str) -> Vec<String> {
        self.state.container_ids(name)
    }

    /// ContainerStatus of the newest attempt of `name`, asked now through the
    /// endpoint (not recorded as a kubelet call); once it is gone (pod
    /// removed), the status of the pod worker's last read.
    pub async fn latest(&self, name: &str) -> Option<ContainerStatus> {
        let id = self.container_ids(name).pop()?;
        let mut rt = self.state.kubelet.rt.clone();
        let fresh = rt
            .container_status(request(
                ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                },
                Some(self.state.kubelet.config.runtime_request_timeout),
            ))
            .await;
        match fresh {
            Ok(r) if r.get_ref().status.is_some() => r.into_inner().status,
            _ => self.synced(name),
        }
    }

    /// The newest attempt of `name` as the pod worker last read it (what its
    /// phase is computed from).
    pub fn synced(&self, name: &str) -> Option<ContainerStatus> {
        self.state
            .data()
            .statuses
            .iter()
            .find(|c| status_name(c) == name)
            .cloned()
    }

    /// Every CRI call made for this pod so far, in the order they were sent.
    pub fn calls(&self) -> Vec<CriCall> {
        self.state.data().calls.clone()
    }

    /// The calls of `method`, about container `container` if given.
    pub fn calls_of(&self, method: &str, container: Option<&str>) -> Vec<CriCall> {
        self.state
            .data()
            .calls
            .iter()
            .filter(|c| c.is(method, container))
            .cloned()
            .collect()
    }

    /// Wait until kubelet has the answer to every call of `method` about
    /// `container` (if given) made so far. What a call did shows in
    /// containerd some milliseconds before its answer is back: a test that
    /// judges a call it saw the effect of waits for it first.
    pub async fn wait_answered(
        &self,
        method: &str,
        container: Option<&str>,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(timeout, &format!("the answers to {method}"), || async {
            self.calls_of(method, container)
                .iter()
                .all(|c| !c.in_flight())
        })
        .await
    }

    /// The first call of `method` about `container` (if given).
    pub fn first_call(&self, method: &str, container: Option<&str>) -> Option<CriCall> {
        self.state
            .data()
            .calls
            .iter()
            .find(|c| c.is(method, container))
            .cloned()
    }

    pub fn events(&self) -> Vec<PodEvent> {
        self.state.data().events.clone()
    }

    /// Attempts created because the latest was CREATED or UNKNOWN.
    pub fn duplicates(&self) -> Vec<Duplicate> {
        self.state
            .data()
            .events
            .iter()
            .filter_map(|e| match &e.event {
                Event::Duplicate(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// Has the pod worker's first sync (all containers started, or failed to)
    /// finished?
    pub fn started(&self) -> bool {
        self.state.data().initial_sync_done
    }

    /// Wait for the first sync to finish.
    pub async fn wait_started(&self, timeout: Duration) -> Result<()> {
        let st = self.state.clone();
        wait_for(timeout, "the pod worker's first sync", || {
            let st = st.clone();
            async move { st.data().initial_sync_done }
        })
        .await
        .with_context(|| self.summary())
    }

    /// Wait until the phase is `phase`.
    pub async fn wait_phase(&self, phase: Phase, timeout: Duration) -> Result<()> {
        let st = self.state.clone();
        wait_for(timeout, &format!("phase {phase:?}"), || {
            let st = st.clone();
            async move { st.phase() == phase }
        })
        .await
        .with_context(|| format!("phase is {:?}\n{}", self.phase(), self.summary()))
    }

    /// Wait until the newest attempt of `name` is in `state` (asked through
    /// the endpoint); returns its status.
    pub async fn wait_state(
        &self,
        name: &str,
        state: ContainerState,
        timeout: Duration,
    ) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.latest(name).await {
                if s.state == state as i32 {
                    return Ok(s);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {name} to be {state:?} (now {:?})\n{}",
                    self.latest(name).await.map(|s| state_of(&s)),
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kubelet's handling of a pod deletion with grace period `grace` (None:
    /// the pod's terminationGracePeriodSeconds): [`PodHandle::terminate`],
    /// then RemovePodSandbox, which garbage collection would do about a
    /// minute later. Returns how each running container was stopped, in spec
    /// order. On a pod already killed (for its terminal phase, or by
    /// `terminate`) only RemovePodSandbox is left to do.
    pub async fn delete(&self, grace: Option<Duration>) -> Result<Vec<StopTiming>> {
        let timings = self.terminate(grace).await?;
        let st = &self.state;
        let _guard = st.worker.lock().await;
        let id = st.sandbox_id().to_string();
        let mut rt = st.kubelet.rt.clone();
        let (_, res) = st
            .cri(
                Rec::new("RemovePodSandbox", Origin::Kill).id(&id),
                rt.remove_pod_sandbox(request(
                    RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    },
                    Some(st.kubelet.config.runtime_request_timeout),
                )),
            )
            .await;
        st.data().removed = true;
        res.map_err(|s| anyhow!("RemovePodSandbox {id}: {s}"))?;
        Ok(timings)
    }

    /// A pod deletion up to garbage collection: waits for the pod worker's
    /// sync in progress, then killPod (preStop and StopContainer for every
    /// RUNNING container in parallel, then StopPodSandbox) and the final
    /// status (phase with podIsTerminal). The stopped containers stay in the
    /// runtime, to be read, until [`PodHandle::delete`] (or dropping the
    /// handle) removes the sandbox. Returns how each running container was
    /// stopped, in spec order; nothing on a pod already killed.
    pub async fn terminate(&self, grace: Option<Duration>) -> Result<Vec<StopTiming>> {
        let st = &self.state;
        st.terminating.store(true, Ordering::SeqCst);
        st.wake.notify_one();
        let _guard = st.worker.lock().await;
        if st.data().removed {
            bail!("pod {} already deleted", st.def.name);
        }
        let grace = grace.map_or(st.def.grace_secs(), |g| {
            i64::try_from(g.as_secs()).unwrap_or(i64::MAX)
        });
        if st.finished.swap(true, Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let snap = st.get_pod_status(Origin::Kill).await?;
        st.take_status(&snap, false);
        let timings = st
            .kill_pod_until_done(KillReason::Deleted, grace, snap)
            .await;
        // SyncTerminatingPod reads the status again and generates the
        // final one with podIsTerminal = true (kubelet source:
        // kubelet.go SyncTerminatingPod).
        if let Ok(after) = st.get_pod_status(Origin::Kill).await {
            st.take_status(&after, true);
        }
        Ok(timings)
    }

    /// Phase, events and calls, for failure messages.
    pub fn summary(&self) -> String {
        let d = self.state.data();
        let t0 = d
            .calls
            .first()
            .map(|c| c.start)
            .unwrap_or_else(Instant::now);
        let at = |i: Instant| signed_secs(i, t0);
        let mut s = format!(
            "pod {} (sandbox {}) phase {:?}\nevents:\n",
            self.state.def.name,
            self.state.sandbox_id(),
            d.phase.unwrap_or(Phase::Pending)
        );
        for e in &d.events {
            let _ = writeln!(s, "  {:>8.3}s {:?}", at(e.at), e.event);
        }
        s.push_str("containers at the last status read (newest first):\n");
        for c in &d.statuses {
            let _ = writeln!(
                s,
                "  {} attempt {} {:?} exit {} {} {} ({})",
                status_name(c),
                restart_count(c),
                state_of(c),
                c.exit_code,
                c.reason,
                c.message,
                c.id
            );
        }
        s.push_str("calls (PLEG relists left out):\n");
        for c in d.calls.iter().filter(|c| c.origin != Origin::Pleg) {
            let _ = writeln!(
                s,
                "  {:>8.3}s {:?} {} {} {}{}",
                at(c.start),
                c.origin,
                c.method,
                c.container.as_deref().unwrap_or("-"),
                c.duration()
                    .map_or("in flight".to_string(), |d| format!("{d:?}")),
                c.error.as_ref().map_or(String::new(), |e| format!(
                    " ERROR {:?}: {}",
                    e.code, e.message
                ))
            );
        }
        s
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let (removed, background) = {
            let mut d = self.state.data();
            (d.removed, std::mem::take(&mut d.background))
        };
        for t in background {
            t.abort();
        }
        if removed || self.state.sandbox_id.get().is_none() {
            return;
        }
        // The CRI calls need a runtime of their own (we may be inside one
        // and may not block it) and a fresh connection.
        let endpoint = self.state.kubelet.endpoint.clone();
        let id = self.state.sandbox_id().to_string();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (mut client, _) = cri_client(&endpoint);
                tokio::time::timeout(CLEANUP_TIMEOUT, async {
                    client
                        .stop_pod_sandbox(StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        })
                        .await?;
                    client
                        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                        .await
                })
                .await
                .ok()
                .and_then(|r| r.ok())
            })
        })
        .join();
        if !matches!(cleanup, Ok(Some(_))) {
            eprintln!(
                "kubelet simulator: could not remove pod {} ({})",
                self.state.def.name,
                self.state.sandbox_id()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// JSON as kubelet writes it

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Go's encoding/json escapes these for HTML safety.
            '<' | '>' | '&' => {
                let _ = write!(out, "\\u{:04x}", ch as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_string_array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| json_string(s)).collect();
    format!("[{}]", items.join(","))
}

fn whole_secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The `io.kubernetes.container.preStopHandler` annotation: kubelet's JSON of
/// the LifecycleHandler, e.g. `{"exec":{"command":["sh","-c","..."]}}` or
/// `{"sleep":{"seconds":5}}`.
pub fn pre_stop_json(hook: &PreStop) -> String {
    match hook {
        PreStop::Exec(cmd) => format!("{{\"exec\":{{\"command\":{}}}}}", json_string_array(cmd)),
        PreStop::Sleep(d) => format!("{{\"sleep\":{{\"seconds\":{}}}}}", whole_secs_up(*d)),
    }
}

/// kubelet's `kubernetes.io/config.seen`: the time it first saw a pod,
/// RFC 3339 in UTC with nanoseconds.
fn first_seen() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_nanos()
    )
}
