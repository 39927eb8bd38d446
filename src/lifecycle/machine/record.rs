//! What the machine must remember across a restart of the shim, and how it
//! picks up again: a [`PodRecord`] per pod (written by the gRPC layer to the
//! state directory), [`Machine::restore`] to load one, and
//! [`Machine::reconcile`] to square what was remembered with what the runtime
//! reports now.
//!
//! Held calls are not recorded: a restart closes their connections, and
//! kubelet retries them (a repeated call then joins what its first one had
//! started, see `request_stop`). Everything the shim promised kubelet that
//! the runtime cannot tell is recorded: starts answered but deferred, starts
//! refused, sidecars the shim stopped (their exit code is rewritten), stops
//! kubelet asked for, a pod's shutdown, Job completion and teardown.
//!
//! Times are stored as wall-clock milliseconds since the Unix epoch and
//! mapped to and from the machine's `Instant`s with a [`WallClock`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    Action, Container, ContainerId, Deferral, Machine, Note, Pod, PodId, Role, State, StopRequest,
};
use crate::lifecycle::spec::{PodSpec, PreStop};

/// The version of the record format; a record of another version is not
/// read (it is dropped with a warning, as a corrupt one is).
pub const RECORD_VERSION: u32 = 1;

/// Maps `Instant`s to wall-clock milliseconds and back, from one reading of
/// both clocks.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    instant: Instant,
    unix_ms: u64,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock::at(Instant::now(), SystemTime::now())
    }

    pub fn at(instant: Instant, wall: SystemTime) -> WallClock {
        let unix_ms = wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        WallClock { instant, unix_ms }
    }

    pub fn to_unix_ms(&self, t: Instant) -> u64 {
        if t >= self.instant {
            self.unix_ms + (t - self.instant).as_millis() as u64
        } else {
            self.unix_ms
                .saturating_sub((self.instant - t).as_millis() as u64)
        }
    }

    /// The `Instant` of a wall-clock time; times before this process's
    /// monotonic clock can express are clamped to the earliest it can.
    pub fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.unix_ms {
            self.instant + Duration::from_millis(ms - self.unix_ms)
        } else {
            let back = Duration::from_millis(self.unix_ms - ms);
            self.instant.checked_sub(back).unwrap_or(self.instant)
        }
    }

    /// Nanoseconds since the Unix epoch, as the CRI's timestamps are.
    pub fn to_unix_nanos(&self, t: Instant) -> i64 {
        let base = self.unix_ms as i128 * 1_000_000;
        let delta = if t >= self.instant {
            (t - self.instant).as_nanos() as i128
        } else {
            -((self.instant - t).as_nanos() as i128)
        };
        (base + delta).clamp(0, i64::MAX as i128) as i64
    }
}

