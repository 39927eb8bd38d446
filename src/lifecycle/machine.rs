//! The lifecycle state machine: pure, no I/O, no clock of its own.
//!
//! The gRPC layer turns what it sees (calls from kubelet, answers and
//! container exits from the runtime, readiness results, the passing of time)
//! into [`Event`]s; the machine answers with [`Action`]s for the gRPC layer to
//! carry out, and keeps what kubelet must be told about containers whose
//! runtime state the shim hides ([`Machine::status_override`]).
//!
//! The rules (KEP-753 as first written, over kubelet's CRI behaviour as
//! described in shared/kubelet-cri.md):
//! * A container starts only when the sidecars before it are running and
//!   ready: every sidecar for a normal container, the earlier sidecars (in
//!   annotation order) for a sidecar. Its StartContainer is held while those
//!   sidecars are on their way (kubelet created and started them), or answered
//!   at once and deferred while one of them does not exist yet (it comes later
//!   in spec order: holding would deadlock kubelet's one-at-a-time starts).
//!   Both are bounded by the pod's ready-timeout; then `on-ready-timeout`
//!   decides: `start` starts anyway, `fail` answers with an error naming the
//!   sidecar and the container reads as exited (128, SidecarNotReady).
//!   A hold also ends, answered and deferred instead until the sidecars are
//!   ready, just before kubelet's own deadline for the call, and after half
//!   the pod's grace period counted from the first held start of the pod's
//!   containers waiting at the time (later ones in that wait are deferred
//!   at once): kubelet does not cancel a StartContainer when the pod is
//!   deleted, and the deletion waits for it.
//! * Job pods: once every normal container is terminal, the shim stops the
//!   sidecars in reverse order, and reports them exited 0 (Completed).
//! * Shutdown: a sidecar's StopContainer (and its exec preStop hook) waits
//!   until every normal container and every later sidecar has exited, bounded
//!   by its grace period; then it is stopped with the grace it has left, at
//!   least `min_stop_grace`. A sidecar stop with no sign that the pod is going
//!   away (a normal container's stop or exec preStop, StopPodSandbox, Job
//!   completion) waits only `evidence_window` (longer when a normal container
//!   has a sleep or HTTP preStop hook, which kubelet runs without the CRI) and
//!   then goes ahead as a single-container restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::spec::{OnReadyTimeout, PodSpec, PreStop, Restart, RestartPolicy};

mod record;
pub use record::{
    PodRecord, Reconciled, RuntimeContainer, RuntimePod, RuntimeState, WallClock, RECORD_VERSION,
};

pub type PodId = String;
pub type ContainerId = String;

/// A call the gRPC layer holds for the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// Tunables (from the config file).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The least grace a sidecar gets when the shim finally stops it.
    pub min_stop_grace: Duration,
    /// How long a sidecar stop waits for a sign of pod shutdown.
    pub evidence_window: Duration,
    /// Grace period when kubelet's container annotation is missing.
    pub default_grace: Duration,
    /// Report sidecars the shim stopped as exited 0, reason Completed.
    pub rewrite_exit_code: bool,
    /// Learn exits from the runtime's event stream where it has one (the
    /// gRPC layer's business; kept with the other tunables).
    pub exit_events: bool,
    /// A failed normal container of a Job pod without a restart-policy
    /// annotation is terminal once kubelet made no new attempt for this long.
    pub failed_exit_window: Duration,
    /// Job completion waits this long after kubelet's last create or start in
    /// the pod, so that containers still being set up are not missed.
    pub settle: Duration,
    /// Held calls are answered this long before the client's deadline.
    pub answer_margin: Duration,
    /// When a held sidecar stop's grace runs out, the normal containers
    /// still running are being SIGKILLed by the runtime at that very moment
    /// (their stops arrived together): wait this much longer for their exits
    /// to show, so that the sidecar's signal comes after them.
    pub grace_slack: Duration,
    /// The CRI does not tell init containers apart. A normal container whose
    /// start is deferred (its sidecars do not exist yet) and after which
    /// kubelet does nothing more in the pod for this long (no ImageStatus or
    /// PullImage for it, no CreateContainer: [`Event::PodWork`]) is an init
    /// container: kubelet waits for it to finish before it goes on to the
    /// pod's regular containers (sidecars among them). It is started at once
    /// and left alone. After a regular container kubelet goes on at once
    /// (its ImageStatus for the next container follows within milliseconds,
    /// also when the PullImage after it must wait its turn behind other
    /// pods' pulls), so the window only has to outlast a busy kubelet's
    /// pause between two calls, never an image pull: measured on kubelet
    /// v1.28.7 with 30 such pods at once, 5 ms at the median and at most
    /// 52 ms, at most 138 ms with the node's CPUs saturated.
    pub init_window: Duration,
    /// Caps: beyond them the shim forwards without holding (and warns), so
    /// that a node in trouble degrades to a plain proxy rather than to
    /// unbounded memory. Pods with a sidecar spec the machine keeps state for.
    pub max_pods: usize,
    /// Calls held at once.
    pub max_held: usize,
    /// Starts deferred at once.
    pub max_deferred: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            min_stop_grace: Duration::from_secs(2),
            evidence_window: Duration::from_secs(2),
            default_grace: Duration::from_secs(30),
            rewrite_exit_code: true,
            exit_events: true,
            failed_exit_window: Duration::from_secs(30),
            settle: Duration::from_secs(1),
            answer_margin: Duration::from_secs(2),
            grace_slack: Duration::from_secs(1),
            init_window: Duration::from_secs(1),
            max_pods: 1024,
            max_held: 4096,
            max_deferred: 1024,
        }
    }
}

/// What happened.
#[derive(Clone, Debug)]
pub enum Event {
    /// kubelet created a container in a pod with a sidecar spec.
    Created {
        pod: PodId,
        /// namespace/name, for logs.
        pod_name: String,
        spec: Arc<PodSpec>,
        container: ContainerId,
        name: String,
        attempt: u32,
        pre_stop: Option<PreStop>,
        grace: Option<Duration>,
    },
    /// kubelet's StartContainer.
    StartCalled {
        call: CallId,
        container: ContainerId,
        deadline: Option<Instant>,
    },
    /// A start (kubelet's forwarded, or the shim's own) finished.
    StartDone {
        container: ContainerId,
        ok: bool,
    },
    /// kubelet's forwarded start ended without the runtime's answer (the
    /// connection broke under it): the runtime may or may not have started
    /// the container. Until it is read ([`Action::Read`]), it counts as
    /// starting: neither exited nor running.
    StartLost {
        container: ContainerId,
    },
    /// The runtime's state of a container, read for [`Action::Read`].
    Observed {
        container: ContainerId,
        state: RuntimeState,
    },
    /// A sidecar passed its readiness check.
    Ready {
        container: ContainerId,
    },
    /// The runtime reports the container exited.
    Exited {
        container: ContainerId,
        code: i32,
    },
    /// kubelet's StopContainer with its timeout.
    StopCalled {
        call: CallId,
        container: ContainerId,
        timeout: Duration,
        deadline: Option<Instant>,
    },
    /// kubelet runs the container's exec preStop hook (an ExecSync whose
    /// command is the recorded handler).
    PreStopCalled {
        call: CallId,
        container: ContainerId,
    },
    /// kubelet's StopPodSandbox.
    StopPodCalled {
        call: CallId,
        pod: PodId,
        deadline: Option<Instant>,
    },
    /// kubelet began work on another container of the pod: an ImageStatus
    /// for it (the request carries the pod's annotations), a PullImage (its
    /// sandbox config) or a CreateContainer request (before the runtime
    /// answers it). kubelet
    /// goes on to the next container after starting a regular one, never
    /// after an init container, which it waits for: the pod's deferred
    /// containers are not init containers, however long the pull takes.
    PodWork {
        pod: PodId,
    },
    /// kubelet gave up on a held call.
    Cancelled {
        call: CallId,
    },
    ContainerRemoved {
        container: ContainerId,
    },
    PodRemoved {
        pod: PodId,
    },
    /// Time passed (deadlines).
    Tick,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the held call on to the runtime as it is and answer with the
    /// runtime's answer.
    Forward(CallId),
    /// Send a held StopContainer on with this timeout.
    ForwardStop { call: CallId, timeout: Duration },
    /// Answer a held call without the runtime: success, or an error.
    Answer {
        call: CallId,
        result: Result<(), Refusal>,
    },
    /// Start a container whose start was deferred.
    Start(ContainerId),
    /// Stop a container (Job completion, ordered teardown).
    Stop {
        container: ContainerId,
        timeout: Duration,
    },
    /// Read the container's state from the runtime, once it answers, and
    /// report it as [`Event::Observed`].
    Read(ContainerId),
    /// A decision worth an info log line.
    Log(Note),
    /// Something the operator must hear of (a cap reached).
    Warn(Note),
}

