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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::spec::{OnReadyTimeout, PodSpec, PreStop, Restart, RestartPolicy};

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
    /// kubelet creates nothing for this long is an init container: kubelet
    /// waits for it to finish before it creates the pod's regular containers
    /// (sidecars among them). It is started at once and left alone.
    pub init_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            min_stop_grace: Duration::from_secs(2),
            evidence_window: Duration::from_secs(2),
            default_grace: Duration::from_secs(30),
            rewrite_exit_code: true,
            failed_exit_window: Duration::from_secs(30),
            settle: Duration::from_secs(1),
            answer_margin: Duration::from_secs(2),
            grace_slack: Duration::from_secs(1),
            init_window: Duration::from_secs(2),
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
    /// A decision worth an info log line.
    Log(Note),
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
    /// Never started: reads as exited.
    Exited {
        code: i32,
        reason: String,
        message: String,
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
    },
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
    /// The shim sent its own stop already.
    stop_sent: bool,
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
    /// kubelet's last create or start in this pod.
    last_activity: Instant,
    /// How many containers kubelet created in this pod.
    creations: u64,
}

#[derive(Debug)]
enum Held {
    Start {
        container: ContainerId,
        deadline: Instant,
    },
    Stop {
        container: ContainerId,
        arrived: Instant,
        timeout: Duration,
        answer_by: Option<Instant>,
    },
    PreStop {
        container: ContainerId,
        arrived: Instant,
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

    /// What kubelet must read for this container instead of the runtime's
    /// state, if anything.
    pub fn status_override(&self, container: &str) -> Option<StatusOverride> {
        let c = self.containers.get(container)?;
        match &c.state {
            State::Deferred { since, .. } => Some(StatusOverride::Running { since: *since }),
            State::NeverStarted {
                code,
                reason,
                message,
            } => Some(StatusOverride::Exited {
                code: *code,
                reason: reason.to_string(),
                message: message.clone(),
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
        matches!(c.state, State::Deferred { .. } | State::NeverStarted { .. }).then(|| {
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
                Held::Start { deadline, .. } | Held::StopPod { deadline, .. } => at(*deadline),
                Held::Stop {
                    container,
                    arrived,
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
                            at(*arrived + self.evidence_window(pod));
                        }
                    }
                }
                Held::PreStop { container, arrived } => {
                    if let Some(pod) = self
                        .containers
                        .get(container)
                        .and_then(|c| self.pods.get(&c.pod))
                    {
                        at(*arrived + pod.grace + self.settings.grace_slack);
                        if pod.terminating.is_none() && !pod.job_done {
                            at(*arrived + self.evidence_window(pod));
                        }
                    }
                }
            }
        }
        for c in self.containers.values() {
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
            if job_like(&pod.spec.restart) && !pod.job_done && pod.terminating.is_none() {
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
            Some(pod) => self.evaluate(now, &pod, &mut out),
            None => {
                let pods: Vec<PodId> = self.pods.keys().cloned().collect();
                for pod in pods {
                    self.evaluate(now, &pod, &mut out);
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
                let p = self.pods.entry(pod.clone()).or_insert_with(|| Pod {
                    name: pod_name,
                    spec: spec.clone(),
                    grace: grace.unwrap_or(self.settings.default_grace),
                    containers: Vec::new(),
                    terminating: None,
                    job_done: false,
                    last_activity: now,
                    creations: 0,
                });
                p.spec = spec;
                if let Some(g) = grace {
                    p.grace = g;
                }
                p.last_activity = now;
                p.creations += 1;
                if !p.containers.contains(&container) {
                    p.containers.push(container.clone());
                }
                self.containers.insert(
                    container,
                    Container {
                        pod: pod.clone(),
                        name,
                        role,
                        pre_stop,
                        state: State::Created,
                        ready: false,
                        stopped_by_shim: false,
                        stop_sent: false,
                    },
                );
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
                if c.running() || c.done() {
                    // A repeated start: the runtime answers it as it would.
                    out.push(Action::Forward(call));
                    return Some(pod_id);
                }
                let ready_timeout = pod.spec.ready_timeout;
                let (ready, missing) = self.required_ready(&container);
                if ready {
                    out.push(Action::Forward(call));
                    self.set_state(&container, State::Starting);
                } else if missing.is_some() {
                    // A sidecar it needs does not exist yet: kubelet creates it
                    // later in this same sync, after this call returns.
                    let deadline = now + ready_timeout;
                    let creations = self.pods[&pod_id].creations;
                    self.set_state(
                        &container,
                        State::Deferred {
                            since: now,
                            deadline,
                            creations,
                        },
                    );
                    out.push(Action::Answer {
                        call,
                        result: Ok(()),
                    });
                    self.note(out, &container, "start deferred", format!(
                        "sidecar {} is not created yet; the container starts once its sidecars are ready",
                        missing.unwrap_or_default()
                    ));
                } else {
                    let mut until = now + ready_timeout;
                    if let Some(d) = deadline {
                        until = until.min(d.checked_sub(self.settings.answer_margin).unwrap_or(d));
                    }
                    self.held.insert(
                        call,
                        Held::Start {
                            container: container.clone(),
                            deadline: until,
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
                        },
                    );
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
                match role {
                    Role::Normal | Role::Init => {
                        self.begin_termination(now, &pod_id);
                        out.push(Action::Forward(call));
                    }
                    Role::Sidecar(_) if !c.running() => out.push(Action::Forward(call)),
                    Role::Sidecar(_) => {
                        let answer_by = deadline
                            .map(|d| d.checked_sub(self.settings.answer_margin).unwrap_or(d));
                        self.held.insert(
                            call,
                            Held::Stop {
                                container: container.clone(),
                                arrived: now,
                                timeout,
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
                    Role::Sidecar(_) => {
                        self.held.insert(
                            call,
                            Held::PreStop {
                                container: container.clone(),
                                arrived: now,
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
                self.begin_termination(now, &pod);
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
                if let Some(p) = self.pods.remove(&pod) {
                    for id in p.containers {
                        self.containers.remove(&id);
                    }
                }
                let calls: Vec<CallId> = self
                    .held
                    .iter()
                    .filter(|(_, h)| self.held_pod(h).is_none() || self.held_pod(h) == Some(&pod))
                    .map(|(id, _)| *id)
                    .collect();
                for call in calls {
                    self.held.remove(&call);
                    out.push(Action::Forward(call));
                }
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

    fn set_state(&mut self, container: &str, state: State) {
        if let Some(c) = self.containers.get_mut(container) {
            c.state = state;
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
            let terminating = self.pods[pod_id].terminating.is_some() || self.pods[pod_id].job_done;
            if terminating {
                continue;
            }
            let nothing_after = self.pods[pod_id].creations == creations;
            let normal = self
                .containers
                .get(&id)
                .is_some_and(|c| c.role == Role::Normal);
            if normal && nothing_after && now >= since + self.settings.init_window {
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
                        "kubelet created nothing after it for {:?}: it waits for it to finish",
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
                            },
                        );
                        self.note(out, &id, "ready-timeout: deferred start failed", message);
                    }
                }
            }
        }
        // Held starts.
        let held: Vec<(CallId, ContainerId, Instant)> = self
            .held
            .iter()
            .filter_map(|(call, h)| match h {
                Held::Start {
                    container,
                    deadline,
                } if self
                    .containers
                    .get(container)
                    .is_some_and(|c| c.pod == pod_id) =>
                {
                    Some((*call, container.clone(), *deadline))
                }
                _ => None,
            })
            .collect();
        for (call, id, deadline) in held {
            let (ready, missing) = self.required_ready(&id);
            if ready {
                self.held.remove(&call);
                self.set_state(&id, State::Starting);
                out.push(Action::Forward(call));
                self.note(out, &id, "held start released", "sidecars ready".into());
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
    }

    fn check_job_completion(&mut self, now: Instant, pod_id: &str, out: &mut Vec<Action>) {
        let pod = &self.pods[pod_id];
        if pod.job_done || pod.terminating.is_some() || !job_like(&pod.spec.restart) {
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
        let terminal = |c: &Container| match (&c.state, &pod.spec.restart) {
            (State::Exited { .. }, Restart::Explicit(RestartPolicy::Never)) => true,
            (State::Exited { code, .. }, Restart::Explicit(RestartPolicy::OnFailure)) => *code == 0,
            (State::Exited { code, at }, Restart::JobDefault) => {
                *code == 0 || now >= *at + self.settings.failed_exit_window
            }
            _ => false,
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
        // (call, container, arrived, kubelet's timeout (None: a preStop hook), answer by)
        type HeldStop = (
            CallId,
            ContainerId,
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
                    timeout,
                    answer_by,
                } => Some((
                    *call,
                    container.clone(),
                    *arrived,
                    Some(*timeout),
                    *answer_by,
                )),
                Held::PreStop { container, arrived } => {
                    Some((*call, container.clone(), *arrived, None, None))
                }
                _ => None,
            })
            .filter(|(_, c, ..)| self.containers.get(c).is_some_and(|c| c.pod == pod_id))
            .collect();
        for (call, id, arrived, timeout, answer_by) in held {
            let limit = timeout.unwrap_or(grace);
            let out_of_grace = now >= arrived + limit + self.settings.grace_slack
                || answer_by.is_some_and(|a| now >= a);
            let not_shutdown = !shutting_down && now >= arrived + window;
            let exited = self.containers.get(&id).is_some_and(|c| !c.running());
            let release = exited || may_stop(&id) || out_of_grace || not_shutdown;
            if !release {
                continue;
            }
            self.held.remove(&call);
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

        // The shim's own stops: Job completion and StopPodSandbox teardown.
        let pod = &self.pods[pod_id];
        let stop_pod: Vec<(CallId, Instant)> = self
            .held
            .iter()
            .filter_map(|(call, h)| match h {
                Held::StopPod { pod, deadline } if pod == pod_id => Some((*call, *deadline)),
                _ => None,
            })
            .collect();
        let teardown = !stop_pod.is_empty();
        let job_done = pod.job_done;
        if teardown && !normals_done {
            for id in normals_to_stop {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.stop_sent = true;
                }
                out.push(Action::Stop {
                    container: id.clone(),
                    timeout: grace,
                });
                self.note(
                    out,
                    &id,
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
                    c.stop_sent = true;
                    c.stopped_by_shim = job_done;
                    let timeout = if job_done {
                        grace
                    } else {
                        self.settings.min_stop_grace.max(Duration::from_secs(0))
                    };
                    out.push(Action::Stop {
                        container: id.clone(),
                        timeout,
                    });
                    self.note(
                        out,
                        &id,
                        if job_done {
                            "job complete: stopping sidecar"
                        } else {
                            "teardown: stopping sidecar"
                        },
                        String::new(),
                    );
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