/// One pod's durable state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub version: u32,
    pub pod: PodId,
    name: String,
    spec: PodSpec,
    grace_ms: u64,
    terminating: Option<u64>,
    job_done: bool,
    teardown: Option<u64>,
    creations: u64,
    containers: Vec<ContainerRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ContainerRecord {
    id: ContainerId,
    name: String,
    role: RoleRecord,
    pre_stop: Option<PreStop>,
    state: StateRecord,
    ready: bool,
    stopped_by_shim: bool,
    /// The start the shim owes (answered, not yet confirmed by the runtime).
    owed: Option<DeferralRecord>,
    stop_request: Option<StopRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RoleRecord {
    Sidecar(usize),
    Normal,
    Init,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StateRecord {
    Created,
    Deferred(DeferralRecord),
    Starting,
    Running,
    Exited {
        code: i32,
        at: u64,
    },
    NeverStarted {
        code: i32,
        reason: String,
        message: String,
        at: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeferralRecord {
    since: u64,
    deadline: u64,
    creations: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StopRecord {
    arrived: u64,
    timeout_ms: u64,
}

/// A container as the runtime lists it now.
#[derive(Clone, Debug)]
pub struct RuntimeContainer {
    pub id: ContainerId,
    pub name: String,
    pub attempt: u32,
    pub state: RuntimeState,
    pub pre_stop: Option<PreStop>,
    pub grace: Option<Duration>,
    /// Not an init or ephemeral container (kubelet's container-type
    /// annotation, where present).
    pub regular: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeState {
    Created,
    Running,
    Exited { code: i32 },
    Unknown,
}

/// A sandbox as the runtime lists it now, with the sidecar spec its
/// annotations give (None: not a pod with sidecars, or a malformed one).
#[derive(Clone, Debug)]
pub struct RuntimePod {
    pub id: PodId,
    pub name: String,
    pub spec: Option<Arc<PodSpec>>,
    pub containers: Vec<RuntimeContainer>,
}

/// What a reconcile did, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Pods known from the state directory and still in the runtime.
    pub kept: usize,
    /// Pods with sidecars the state directory did not know (rebuilt from
    /// the runtime).
    pub rebuilt: usize,
    /// Pods the runtime no longer has.
    pub vanished: Vec<PodId>,
    /// Containers that changed state while nobody watched.
    pub changed: usize,
}

impl PodRecord {
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }
}

impl Machine {
    /// The durable state of one pod, if the machine knows it.
    pub fn record(&self, pod: &str, clock: &WallClock) -> Option<PodRecord> {
        let p = self.pods.get(pod)?;
        let ms = |t: Instant| clock.to_unix_ms(t);
        let deferral = |d: &Deferral| DeferralRecord {
            since: ms(d.since),
            deadline: ms(d.deadline),
            creations: d.creations,
        };
        let containers = p
            .containers
            .iter()
            .filter_map(|id| self.containers.get(id).map(|c| (id, c)))
            .map(|(id, c)| ContainerRecord {
                id: id.clone(),
                name: c.name.clone(),
                role: match c.role {
                    Role::Sidecar(i) => RoleRecord::Sidecar(i),
                    Role::Normal => RoleRecord::Normal,
                    Role::Init => RoleRecord::Init,
                },
                pre_stop: c.pre_stop.clone(),
                state: match &c.state {
                    State::Created => StateRecord::Created,
                    State::Deferred {
                        since,
                        deadline,
                        creations,
                    } => StateRecord::Deferred(deferral(&Deferral {
                        since: *since,
                        deadline: *deadline,
                        creations: *creations,
                    })),
                    State::Starting => StateRecord::Starting,
                    State::Running => StateRecord::Running,
                    State::Exited { code, at } => StateRecord::Exited {
                        code: *code,
                        at: ms(*at),
                    },
                    State::NeverStarted {
                        code,
                        reason,
                        message,
                        at,
                    } => StateRecord::NeverStarted {
                        code: *code,
                        reason: reason.to_string(),
                        message: message.clone(),
                        at: ms(*at),
                    },
                },
                ready: c.ready,
                stopped_by_shim: c.stopped_by_shim,
                owed: c.owed.as_ref().map(deferral),
                stop_request: c.stop_request.map(|r| StopRecord {
                    arrived: ms(r.arrived),
                    timeout_ms: r.timeout.as_millis() as u64,
                }),
            })
            .collect();
        Some(PodRecord {
            version: RECORD_VERSION,
            pod: pod.to_string(),
            name: p.name.clone(),
            spec: (*p.spec).clone(),
            grace_ms: p.grace.as_millis() as u64,
            terminating: p.terminating.map(ms),
            job_done: p.job_done,
            teardown: p.teardown.map(ms),
            creations: p.creations,
            containers,
        })
    }

    /// Load a pod as it was recorded. Its containers keep their recorded
    /// states until [`Machine::reconcile`] hears the runtime; no action is
    /// taken before that.
    pub fn restore(&mut self, now: Instant, clock: &WallClock, record: PodRecord) {
        let at = |ms: u64| clock.to_instant(ms);
        let deferral = |d: DeferralRecord| Deferral {
            since: at(d.since),
            deadline: at(d.deadline),
            creations: d.creations,
        };
        let pod_id = record.pod.clone();
        let mut ids = Vec::new();
        for c in record.containers {
            let state = match c.state {
                StateRecord::Created => State::Created,
                StateRecord::Deferred(d) => {
                    let d = deferral(d);
                    State::Deferred {
                        since: d.since,
                        deadline: d.deadline,
                        creations: d.creations,
                    }
                }
                StateRecord::Starting => State::Starting,
                StateRecord::Running => State::Running,
                StateRecord::Exited { code, at: t } => State::Exited { code, at: at(t) },
                StateRecord::NeverStarted {
                    code,
                    reason,
                    message,
                    at: t,
                } => State::NeverStarted {
                    code,
                    reason: never_started_reason(&reason),
                    message,
                    at: at(t),
                },
            };
            let done = matches!(state, State::Exited { .. } | State::NeverStarted { .. });
            ids.push(c.id.clone());
            self.containers.insert(
                c.id,
                Container {
                    pod: pod_id.clone(),
                    name: c.name,
                    role: match c.role {
                        RoleRecord::Sidecar(i) => Role::Sidecar(i),
                        RoleRecord::Normal => Role::Normal,
                        RoleRecord::Init => Role::Init,
                    },
                    pre_stop: c.pre_stop,
                    state,
                    ready: c.ready,
                    stopped_by_shim: c.stopped_by_shim,
                    // A stop in flight when the shim went down is sent again
                    // (the runtime does not signal twice).
                    stop_sent: done,
                    owed: c.owed.map(deferral),
                    stop_request: c.stop_request.map(|r| StopRequest {
                        arrived: at(r.arrived),
                        timeout: Duration::from_millis(r.timeout_ms),
                    }),
                    stop_after_start: None,
                },
            );
        }
        self.pods.insert(
            pod_id.clone(),
            Pod {
                name: record.name,
                spec: Arc::new(record.spec),
                grace: Duration::from_millis(record.grace_ms),
                containers: ids,
                terminating: record.terminating.map(at),
                job_done: record.job_done,
                teardown: record.teardown.map(at),
                // Settle again: kubelet may be setting up containers.
                last_activity: now,
                hold_until: None,
                creations: record.creations,
            },
        );
        self.touched.insert(pod_id);
    }

    /// Square the machine with what the runtime reports now (after
    /// [`Machine::restore`]): forget pods and containers that are gone,
    /// adopt containers of pods with sidecars that the machine does not
    /// know, take up state changes that happened while nobody watched, and
    /// carry on (deferred starts whose sidecars are ready, Job completion,
    /// stops owed).
    pub fn reconcile(
        &mut self,
        now: Instant,
        runtime: Vec<RuntimePod>,
    ) -> (Vec<Action>, Reconciled) {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
        let mut out = Vec::new();
        let mut report = Reconciled::default();
        let present: HashSet<&str> = runtime.iter().map(|p| p.id.as_str()).collect();
        let vanished: Vec<PodId> = self
            .pods
            .keys()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        for pod in &vanished {
            self.forget_pod(pod, &mut out);
        }
        report.vanished = vanished;

        for rp in runtime {
            let known = self.pods.contains_key(&rp.id);
            if !known {
                let Some(spec) = rp.spec.clone() else {
                    continue;
                };
                if self.pods.len() >= self.settings.max_pods {
                    out.push(Action::Warn(Note {
                        pod: rp.name.clone(),
                        container: String::new(),
                        what: "cap reached: pod not managed",
                        detail: "max_pods pods are managed already".into(),
                    }));
                    continue;
                }
                self.pods.insert(
                    rp.id.clone(),
                    Pod {
                        name: rp.name.clone(),
                        spec,
                        grace: rp
                            .containers
                            .iter()
                            .find_map(|c| c.grace)
                            .unwrap_or(self.settings.default_grace),
                        containers: Vec::new(),
                        terminating: None,
                        job_done: false,
                        teardown: None,
                        last_activity: now,
                        hold_until: None,
                        creations: 0,
                    },
                );
                report.rebuilt += 1;
            } else {
                report.kept += 1;
            }
            self.touched.insert(rp.id.clone());
            let listed: HashMap<&str, &RuntimeContainer> =
                rp.containers.iter().map(|c| (c.id.as_str(), c)).collect();
            // Containers the runtime no longer has.
            let gone: Vec<ContainerId> = self.pods[&rp.id]
                .containers
                .iter()
                .filter(|id| !listed.contains_key(id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                self.containers.remove(&id);
                if let Some(p) = self.pods.get_mut(&rp.id) {
                    p.containers.retain(|c| *c != id);
                }
            }
            // Known ones take the runtime's state; unknown regular ones are
            // adopted, in attempt order.
            let mut listed: Vec<&RuntimeContainer> = rp.containers.iter().collect();
            listed.sort_by_key(|c| c.attempt);
            for rc in listed {
                if self.containers.contains_key(&rc.id) {
                    if self.merge(now, &rc.id, rc.state) {
                        report.changed += 1;
                    }
                } else if rc.regular {
                    self.adopt(now, &rp.id, rc);
                }
            }
        }
        let pods: Vec<PodId> = self.pods.keys().cloned().collect();
        for pod in pods {
            self.evaluate(now, &pod, &mut out);
        }
        (out, report)
    }

    /// Forget a pod whose sandbox is gone; its held calls are forwarded.
    pub(super) fn forget_pod(&mut self, pod: &str, out: &mut Vec<Action>) {
        if let Some(p) = self.pods.remove(pod) {
            for id in p.containers {
                self.containers.remove(&id);
            }
        }
        self.touched.insert(pod.to_string());
        let calls: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| self.held_pod(h).is_none_or(|p| p == pod))
            .map(|(id, _)| *id)
            .collect();
        for call in calls {
            self.held.remove(&call);
            out.push(Action::Forward(call));
        }
    }

    /// Take the runtime's word for a known container. Returns whether its
    /// state changed.
    pub(super) fn merge(&mut self, now: Instant, id: &str, state: RuntimeState) -> bool {
        let Some(c) = self.containers.get_mut(id) else {
            return false;
        };
        let before = c.state.clone();
        match state {
            // An exit heard from containerd's task events before its CRI
            // wrote it down: a container that exited never runs again.
            RuntimeState::Running if matches!(c.state, State::Exited { .. }) => {}
            RuntimeState::Running => {
                if !matches!(c.state, State::Running) {
                    // Started (by kubelet's call or the shim's own) before
                    // the shim could hear the answer; readiness unknown.
                    c.state = State::Running;
                    c.ready = false;
                }
                c.owed = None;
            }
            RuntimeState::Exited { code } => {
                if !c.done() {
                    c.state = State::Exited { code, at: now };
                }
                c.ready = false;
                c.owed = None;
            }
            RuntimeState::Created => match c.state {
                State::Deferred { .. } | State::NeverStarted { .. } => {}
                // The shim's own start did not get through: still owed.
                State::Starting if c.owed.is_some() => {
                    let d = c.owed.expect("checked");
                    c.state = State::Deferred {
                        since: d.since,
                        deadline: d.deadline,
                        creations: d.creations,
                    };
                }
                // kubelet's start did not get through: kubelet was told so.
                _ => {
                    c.state = State::Created;
                    c.ready = false;
                }
            },
            RuntimeState::Unknown => {}
        }
        if !matches!(c.state, State::Running) {
            c.ready = false;
        }
        if c.done() {
            c.stop_sent = true;
        }
        c.state != before
    }

    /// A container of a pod with sidecars that the machine has no record of
    /// (its record was lost, or it was created while the shim was down).
    fn adopt(&mut self, now: Instant, pod: &str, rc: &RuntimeContainer) {
        let Some(p) = self.pods.get_mut(pod) else {
            return;
        };
        let role = match p.spec.sidecar_index(&rc.name) {
            Some(i) => Role::Sidecar(i),
            None => Role::Normal,
        };
        p.containers.push(rc.id.clone());
        p.creations += 1;
        if let Some(g) = rc.grace {
            p.grace = g;
        }
        let state = match rc.state {
            RuntimeState::Created | RuntimeState::Unknown => State::Created,
            RuntimeState::Running => State::Running,
            RuntimeState::Exited { code } => State::Exited { code, at: now },
        };
        let done = matches!(state, State::Exited { .. });
        self.containers.insert(
            rc.id.clone(),
            Container {
                pod: pod.to_string(),
                name: rc.name.clone(),
                role,
                pre_stop: rc.pre_stop.clone(),
                state,
                ready: false,
                stopped_by_shim: false,
                stop_sent: done,
                owed: None,
                stop_request: None,
                stop_after_start: None,
            },
        );
    }
}

/// The reasons the machine gives never-started containers (a record carries
/// the text; the machine keeps a `&'static str`).
fn never_started_reason(reason: &str) -> &'static str {
    match reason {
        "SidecarNotReady" => "SidecarNotReady",
        _ => "NeverStarted",
    }
}