/// Why a held call is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
}

/// A decision, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub pod: String,
    pub container: String,
    pub what: &'static str,
    pub detail: String,
}

/// What kubelet must read instead of the runtime's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusOverride {
    /// Deferred: reads as running since the deferral.
    Running { since: Instant },
    /// Never started: reads as exited, since `at` (fixed: kubelet measures
    /// its crash-loop backoff from finished_at, so it must not move).
    Exited {
        code: i32,
        reason: String,
        message: String,
        at: Instant,
    },
    /// Stopped by the shim: once the runtime reports it exited, it reads as
    /// exited with this code and reason.
    IfExited {
        code: i32,
        reason: String,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Sidecar(usize),
    Normal,
    /// Deferred while no container came after it: kubelet was waiting for it
    /// to finish, so it is an init container (see [`Settings::init_window`]).
    Init,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Created,
    /// Answered as started; starts when the sidecars are ready.
    Deferred {
        since: Instant,
        deadline: Instant,
        /// The pod's creation count when the start was deferred.
        creations: u64,
    },
    Starting,
    Running,
    Exited {
        code: i32,
        at: Instant,
    },
    /// Never started: stopped while deferred, or its sidecars never became
    /// ready and the policy is `fail`.
    NeverStarted {
        code: i32,
        reason: &'static str,
        message: String,
        at: Instant,
    },
}

/// A stop kubelet sent while the shim's own start of `c` was on its way is
/// sent now that the start landed.
fn stop_after_start(c: &mut Container, id: &ContainerId, out: &mut Vec<Action>) {
    if let Some(timeout) = c.stop_after_start.take() {
        c.stop_sent = true;
        out.push(Action::Stop {
            container: id.clone(),
            timeout,
        });
    }
}

/// A start the shim answered kubelet for and still owes the runtime.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Deferral {
    since: Instant,
    deadline: Instant,
    creations: u64,
}

/// kubelet asked to stop this sidecar (StopContainer or its exec preStop
/// hook). Kept on the container, not on the call: a repeated stop joins the
/// first one's wait, and after a restart of the shim the stop is still owed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StopRequest {
    arrived: Instant,
    timeout: Duration,
}

#[derive(Debug)]
struct Container {
    pod: PodId,
    name: String,
    role: Role,
    pre_stop: Option<PreStop>,
    state: State,
    ready: bool,
    /// The shim stopped it (Job completion, teardown): exit code rewritten.
    stopped_by_shim: bool,
    /// A stop was sent (the shim's own, or kubelet's released): no other
    /// is needed.
    stop_sent: bool,
    /// Set while a deferred start is owed: from the deferral until the
    /// runtime answered the shim's own start.
    owed: Option<Deferral>,
    stop_request: Option<StopRequest>,
    /// kubelet stopped it while the shim's own start was on its way to the
    /// runtime (it reads as running): stop it once that start lands.
    stop_after_start: Option<Duration>,
}

impl Container {
    fn running(&self) -> bool {
        matches!(self.state, State::Starting | State::Running)
    }
    fn done(&self) -> bool {
        matches!(
            self.state,
            State::Exited { .. } | State::NeverStarted { .. }
        )
    }
}

#[derive(Debug)]
struct Pod {
    name: String,
    spec: Arc<PodSpec>,
    grace: Duration,
    /// Container ids in creation order.
    containers: Vec<ContainerId>,
    /// When the first sign of shutdown arrived.
    terminating: Option<Instant>,
    /// Job completion declared.
    job_done: bool,
    /// StopPodSandbox came while containers still ran: ordered teardown.
    teardown: Option<Instant>,
    /// kubelet's last create or start in this pod.
    last_activity: Instant,
    /// Held starts in this pod end by then, as deferrals if the sidecars
    /// are not ready (set by the first held start, cleared once nothing in
    /// the pod waits for its sidecars).
    hold_until: Option<Instant>,
    /// kubelet's steps in this pod: containers created, and the image and
    /// CreateContainer requests before them ([`Event::PodWork`]). A
    /// deferred start after which this count moves belongs to a regular
    /// container: kubelet went on to the next one.
    creations: u64,
}

#[derive(Debug)]
enum Held {
    /// Refused or started at `deadline` (the ready-timeout); answered and
    /// deferred at `defer_at` (half the pod's grace period into its holds,
    /// or just before kubelet's own deadline), if earlier.
    Start {
        container: ContainerId,
        since: Instant,
        deadline: Instant,
        defer_at: Instant,
    },
    /// A repeated StartContainer while the first one is on its way to the
    /// runtime: answered as the first one is (see [`Event::StartDone`]).
    Joined {
        container: ContainerId,
    },
    /// `arrived`: kubelet's first stop of the container (its grace counts
    /// from there, also for a repeated stop); `seen`: this call's arrival
    /// (the wait for signs of a shutdown counts from there).
    Stop {
        container: ContainerId,
        arrived: Instant,
        seen: Instant,
        timeout: Duration,
        answer_by: Option<Instant>,
    },
    PreStop {
        container: ContainerId,
        arrived: Instant,
        seen: Instant,
    },
    StopPod {
        pod: PodId,
        deadline: Instant,
    },
}

/// The machine.
#[derive(Debug, Default)]
pub struct Machine {
    settings: Settings,
    pods: HashMap<PodId, Pod>,
    containers: HashMap<ContainerId, Container>,
    held: HashMap<CallId, Held>,
    /// The time of the last event: deadlines up to it have been acted on.
    last_now: Option<Instant>,
    /// Pods whose durable state may have changed since the last
    /// [`Machine::take_touched`] (removed ones too).
    touched: HashSet<PodId>,
}

impl Machine {
    pub fn new(settings: Settings) -> Self {
        Machine {
            settings,
            ..Machine::default()
        }
    }

    /// Does the machine know this container (so its calls are its business)?
    pub fn knows(&self, container: &str) -> bool {
        self.containers.contains_key(container)
    }

    /// Does any pod have a sidecar spec?
    pub fn knows_any(&self) -> bool {
        !self.pods.is_empty()
    }

    pub fn knows_pod(&self, pod: &str) -> bool {
        self.pods.contains_key(pod)
    }

    /// Number of calls held right now.
    pub fn held_calls(&self) -> usize {
        self.held.len()
    }

    /// The pods with a sidecar spec.
    pub fn pod_ids(&self) -> Vec<PodId> {
        self.pods.keys().cloned().collect()
    }

    /// A pod's sidecar spec.
    pub fn pod_spec(&self, pod: &str) -> Option<Arc<PodSpec>> {
        self.pods.get(pod).map(|p| p.spec.clone())
    }

    /// Whether the shim still owes this container the start it answered.
    pub fn owes_start(&self, container: &str) -> bool {
        self.containers
            .get(container)
            .is_some_and(|c| c.owed.is_some() && c.state == State::Starting)
    }

    /// Whether the container runs (or is on its way), as far as the machine
    /// knows.
    pub fn is_running(&self, container: &str) -> bool {
        self.containers.get(container).is_some_and(|c| c.running())
    }

    /// The container's name (for logs and fault injection).
    pub fn container_name(&self, container: &str) -> Option<&str> {
        self.containers.get(container).map(|c| c.name.as_str())
    }

    /// A known pod's name, `namespace/name`.
    pub fn pod_name(&self, pod: &str) -> Option<&str> {
        self.pods.get(pod).map(|p| p.name.as_str())
    }

    /// The pods whose durable state may have changed since the last call,
    /// sorted: the gRPC layer writes their [`PodRecord`]s (or removes them,
    /// for pods the machine no longer knows).
    pub fn take_touched(&mut self) -> Vec<PodId> {
        let mut out: Vec<PodId> = self.touched.drain().collect();
        out.sort();
        out
    }

    /// What kubelet must read for this container instead of the runtime's
    /// state, if anything.
    pub fn status_override(&self, container: &str) -> Option<StatusOverride> {
        let c = self.containers.get(container)?;
        match &c.state {
            State::Deferred { since, .. } => Some(StatusOverride::Running { since: *since }),
            // The shim's own start is on its way: kubelet was told long ago.
            State::Starting if c.owed.is_some() => Some(StatusOverride::Running {
                since: c.owed.map(|d| d.since).expect("checked"),
            }),
            State::NeverStarted {
                code,
                reason,
                message,
                at,
            } => Some(StatusOverride::Exited {
                code: *code,
                reason: reason.to_string(),
                message: message.clone(),
                at: *at,
            }),
            // From the moment the shim sends its stop: kubelet may read the
            // exit before the shim has noticed it.
            _ if c.stopped_by_shim && self.settings.rewrite_exit_code => {
                Some(StatusOverride::IfExited {
                    code: 0,
                    reason: "Completed".into(),
                    message: "stopped by sidecar-shim after the pod's normal containers finished"
                        .into(),
                })
            }
            _ => None,
        }
    }

    /// Whether any container's status is being rewritten (status calls need
    /// a look only then).
    pub fn rewrites_active(&self) -> bool {
        self.containers
            .keys()
            .any(|id| self.status_override(id).is_some())
    }

    /// Why an exec in this container must fail at once, if it must.
    pub fn exec_refusal(&self, container: &str) -> Option<String> {
        let c = self.containers.get(container)?;
        let not_started = match c.state {
            State::Deferred { .. } | State::NeverStarted { .. } => true,
            State::Starting => c.owed.is_some(),
            _ => false,
        };
        not_started.then(|| {
            format!(
                "sidecar-shim: container {} has not started: it waits for its sidecars to be ready",
                c.name
            )
        })
    }

    /// The exec preStop hook recorded for this container, if it has one.
    pub fn exec_pre_stop(&self, container: &str) -> Option<&[String]> {
        match &self.containers.get(container)?.pre_stop {
            Some(PreStop::Exec(cmd)) => Some(cmd),
            _ => None,
        }
    }

    /// Sidecars whose readiness must be checked now, with their pod.
    pub fn probes(&self) -> Vec<(ContainerId, PodId)> {
        let mut out: Vec<_> = self
            .containers
            .iter()
            .filter(|(_, c)| Self::probed(c))
            .map(|(id, c)| (id.clone(), c.pod.clone()))
            .collect();
        out.sort();
        out
    }

    /// Whether this sidecar's readiness must still be checked.
    pub fn needs_probe(&self, container: &str) -> bool {
        self.containers.get(container).is_some_and(Self::probed)
    }

    fn probed(c: &Container) -> bool {
        matches!(c.role, Role::Sidecar(_)) && c.state == State::Running && !c.ready
    }

    /// The readiness check of a sidecar container.
    pub fn ready_check(&self, container: &str) -> Option<super::spec::ReadyCheck> {
        let c = self.containers.get(container)?;
        let pod = self.pods.get(&c.pod)?;
        pod.spec.ready.get(&c.name).cloned()
    }

    /// Containers whose exit the machine must hear of promptly.
    pub fn watched(&self) -> Vec<ContainerId> {
        let mut out: Vec<_> = self
            .containers
            .iter()
            .filter(|(_, c)| self.watches(c))
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }

    /// Whether the exit of this container must be heard of promptly.
    pub fn is_watched(&self, container: &str) -> bool {
        self.containers
            .get(container)
            .is_some_and(|c| self.watches(c))
    }

    fn watches(&self, c: &Container) -> bool {
        if !c.running() {
            return false;
        }
        let Some(pod) = self.pods.get(&c.pod) else {
            return false;
        };
        let busy = pod.terminating.is_some()
            || pod.job_done
            || self.held.values().any(|h| self.held_pod(h) == Some(&c.pod))
            || self
                .pods_containers(pod)
                .any(|o| matches!(o.state, State::Deferred { .. }));
        // A sidecar being checked: if it dies, its check must stop.
        let probed = matches!(c.role, Role::Sidecar(_)) && !c.ready;
        busy || probed || (c.role == Role::Normal && job_like(&pod.spec.restart))
    }

    /// The earliest time at which a [`Event::Tick`] may change something.
    /// Deadlines that had passed at the last event were acted on then and
    /// are not reported again.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let seen = self.last_now;
        let mut at = |t: Instant| {
            if seen.is_none_or(|s| t > s) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for h in self.held.values() {
            match h {
                Held::Start {
                    deadline, defer_at, ..
                } => at((*deadline).min(*defer_at)),
                Held::StopPod { deadline, .. } => at(*deadline),
                Held::Joined { .. } => {}
                Held::Stop {
                    container,
                    arrived,
                    seen,
                    timeout,
                    answer_by,
                } => {
                    at(*arrived + *timeout + self.settings.grace_slack);
                    if let Some(a) = answer_by {
                        at(*a);
                    }
                    if let Some(pod) = self
                        .containers
                        .get(container)
                        .and_then(|c| self.pods.get(&c.pod))
                    {
                        if pod.terminating.is_none() && !pod.job_done {
                            at(*seen + self.evidence_window(pod));
                        }
                    }
                }
                Held::PreStop {
                    container,
                    arrived,
                    seen,
                } => {
                    if let Some(pod) = self
                        .containers
                        .get(container)
                        .and_then(|c| self.pods.get(&c.pod))
                    {
                        at(*arrived + pod.grace + self.settings.grace_slack);
                        if pod.terminating.is_none() && !pod.job_done {
                            at(*seen + self.evidence_window(pod));
                        }
                    }
                }
            }
        }
        for (id, c) in &self.containers {
            if let Some(r) = self.orphan_stop(id, c) {
                at(r.arrived + r.timeout + self.settings.grace_slack);
            }
            if let State::Deferred {
                deadline,
                since,
                creations,
            } = c.state
            {
                at(deadline);
                let nothing_after = self
                    .pods
                    .get(&c.pod)
                    .is_some_and(|p| p.creations == creations);
                if c.role == Role::Normal && nothing_after {
                    at(since + self.settings.init_window);
                }
            }
        }
        for (id, pod) in &self.pods {
            if job_like(&pod.spec.restart) && !pod.job_done && pod.teardown.is_none() {
                at(pod.last_activity + self.settings.settle);
                for c in self.pod_containers(id) {
                    if let State::Exited { code, at: t } = c.state {
                        if code != 0 && pod.spec.restart == Restart::JobDefault {
                            at(t + self.settings.failed_exit_window);
                        }
                    }
                }
            }
        }
        next
    }

    fn held_pod<'a>(&'a self, h: &'a Held) -> Option<&'a PodId> {
        match h {
            Held::Start { container, .. }
            | Held::Joined { container }
            | Held::Stop { container, .. }
            | Held::PreStop { container, .. } => self.containers.get(container).map(|c| &c.pod),
            Held::StopPod { pod, .. } => Some(pod),
        }
    }

    /// Feed one event; returns what to do.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
        let mut out = Vec::new();
        let pod = self.apply(now, event, &mut out);
        match pod {
            Some(pod) => {
                self.evaluate(now, &pod, &mut out);
                self.touched.insert(pod);
            }
            None => {
                let pods: Vec<PodId> = self.pods.keys().cloned().collect();
                for pod in pods {
                    self.evaluate(now, &pod, &mut out);
                    self.touched.insert(pod);
                }
            }
        }
        out
    }

    /// Record the event; returns the pod to re-evaluate (None: all).
    fn apply(&mut self, now: Instant, event: Event, out: &mut Vec<Action>) -> Option<PodId> {
        match event {
            Event::Created {
                pod,
                pod_name,
                spec,
                container,
                name,
                attempt: _,
                pre_stop,
                grace,
            } => {
                let role = match spec.sidecar_index(&name) {
                    Some(i) => Role::Sidecar(i),
                    None => Role::Normal,
                };
                if !self.pods.contains_key(&pod) && self.pods.len() >= self.settings.max_pods {
                    out.push(Action::Warn(Note {
                        pod: pod_name,
                        container: name,
                        what: "cap reached: pod not managed",
                        detail: format!(
                            "{} pods with sidecars are managed already (max_pods); its calls are forwarded untouched",
                            self.pods.len()
                        ),
                    }));
                    return None;
                }
                let p = self.pods.entry(pod.clone()).or_insert_with(|| Pod {
                    name: pod_name,
                    spec: spec.clone(),
                    grace: grace.unwrap_or(self.settings.default_grace),
                    containers: Vec::new(),
                    terminating: None,
                    job_done: false,
                    teardown: None,
                    last_activity: now,
                    hold_until: None,
                    creations: 0,
                });
                p.spec = spec;
                if let Some(g) = grace {
                    p.grace = g;
                }
                // kubelet creates nothing in a pod it is deleting: the stop
                // that looked like the start of a shutdown was a single
                // container's (a failed liveness probe or postStart hook).
                p.terminating = None;
                p.last_activity = now;
                p.creations += 1;
                if !p.containers.contains(&container) {
                    p.containers.push(container.clone());
                }
                self.containers.insert(
                    container.clone(),
                    Container {
                        pod: pod.clone(),
                        name,
                        role,
                        pre_stop,
                        state: State::Created,
                        ready: false,
                        stopped_by_shim: false,
                        stop_sent: false,
                        owed: None,
                        stop_request: None,
                        stop_after_start: None,
                    },
                );
                self.supersede(now, &pod, &container, out);
                Some(pod)
            }
            Event::StartCalled {
                call,
                container,
                deadline,
            } => {
                let Some(c) = self.containers.get(&container) else {
                    out.push(Action::Forward(call));
                    return None;
                };
                let pod_id = c.pod.clone();
                let pod = self
                    .pods
                    .get_mut(&pod_id)
                    .expect("containers belong to pods");
                pod.last_activity = now;
                // A repeated start (kubelet retries after a timeout or its
                // own restart) ends where the first one does.
                match &c.state {
                    State::Deferred { .. } => {
                        out.push(Action::Answer {
                            call,
                            result: Ok(()),
                        });
                        return Some(pod_id);
                    }
                    State::NeverStarted { message, .. } => {
                        out.push(Action::Answer {
                            call,
                            result: Err(Refusal {
                                message: message.clone(),
                            }),
                        });
                        return Some(pod_id);
                    }
                    State::Starting => {
                        self.held.insert(
                            call,
                            Held::Joined {
                                container: container.clone(),
                            },
                        );
                        return Some(pod_id);
                    }
                    State::Created => {}
                    // Running or exited: the runtime answers as it would.
                    State::Running | State::Exited { .. } => {
                        out.push(Action::Forward(call));
                        return Some(pod_id);
                    }
                }
                if let Some(other) = self.held_start_of(&container) {
                    // The same start is held already: wait with it.
                    if let Some(Held::Start {
                        since,
                        deadline,
                        defer_at,
                        ..
                    }) = self.held.get(&other)
                    {
                        let joined = Held::Start {
                            container: container.clone(),
                            since: *since,
                            deadline: *deadline,
                            defer_at: *defer_at,
                        };
                        self.held.insert(call, joined);
                    }
                    return Some(pod_id);
                }
                let ready_timeout = self.pods[&pod_id].spec.ready_timeout;
                let (ready, missing) = self.required_ready(&container);
                let hold_spent = self.pods[&pod_id].hold_until.is_some_and(|t| now >= t);
                if ready {
                    out.push(Action::Forward(call));
                    self.set_state(&container, State::Starting);
                } else if missing.is_some() && self.deferred_count() >= self.settings.max_deferred {
                    out.push(Action::Forward(call));
                    self.set_state(&container, State::Starting);
                    self.warn(
                        out,
                        &container,
                        "cap reached: started without waiting",
                        format!(
                            "{} starts are deferred already (max_deferred)",
                            self.settings.max_deferred
                        ),
                    );
                } else if missing.is_none() && self.held.len() >= self.settings.max_held {
                    out.push(Action::Forward(call));
                    self.set_state(&container, State::Starting);
                    self.warn(
                        out,
                        &container,
                        "cap reached: started without waiting",
                        format!(
                            "{} calls are held already (max_held)",
                            self.settings.max_held
                        ),
                    );
                } else if missing.is_some() || hold_spent {
                    // A sidecar it needs does not exist yet: kubelet creates it
                    // later in this same sync, after this call returns. Or
                    // the pod's time for held starts is spent.
                    self.defer(now, call, &container, now + ready_timeout, out);
                    let detail = match missing {
                        Some(missing) => format!(
                            "sidecar {missing} is not created yet; the container starts once its sidecars are ready"
                        ),
                        None => format!(
                            "sidecar {} is not ready and the pod's held starts took half its grace period; \
                             the container starts once its sidecars are ready",
                            self.waiting_for(&container)
                        ),
                    };
                    self.note(out, &container, "start deferred", detail);
                } else {
                    let pod = self.pods.get_mut(&pod_id).expect("checked");
                    let mut defer_at = *pod.hold_until.get_or_insert(now + pod.grace / 2);
                    // kubelet's own deadline: answered before it, as a
                    // deferral too (the ready-timeout still decides).
                    if let Some(d) = deadline {
                        defer_at =
                            defer_at.min(d.checked_sub(self.settings.answer_margin).unwrap_or(d));
                    }
                    self.held.insert(
                        call,
                        Held::Start {
                            container: container.clone(),
                            since: now,
                            deadline: now + ready_timeout,
                            defer_at,
                        },
                    );
                    self.note(
                        out,
                        &container,
                        "start held",
                        "waiting for its sidecars to be ready".into(),
                    );
                }
                Some(pod_id)
            }
            Event::StartDone { container, ok } => {
                let c = self.containers.get_mut(&container)?;
                if matches!(
                    c.state,
                    State::Starting | State::Created | State::Deferred { .. }
                ) {
                    c.state = if ok {
                        State::Running
                    } else {
                        State::Exited { code: 128, at: now }
                    };
                }
                c.owed = None;
                if ok {
                    stop_after_start(c, &container, out);
                }
                let pod = c.pod.clone();
                self.answer_joined(&container, ok, out);
                Some(pod)
            }
            Event::StartLost { container } => {
                let c = self.containers.get_mut(&container)?;
                if matches!(c.state, State::Created | State::Deferred { .. }) {
                    c.state = State::Starting;
                }
                c.owed = None;
                let pod = c.pod.clone();
                self.answer_joined(&container, false, out);
                out.push(Action::Read(container.clone()));
                self.note(
                    out,
                    &container,
                    "start outcome unknown",
                    "the runtime's connection broke under the start; reading the container's state"
                        .into(),
                );
                Some(pod)
            }
            Event::Observed { container, state } => {
                self.merge(now, &container, state);
                let c = self.containers.get_mut(&container)?;
                // The start turned out to have landed.
                if c.running() {
                    stop_after_start(c, &container, out);
                }
                Some(c.pod.clone())
            }
            Event::Ready { container } => {
                let c = self.containers.get_mut(&container)?;
                if c.state == State::Running && !c.ready {
                    c.ready = true;
                    let pod = c.pod.clone();
                    self.note(out, &container, "sidecar ready", String::new());
                    return Some(pod);
                }
                Some(c.pod.clone())
            }
            Event::Exited { container, code } => {
                let c = self.containers.get_mut(&container)?;
                if !c.done() {
                    c.state = State::Exited { code, at: now };
                    c.ready = false;
                }
                Some(c.pod.clone())
            }
            Event::StopCalled {
                call,
                container,
                timeout,
                deadline,
            } => {
                let Some(c) = self.containers.get(&container) else {
                    out.push(Action::Forward(call));
                    return None;
                };
                let pod_id = c.pod.clone();
                let role = c.role;
                if let State::Deferred { .. } = c.state {
                    self.set_state(
                        &container,
                        State::NeverStarted {
                            code: 137,
                            reason: "NeverStarted",
                            message: "stopped before its deferred start".into(),
                            at: now,
                        },
                    );
                    if let Some(c) = self.containers.get_mut(&container) {
                        c.owed = None;
                    }
                    out.push(Action::Answer {
                        call,
                        result: Ok(()),
                    });
                    self.note(
                        out,
                        &container,
                        "deferred start cancelled",
                        "kubelet stopped it first".into(),
                    );
                    if role == Role::Normal {
                        self.begin_termination(now, &pod_id);
                    }
                    return Some(pod_id);
                }
                let start_in_flight = c.state == State::Starting && c.owed.is_some();
                if start_in_flight && matches!(role, Role::Normal | Role::Init) {
                    // The shim's start is in flight: the runtime may not
                    // have the container running yet, so the stop would be
                    // lost. Forward it (for its answer) and stop again once
                    // the start lands. (A sidecar's stop is held, below.)
                    if let Some(c) = self.containers.get_mut(&container) {
                        c.stop_after_start = Some(timeout);
                    }
                    self.begin_termination(now, &pod_id);
                    out.push(Action::Forward(call));
                    return Some(pod_id);
                }
                match role {
                    Role::Normal | Role::Init => {
                        self.begin_termination(now, &pod_id);
                        out.push(Action::Forward(call));
                    }
                    Role::Sidecar(_) if !c.running() => out.push(Action::Forward(call)),
                    Role::Sidecar(_) if self.held.len() >= self.settings.max_held => {
                        out.push(Action::Forward(call));
                        self.warn(
                            out,
                            &container,
                            "cap reached: sidecar stopped without waiting",
                            format!(
                                "{} calls are held already (max_held)",
                                self.settings.max_held
                            ),
                        );
                    }
                    Role::Sidecar(_) => {
                        let answer_by = deadline
                            .map(|d| d.checked_sub(self.settings.answer_margin).unwrap_or(d));
                        // A repeated stop joins the first one's wait.
                        let r = self.request_stop(now, &container, timeout);
                        self.held.insert(
                            call,
                            Held::Stop {
                                container: container.clone(),
                                arrived: r.arrived,
                                seen: now,
                                timeout: r.timeout,
                                answer_by,
                            },
                        );
                        self.note(
                            out,
                            &container,
                            "sidecar stop held",
                            "until the pod's normal containers have exited".into(),
                        );
                    }
                }
                Some(pod_id)
            }
            Event::PreStopCalled { call, container } => {
                let Some(c) = self.containers.get(&container) else {
                    out.push(Action::Forward(call));
                    return None;
                };
                let pod_id = c.pod.clone();
                match c.role {
                    Role::Normal | Role::Init => {
                        self.begin_termination(now, &pod_id);
                        out.push(Action::Forward(call));
                    }
                    Role::Sidecar(_) if self.held.len() >= self.settings.max_held => {
                        out.push(Action::Forward(call));
                        self.warn(
                            out,
                            &container,
                            "cap reached: sidecar preStop run without waiting",
                            format!(
                                "{} calls are held already (max_held)",
                                self.settings.max_held
                            ),
                        );
                    }
                    Role::Sidecar(_) => {
                        let grace = self.pods[&pod_id].grace;
                        let r = self.request_stop(now, &container, grace);
                        self.held.insert(
                            call,
                            Held::PreStop {
                                container: container.clone(),
                                arrived: r.arrived,
                                seen: now,
                            },
                        );
                        self.note(
                            out,
                            &container,
                            "sidecar preStop held",
                            "until the pod's normal containers have exited".into(),
                        );
                    }
                }
                Some(pod_id)
            }
            Event::StopPodCalled {
                call,
                pod,
                deadline,
            } => {
                if !self.pods.contains_key(&pod) {
                    out.push(Action::Forward(call));
                    return None;
                }
                if self.held.len() >= self.settings.max_held {
                    out.push(Action::Forward(call));
                    let name = self.pods[&pod].name.clone();
                    out.push(Action::Warn(Note {
                        pod: name,
                        container: String::new(),
                        what: "cap reached: pod stopped without ordering",
                        detail: format!(
                            "{} calls are held already (max_held)",
                            self.settings.max_held
                        ),
                    }));
                    return Some(pod);
                }
                self.begin_termination(now, &pod);
                if let Some(p) = self.pods.get_mut(&pod) {
                    p.teardown.get_or_insert(now);
                }
                let budget = Duration::from_secs(100);
                let mut until = now + budget;
                if let Some(d) = deadline {
                    until = until.min(d.checked_sub(self.settings.answer_margin).unwrap_or(d));
                }
                self.held.insert(
                    call,
                    Held::StopPod {
                        pod: pod.clone(),
                        deadline: until,
                    },
                );
                Some(pod)
            }
            Event::PodWork { pod } => {
                // The count is read only by deferred containers, as "has it
                // moved since my deferral": a step none of them still waits
                // to see changes nothing, and leaves the pod's record (and
                // the state file) as it is. kubelet asks ImageStatus twice
                // for every container it starts.
                let count = self.pods.get(&pod)?.creations;
                let waiting = self.pod_containers(&pod).any(
                    |c| matches!(c.state, State::Deferred { creations, .. } if creations == count),
                );
                if waiting {
                    if let Some(p) = self.pods.get_mut(&pod) {
                        p.creations += 1;
                    }
                }
                Some(pod)
            }
            Event::Cancelled { call } => {
                let h = self.held.remove(&call)?;
                self.held_pod(&h).cloned()
            }
            Event::ContainerRemoved { container } => {
                let c = self.containers.remove(&container)?;
                if let Some(p) = self.pods.get_mut(&c.pod) {
                    p.containers.retain(|id| id != &container);
                }
                Some(c.pod)
            }
            Event::PodRemoved { pod } => {
                self.forget_pod(&pod, out);
                None
            }
            Event::Tick => None,
        }
    }

    fn begin_termination(&mut self, now: Instant, pod: &str) {
        if let Some(p) = self.pods.get_mut(pod) {
            p.terminating.get_or_insert(now);
        }
    }

    /// Record kubelet's wish to stop a sidecar; the first wish's arrival
    /// stands (a repeated stop does not start its wait again), the shorter
    /// timeout wins.
    fn request_stop(&mut self, now: Instant, container: &str, timeout: Duration) -> StopRequest {
        let c = self.containers.get_mut(container).expect("known container");
        let r = match c.stop_request {
            Some(r) => StopRequest {
                arrived: r.arrived,
                timeout: r.timeout.min(timeout),
            },
            None => StopRequest {
                arrived: now,
                timeout,
            },
        };
        c.stop_request = Some(r);
        r
    }

    /// A stop kubelet asked for that no held call carries any more (the shim
    /// restarted meanwhile, or kubelet gave up on the call): the shim owes
    /// it itself.
    fn orphan_stop(&self, id: &str, c: &Container) -> Option<StopRequest> {
        let r = c.stop_request?;
        if c.stop_sent || !c.running() {
            return None;
        }
        let carried = self.held.values().any(|h| {
            matches!(h, Held::Stop { container, .. } | Held::PreStop { container, .. } if container == id)
        });
        (!carried).then_some(r)
    }

    fn held_start_of(&self, container: &str) -> Option<CallId> {
        self.held
            .iter()
            .filter(|(_, h)| matches!(h, Held::Start { container: c, .. } if c == container))
            .map(|(call, _)| *call)
            .min()
    }

    fn deferred_count(&self) -> usize {
        self.containers
            .values()
            .filter(|c| matches!(c.state, State::Deferred { .. }))
            .count()
    }

    /// kubelet created a new attempt of a container whose start is still
    /// deferred: kubelet no longer counts on the old one (its start's answer
    /// was lost, say, when the shim restarted), so it must never start.
    fn supersede(&mut self, now: Instant, pod: &str, container: &str, out: &mut Vec<Action>) {
        let Some(name) = self.containers.get(container).map(|c| c.name.clone()) else {
            return;
        };
        let older: Vec<ContainerId> = self
            .pods
            .get(pod)
            .map(|p| p.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|id| id.as_str() != container)
            .filter(|id| {
                self.containers
                    .get(*id)
                    .is_some_and(|c| c.name == name && matches!(c.state, State::Deferred { .. }))
            })
            .cloned()
            .collect();
        for id in older {
            if let Some(c) = self.containers.get_mut(&id) {
                c.state = State::NeverStarted {
                    code: 137,
                    reason: "NeverStarted",
                    message: "superseded by a newer attempt before its deferred start".into(),
                    at: now,
                };
                c.owed = None;
            }
            self.note(
                out,
                &id,
                "deferred start cancelled",
                "kubelet created a newer attempt".into(),
            );
        }
    }

    /// Repeated starts that waited for the first one get its outcome.
    fn answer_joined(&mut self, container: &str, ok: bool, out: &mut Vec<Action>) {
        let joined: Vec<CallId> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h, Held::Joined { container: j } if j == container))
            .map(|(call, _)| *call)
            .collect();
        for call in joined {
            self.held.remove(&call);
            out.push(Action::Answer {
                call,
                result: if ok {
                    Ok(())
                } else {
                    Err(Refusal {
                        message: "sidecar-shim: starting the container failed (a repeated start gets the first one's outcome)".into(),
                    })
                },
            });
        }
    }

    fn set_state(&mut self, container: &str, state: State) {
        if let Some(c) = self.containers.get_mut(container) {
            c.state = state;
        }
    }

    /// The shim's own stop of a container, noted.
    fn send_stop(
        &mut self,
        out: &mut Vec<Action>,
        container: &str,
        timeout: Duration,
        what: &'static str,
        detail: String,
    ) {
        if let Some(c) = self.containers.get_mut(container) {
            c.stop_sent = true;
            if c.state == State::Starting {
                // Its start is on its way to the runtime: a stop now finds
                // it created, and the start then runs it on. It is stopped
                // once the start has landed.
                c.stop_after_start = Some(timeout);
                self.note(out, container, what, "once its start has landed".into());
                return;
            }
        }
        out.push(Action::Stop {
            container: container.to_string(),
            timeout,
        });
        self.note(out, container, what, detail);
    }

    fn warn(&self, out: &mut Vec<Action>, container: &str, what: &'static str, detail: String) {
        self.note(out, container, what, detail);
        if let Some(Action::Log(n)) = out.pop() {
            out.push(Action::Warn(n));
        }
    }

    fn note(&self, out: &mut Vec<Action>, container: &str, what: &'static str, detail: String) {
        let (pod, name) = match self.containers.get(container) {
            Some(c) => (
                self.pods
                    .get(&c.pod)
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
                c.name.clone(),
            ),
            None => (String::new(), container.to_string()),
        };
        out.push(Action::Log(Note {
            pod,
            container: name,
            what,
            detail,
        }));
    }

    fn pod_containers<'a>(&'a self, pod: &str) -> impl Iterator<Item = &'a Container> + 'a {
        self.pods
            .get(pod)
            .into_iter()
            .flat_map(|p| self.pods_containers(p))
    }

    /// The latest attempt of each container name of the pod.
    fn latest<'a>(&'a self, pod: &str) -> HashMap<&'a str, (&'a ContainerId, &'a Container)> {
        let mut latest = HashMap::new();
        if let Some(p) = self.pods.get(pod) {
            for id in &p.containers {
                if let Some(c) = self.containers.get(id) {
                    latest.insert(c.name.as_str(), (id, c));
                }
            }
        }
        latest
    }

    /// The sidecars a container needs before it may start, with the latest
    /// attempt of each container name of its pod.
    #[allow(clippy::type_complexity)]
    fn needed(
        &self,
        container: &str,
    ) -> Option<(&[String], HashMap<&str, (&ContainerId, &Container)>)> {
        let c = self.containers.get(container)?;
        let pod = self.pods.get(&c.pod)?;
        let needed: &[String] = match c.role {
            Role::Sidecar(i) => &pod.spec.sidecars[..i],
            Role::Normal => &pod.spec.sidecars,
            Role::Init => &[],
        };
        Some((needed, self.latest(&c.pod)))
    }

    /// Are the sidecars this container needs running and ready? If not, the
    /// first one that does not exist (no live attempt) yet.
    fn required_ready(&self, container: &str) -> (bool, Option<String>) {
        let Some((needed, latest)) = self.needed(container) else {
            return (true, None);
        };
        let mut all_ready = true;
        for name in needed {
            match latest.get(name.as_str()) {
                Some((_, s)) if s.state == State::Running && s.ready => {}
                Some((_, s)) if s.running() => all_ready = false,
                _ => return (false, Some(name.clone())),
            }
        }
        (all_ready, None)
    }

    /// The sidecar a waiting container still waits for, for messages.
    fn waiting_for(&self, container: &str) -> String {
        let Some((needed, latest)) = self.needed(container) else {
            return String::new();
        };
        needed
            .iter()
            .find(|n| !matches!(latest.get(n.as_str()), Some((_, s)) if s.state == State::Running && s.ready))
            .cloned()
            .unwrap_or_default()
    }

    fn evidence_window(&self, pod: &Pod) -> Duration {
        // kubelet runs sleep and HTTP preStop hooks itself and sends the
        // container's StopContainer only after them: wait that long for it.
        let mut window = self.settings.evidence_window;
        for c in self.pods_containers(pod) {
            if c.role == Role::Normal && c.running() {
                match &c.pre_stop {
                    Some(PreStop::Sleep(d)) => window = window.max(*d + Duration::from_secs(1)),
                    Some(PreStop::Http) => window = window.max(pod.grace),
                    _ => {}
                }
            }
        }
        window.min(pod.grace)
    }

    fn pods_containers<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = &'a Container> + 'a {
        pod.containers
            .iter()
            .filter_map(|id| self.containers.get(id))
    }

    /// Re-decide everything pending in one pod.
    fn evaluate(&mut self, now: Instant, pod_id: &str, out: &mut Vec<Action>) {
        if !self.pods.contains_key(pod_id) {
            return;
        }
        self.release_starts(now, pod_id, out);
        self.check_job_completion(now, pod_id, out);
        self.release_stops(now, pod_id, out);
    }

    fn release_starts(&mut self, now: Instant, pod_id: &str, out: &mut Vec<Action>) {
        let on_timeout = self.pods[pod_id].spec.on_ready_timeout;
        // Deferred starts.
        let deferred: Vec<(ContainerId, Instant, Instant, u64)> = self
            .pod_containers(pod_id)
            .zip(self.pods[pod_id].containers.iter())
            .filter_map(|(c, id)| match c.state {
                State::Deferred {
                    since,
                    deadline,
                    creations,
                } => Some((id.clone(), since, deadline, creations)),
                _ => None,
            })
            .collect();
        for (id, since, deadline, creations) in deferred {
            // (A stop of a normal container is only a sign of a deletion:
            // kubelet stops each deferred container of a pod it deletes,
            // which ends its deferral, and stops one alone when its probe
            // or postStart hook failed.)
            let going = self.pods[pod_id].teardown.is_some() || self.pods[pod_id].job_done;
            if going {
                // Nothing starts in a pod that is going away; at its
                // deadline the start fails, so that it stops reading as
                // running.
                if now >= deadline {
                    self.set_state(
                        &id,
                        State::NeverStarted {
                            code: 137,
                            reason: "NeverStarted",
                            message: "the pod was shutting down before its deferred start".into(),
                            at: now,
                        },
                    );
                    if let Some(c) = self.containers.get_mut(&id) {
                        c.owed = None;
                    }
                }
                continue;
            }
            let nothing_after = self.pods[pod_id].creations == creations;
            let normal = self
                .containers
                .get(&id)
                .is_some_and(|c| c.role == Role::Normal);
            // kubelet creates a pod's regular containers (sidecars among
            // them) only once its init containers are done: after any
            // sidecar was created, a deferred container is an app, waiting
            // for a sidecar kubelet will make again (after its crash-loop
            // backoff, say) or never (it exited under Never).
            let sidecar_seen = self
                .pods_containers(&self.pods[pod_id])
                .any(|c| matches!(c.role, Role::Sidecar(_)));
            if normal && nothing_after && !sidecar_seen && now >= since + self.settings.init_window
            {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.role = Role::Init;
                    c.state = State::Starting;
                }
                out.push(Action::Start(id.clone()));
                self.note(
                    out,
                    &id,
                    "treated as an init container",
                    format!(
                        "kubelet did nothing more in the pod for {:?}: it waits for it to finish",
                        now - since
                    ),
                );
                continue;
            }
            let (ready, _) = self.required_ready(&id);
            if ready {
                self.set_state(&id, State::Starting);
                out.push(Action::Start(id.clone()));
                self.note(
                    out,
                    &id,
                    "deferred start released",
                    format!("after {:?}", now - since),
                );
            } else if now >= deadline {
                let waiting = self.waiting_for(&id);
                match on_timeout {
                    OnReadyTimeout::Start => {
                        self.set_state(&id, State::Starting);
                        out.push(Action::Start(id.clone()));
                        self.note(
                            out,
                            &id,
                            "ready-timeout: starting anyway",
                            format!("sidecar {waiting} not ready"),
                        );
                    }
                    OnReadyTimeout::Fail => {
                        let message =
                            format!("sidecar {waiting} not ready after {:?}", deadline - since);
                        self.set_state(
                            &id,
                            State::NeverStarted {
                                code: 128,
                                reason: "SidecarNotReady",
                                message: message.clone(),
                                at: now,
                            },
                        );
                        if let Some(c) = self.containers.get_mut(&id) {
                            c.owed = None;
                        }
                        self.note(out, &id, "ready-timeout: deferred start failed", message);
                    }
                }
            }
        }
        // Held starts.
        let mut held: Vec<(CallId, ContainerId, Instant, Instant, Instant)> = self
            .held
            .iter()
            .filter_map(|(call, h)| match h {
                Held::Start {
                    container,
                    since,
                    deadline,
                    defer_at,
                } if self
                    .containers
                    .get(container)
                    .is_some_and(|c| c.pod == pod_id) =>
                {
                    Some((*call, container.clone(), *since, *deadline, *defer_at))
                }
                _ => None,
            })
            .collect();
        held.sort();
        let calls: Vec<CallId> = held.iter().map(|h| h.0).collect();
        for (call, id, since, deadline, defer_at) in held {
            if !self.held.contains_key(&call) {
                continue;
            }
            let (ready, missing) = self.required_ready(&id);
            let starting = self.containers.get(&id).map(|c| &c.state) == Some(&State::Starting);
            if starting {
                // A repeated start held with the first: the first one was
                // released, this one gets its outcome.
                self.held.insert(call, Held::Joined { container: id });
            } else if ready {
                self.held.remove(&call);
                self.set_state(&id, State::Starting);
                out.push(Action::Forward(call));
                self.note(out, &id, "held start released", "sidecars ready".into());
            } else if missing.is_none() && now >= defer_at && defer_at < deadline {
                // kubelet cannot interrupt this call (a deletion waits for
                // it): answer it, and start the container once its sidecars
                // are ready, as if it had been deferred from the start.
                self.held.remove(&call);
                let deferred = self
                    .containers
                    .get(&id)
                    .is_some_and(|c| matches!(c.state, State::Deferred { .. }));
                if !deferred {
                    self.defer(now, call, &id, deadline, out);
                    self.note(
                        out,
                        &id,
                        "held start deferred",
                        format!(
                            "sidecar {} not ready after {:?} (the pod's holds took half its grace \
                             period, or kubelet's deadline is near): kubelet is answered so that it \
                             can go on (and delete the pod); the container starts once its sidecars \
                             are ready",
                            self.waiting_for(&id),
                            now - since
                        ),
                    );
                } else {
                    out.push(Action::Answer {
                        call,
                        result: Ok(()),
                    });
                }
            } else if now >= deadline || missing.is_some() {
                // A needed sidecar exited meanwhile (missing), or time is up.
                self.held.remove(&call);
                let waiting = self.waiting_for(&id);
                if missing.is_none() && on_timeout == OnReadyTimeout::Start {
                    self.set_state(&id, State::Starting);
                    out.push(Action::Forward(call));
                    self.note(
                        out,
                        &id,
                        "ready-timeout: starting anyway",
                        format!("sidecar {waiting} not ready"),
                    );
                } else {
                    let message =
                        format!("sidecar-shim: sidecar {waiting} is not ready; start refused");
                    self.set_state(
                        &id,
                        State::NeverStarted {
                            code: 128,
                            reason: "SidecarNotReady",
                            message: message.clone(),
                            at: now,
                        },
                    );
                    out.push(Action::Answer {
                        call,
                        result: Err(Refusal {
                            message: message.clone(),
                        }),
                    });
                    self.note(out, &id, "held start refused", message);
                }
            }
        }
        // Nothing in the pod waits for its sidecars: a later hold (a
        // restart) gets its own time. (No start is held here anew: the
        // pod's held starts are among those just gone through.)
        let waiting = calls
            .iter()
            .any(|c| matches!(self.held.get(c), Some(Held::Start { .. })))
            || self
                .pod_containers(pod_id)
                .any(|c| matches!(c.state, State::Deferred { .. }));
        if !waiting {
            if let Some(p) = self.pods.get_mut(pod_id) {
                p.hold_until = None;
            }
        }
    }

    /// Answer a start and owe it: the container starts once its sidecars
    /// are ready, or at `deadline` as `on-ready-timeout` says.
    fn defer(
        &mut self,
        now: Instant,
        call: CallId,
        id: &ContainerId,
        deadline: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(pod) = self.containers.get(id).map(|c| c.pod.clone()) else {
            return;
        };
        let creations = self.pods[&pod].creations;
        let deferral = Deferral {
            since: now,
            deadline,
            creations,
        };
        self.set_state(
            id,
            State::Deferred {
                since: now,
                deadline,
                creations,
            },
        );
        if let Some(c) = self.containers.get_mut(id) {
            c.owed = Some(deferral);
        }
        out.push(Action::Answer {
            call,
            result: Ok(()),
        });
    }

    fn check_job_completion(&mut self, now: Instant, pod_id: &str, out: &mut Vec<Action>) {
        let pod = &self.pods[pod_id];
        // Not held back by a normal container's stop, which may be kubelet
        // killing it alone: during a deletion kubelet's own stops of the
        // sidecars are held, and the shim's own stop is sent only for a
        // sidecar kubelet has not asked to stop.
        if pod.job_done || pod.teardown.is_some() || !job_like(&pod.spec.restart) {
            return;
        }
        if now < pod.last_activity + self.settings.settle {
            return;
        }
        let latest = self.latest(pod_id);
        let normals: Vec<&Container> = latest
            .values()
            .map(|(_, c)| *c)
            .filter(|c| c.role == Role::Normal)
            .collect();
        if normals.is_empty() {
            return;
        }
        // A container that never started (its sidecars never got ready)
        // reads to kubelet as exited with its code, as one that ran does.
        let terminal = |c: &Container| {
            let (code, at) = match &c.state {
                State::Exited { code, at } | State::NeverStarted { code, at, .. } => (*code, *at),
                _ => return false,
            };
            match &pod.spec.restart {
                Restart::Explicit(RestartPolicy::Never) => true,
                Restart::Explicit(RestartPolicy::OnFailure) => code == 0,
                Restart::JobDefault => code == 0 || now >= at + self.settings.failed_exit_window,
                _ => false,
            }
        };
        if normals.iter().all(|c| terminal(c)) {
            let name = pod.name.clone();
            self.pods.get_mut(pod_id).expect("checked").job_done = true;
            out.push(Action::Log(Note {
                pod: name,
                container: String::new(),
                what: "job complete",
                detail: "all normal containers are terminal; stopping sidecars".into(),
            }));
        }
    }

    fn release_stops(&mut self, now: Instant, pod_id: &str, out: &mut Vec<Action>) {
        let pod = &self.pods[pod_id];
        let shutting_down = pod.terminating.is_some() || pod.job_done;
        let grace = pod.grace;
        let window = self.evidence_window(pod);
        let (normals_done, running_sidecars, normals_to_stop) = {
            let latest = self.latest(pod_id);
            let normals_done = latest
                .values()
                .all(|(_, c)| c.role != Role::Normal || !c.running());
            // Running sidecars by index: the last is the next to stop.
            let mut running_sidecars: Vec<(usize, ContainerId)> = latest
                .values()
                .filter_map(|(id, c)| match c.role {
                    Role::Sidecar(i) if c.running() => Some((i, (*id).clone())),
                    _ => None,
                })
                .collect();
            running_sidecars.sort();
            let normals_to_stop: Vec<ContainerId> = latest
                .values()
                .filter(|(_, c)| c.role == Role::Normal && c.running() && !c.stop_sent)
                .map(|(id, _)| (*id).clone())
                .collect();
            (normals_done, running_sidecars, normals_to_stop)
        };
        let may_stop = |id: &ContainerId| -> bool {
            normals_done
                && running_sidecars
                    .last()
                    .map(|(_, last)| last == id)
                    .unwrap_or(true)
        };

        // kubelet's held sidecar stops and preStop hooks.
        // (call, container, first arrival, this call's arrival, kubelet's
        // timeout (None: a preStop hook), answer by)
        type HeldStop = (
            CallId,
            ContainerId,
            Instant,
            Instant,
            Option<Duration>,
            Option<Instant>,
        );
        let held: Vec<HeldStop> = self
            .held
            .iter()
            .filter_map(|(call, h)| match h {
                Held::Stop {
                    container,
                    arrived,
                    seen,
                    timeout,
                    answer_by,
                } => Some((
                    *call,
                    container.clone(),
                    *arrived,
                    *seen,
                    Some(*timeout),
                    *answer_by,
                )),
                Held::PreStop {
                    container,
                    arrived,
                    seen,
                } => Some((*call, container.clone(), *arrived, *seen, None, None)),
                _ => None,
            })
            .filter(|(_, c, ..)| self.containers.get(c).is_some_and(|c| c.pod == pod_id))
            .collect();
        let mut held = held;
        held.sort_by_key(|h| h.0);
        // Stops held for two or more of the pod's sidecars are kubelet
        // stopping the pod (a deletion while no normal container runs, say):
        // the pod is shutting down, and they go in order, not each as a
        // single-container stop (also the ones still held after the first
        // is released).
        let mut stopping: Vec<&ContainerId> = held.iter().map(|h| &h.1).collect();
        stopping.sort();
        stopping.dedup();
        let several = stopping.len() >= 2;
        if several {
            self.begin_termination(now, pod_id);
        }
        let shutting_down = shutting_down || several;
        for (call, id, arrived, seen, timeout, answer_by) in held {
            let limit = timeout.unwrap_or(grace);
            let out_of_grace = now >= arrived + limit + self.settings.grace_slack
                || answer_by.is_some_and(|a| now >= a);
            let not_shutdown = !shutting_down && now >= seen + window;
            let exited = self.containers.get(&id).is_some_and(|c| !c.running());
            let release = exited || may_stop(&id) || out_of_grace || not_shutdown;
            if !release {
                continue;
            }
            self.held.remove(&call);
            let left = timeout.map(|t| {
                t.saturating_sub(now - arrived)
                    .max(self.settings.min_stop_grace)
            });
            if let Some(c) = self.containers.get_mut(&id) {
                c.stop_sent = true;
                if c.state == State::Starting && c.owed.is_some() {
                    // The shim's own start is still on its way: stop it
                    // again once it lands.
                    c.stop_after_start = Some(left.unwrap_or(self.settings.min_stop_grace));
                }
            }
            let why = if exited {
                "it exited meanwhile"
            } else if may_stop(&id) {
                "normal containers and later sidecars have exited"
            } else if out_of_grace {
                "grace period ran out"
            } else {
                "no sign of pod shutdown: a single-container stop"
            };
            match timeout {
                Some(t) => {
                    let left = t
                        .saturating_sub(now - arrived)
                        .max(self.settings.min_stop_grace);
                    out.push(Action::ForwardStop {
                        call,
                        timeout: left,
                    });
                    self.note(
                        out,
                        &id,
                        "sidecar stop released",
                        format!("{why}; held {:?}, grace left {left:?}", now - arrived),
                    );
                }
                None => {
                    out.push(Action::Forward(call));
                    self.note(
                        out,
                        &id,
                        "sidecar preStop released",
                        format!("{why}; held {:?}", now - arrived),
                    );
                }
            }
        }

        // Stops kubelet asked for whose calls are gone (the shim restarted
        // meanwhile): in a pod that is shutting down the shim sends them
        // itself once the apps are gone (or the grace ran out); otherwise
        // kubelet's retry brings the stop again, and with it the wait for
        // signs of a shutdown (which the restart may have swallowed).
        let orphans: Vec<(ContainerId, StopRequest)> = self
            .pods_containers(&self.pods[pod_id])
            .zip(self.pods[pod_id].containers.iter())
            .filter_map(|(c, id)| self.orphan_stop(id, c).map(|r| (id.clone(), r)))
            .collect();
        for (id, r) in orphans {
            let out_of_grace = now >= r.arrived + r.timeout + self.settings.grace_slack;
            if !shutting_down || !(may_stop(&id) || out_of_grace) {
                continue;
            }
            let left = r
                .timeout
                .saturating_sub(now - r.arrived)
                .max(self.settings.min_stop_grace);
            self.send_stop(
                out,
                &id,
                left,
                "sidecar stop resumed",
                format!("kubelet's stop from before a restart; grace left {left:?}"),
            );
        }

        // The shim's own stops: Job completion and StopPodSandbox teardown.
        let pod = &self.pods[pod_id];
        let mut stop_pod: Vec<(CallId, Instant)> = self
            .held
            .iter()
            .filter_map(|(call, h)| match h {
                Held::StopPod { pod, deadline } if pod == pod_id => Some((*call, *deadline)),
                _ => None,
            })
            .collect();
        stop_pod.sort();
        let teardown = pod.teardown.is_some();
        let job_done = pod.job_done;
        if teardown && !normals_done {
            for id in normals_to_stop {
                self.send_stop(
                    out,
                    &id,
                    grace,
                    "teardown: stopping normal container",
                    String::new(),
                );
            }
        }
        if (job_done || teardown) && normals_done {
            if let Some((_, id)) = running_sidecars.last() {
                let id = id.clone();
                let holds_kubelet_stop = self
                    .held
                    .values()
                    .any(|h| matches!(h, Held::Stop { container, .. } if *container == id));
                let c = self.containers.get_mut(&id).expect("latest");
                if !c.stop_sent && !holds_kubelet_stop {
                    c.stopped_by_shim = job_done;
                    let (timeout, what) = if job_done {
                        (grace, "job complete: stopping sidecar")
                    } else {
                        (self.settings.min_stop_grace, "teardown: stopping sidecar")
                    };
                    self.send_stop(out, &id, timeout, what, String::new());
                }
            }
        }
        let all_done = self.pod_containers(pod_id).all(|c| !c.running());
        for (call, deadline) in stop_pod {
            if all_done || now >= deadline {
                self.held.remove(&call);
                out.push(Action::Forward(call));
            }
        }
    }
}

fn job_like(restart: &Restart) -> bool {
    matches!(
        restart,
        Restart::Explicit(RestartPolicy::Never)
            | Restart::Explicit(RestartPolicy::OnFailure)
            | Restart::JobDefault
    )
}

pub mod view;

#[cfg(test)]
mod tests;
