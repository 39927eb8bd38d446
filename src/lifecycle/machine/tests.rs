//! Table tests of the machine's rules and property tests of its invariants,
//! driven by a small model of kubelet and the runtime.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::lifecycle::spec::{OnReadyTimeout, PodSpec, ReadyCheck, Restart, RestartPolicy};

fn spec(sidecars: &[&str], restart: Restart, on_timeout: OnReadyTimeout) -> Arc<PodSpec> {
    Arc::new(PodSpec {
        sidecars: sidecars.iter().map(|s| s.to_string()).collect(),
        ready: sidecars
            .iter()
            .map(|s| (s.to_string(), ReadyCheck::Running))
            .collect::<BTreeMap<_, _>>(),
        restart,
        ready_timeout: Duration::from_secs(10),
        on_ready_timeout: on_timeout,
    })
}

/// A test world: the machine plus what happened.
struct World {
    m: Machine,
    now: Instant,
    spec: Arc<PodSpec>,
    next_call: u64,
    /// Container name → latest id.
    ids: HashMap<String, String>,
    /// Every container created: (id, name, attempt).
    all: Vec<(String, String, u32)>,
    answered: HashMap<CallId, usize>,
    actions: Vec<(Instant, Action)>,
    /// The sidecars' preStop hook (kubelet's annotation), if any.
    sidecar_pre_stop: Option<PreStop>,
    /// kubelet's deadline for its StartContainer calls (its
    /// runtime-request-timeout), if the test gives one.
    start_deadline: Option<Duration>,
}

impl World {
    fn new(spec: Arc<PodSpec>) -> World {
        World {
            m: Machine::new(Settings::default()),
            now: Instant::now(),
            spec,
            next_call: 0,
            ids: HashMap::new(),
            all: Vec::new(),
            answered: HashMap::new(),
            actions: Vec::new(),
            sidecar_pre_stop: None,
            start_deadline: None,
        }
    }

    fn feed(&mut self, e: Event) -> Vec<Action> {
        let out = self.m.handle(self.now, e);
        for a in &out {
            match a {
                Action::Forward(c)
                | Action::ForwardStop { call: c, .. }
                | Action::Answer { call: c, .. } => {
                    *self.answered.entry(*c).or_default() += 1;
                }
                _ => {}
            }
            self.actions.push((self.now, a.clone()));
        }
        out
    }

    fn create(&mut self, name: &str) -> String {
        let attempt = self.ids.keys().filter(|n| *n == name).count() as u32;
        let id = format!("{name}-{}", self.actions.len() + self.next_call as usize);
        self.next_call += 1;
        self.ids.insert(name.to_string(), id.clone());
        self.all.push((id.clone(), name.to_string(), attempt));
        self.feed(Event::Created {
            pod: "pod".into(),
            pod_name: "default/p".into(),
            spec: self.spec.clone(),
            container: id.clone(),
            name: name.into(),
            attempt,
            pre_stop: self.pre_stop_of(name),
            grace: Some(Duration::from_secs(30)),
        });
        id
    }

    fn pre_stop_of(&self, name: &str) -> Option<PreStop> {
        self.sidecar_pre_stop
            .clone()
            .filter(|_| name.starts_with('s'))
    }

    fn call(&mut self) -> CallId {
        self.next_call += 1;
        CallId(self.next_call)
    }

    fn start(&mut self, name: &str) -> (CallId, Vec<Action>) {
        let call = self.call();
        let id = self.ids[name].clone();
        (
            call,
            self.feed(Event::StartCalled {
                call,
                container: id,
                deadline: self.start_deadline.map(|d| self.now + d),
            }),
        )
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.feed(Event::Tick)
    }

    /// The shim restarts: a new machine restored from the records (through
    /// their JSON, as on disk), reconciled with `runtime`.
    fn crash(&mut self, runtime: Vec<RuntimePod>) -> (Vec<Action>, Reconciled) {
        let clock = WallClock::at(self.now, std::time::SystemTime::now());
        let records: Vec<Vec<u8>> = self
            .m
            .pod_ids()
            .iter()
            .filter_map(|p| self.m.record(p, &clock))
            .map(|r| serde_json::to_vec(&r).expect("encodes"))
            .collect();
        let mut m = Machine::new(self.m.settings.clone());
        for r in records {
            m.restore(
                self.now,
                &clock,
                serde_json::from_slice(&r).expect("decodes"),
            );
        }
        self.m = m;
        let (out, report) = self.m.reconcile(self.now, runtime);
        for a in &out {
            self.actions.push((self.now, a.clone()));
        }
        (out, report)
    }

    /// The runtime's view of the one pod: `state` per container id.
    fn runtime(&self, state: impl Fn(&str) -> RuntimeState) -> Vec<RuntimePod> {
        vec![RuntimePod {
            id: "pod".into(),
            name: "default/p".into(),
            spec: Some(self.spec.clone()),
            containers: self
                .all
                .iter()
                .map(|(id, name, attempt)| RuntimeContainer {
                    id: id.clone(),
                    name: name.clone(),
                    attempt: *attempt,
                    state: state(id),
                    pre_stop: self.pre_stop_of(name),
                    grace: Some(Duration::from_secs(30)),
                    regular: true,
                })
                .collect(),
        }]
    }

    fn started(&mut self, name: &str) -> Vec<Action> {
        let id = self.ids[name].clone();
        self.feed(Event::StartDone {
            container: id,
            ok: true,
        })
    }

    /// Create and start each container in turn, as kubelet does, its start
    /// landing; a sidecar gets ready.
    fn bring_up(&mut self, names: &[&str]) {
        for name in names {
            self.create(name);
            self.start(name);
            self.started(name);
            if self.spec.sidecars.iter().any(|s| s == name) {
                self.ready(name);
            }
        }
    }

    fn ready(&mut self, name: &str) -> Vec<Action> {
        let id = self.ids[name].clone();
        self.feed(Event::Ready { container: id })
    }

    fn exited(&mut self, name: &str, code: i32) -> Vec<Action> {
        let id = self.ids[name].clone();
        self.feed(Event::Exited {
            container: id,
            code,
        })
    }

    fn stop(&mut self, name: &str, timeout: Duration) -> (CallId, Vec<Action>) {
        let call = self.call();
        let id = self.ids[name].clone();
        (
            call,
            self.feed(Event::StopCalled {
                call,
                container: id,
                timeout,
                deadline: None,
            }),
        )
    }
}

fn stops_of(actions: &[Action], container: &str) -> Vec<Duration> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop {
                container: c,
                timeout,
            } if c == container => Some(*timeout),
            _ => None,
        })
        .collect()
}

fn forwarded(actions: &[Action], call: CallId) -> bool {
    actions.contains(&Action::Forward(call))
}

#[test]
fn sidecar_first_start_is_held_until_ready() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = w.create("proxy");
    let (c, out) = w.start("proxy");
    assert!(forwarded(&out, c), "{out:?}");
    w.feed(Event::StartDone {
        container: proxy.clone(),
        ok: true,
    });
    w.create("app");
    let (app_call, out) = w.start("app");
    assert!(!forwarded(&out, app_call), "held until ready: {out:?}");
    assert_eq!(w.m.probes(), vec![(proxy.clone(), "pod".to_string())]);
    let out = w.feed(Event::Ready { container: proxy });
    assert!(forwarded(&out, app_call), "{out:?}");
}

/// kubelet 1.28 does not cancel a StartContainer when the pod is deleted
/// (observed: the deletion waited for the held start to end): a hold ends
/// after half the pod's grace period (30 s here), answered as a deferral;
/// the container starts once its sidecar is ready. A second app the same
/// sync starts afterwards is deferred at once; once nothing waits any
/// more, a later hold gets its own time.
#[test]
fn a_held_start_is_deferred_after_half_the_grace_period() {
    let answered_ok = |out: &[Action], call: CallId| {
        out.contains(&Action::Answer {
            call,
            result: Ok(()),
        })
    };
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    w.spec = Arc::new(PodSpec {
        ready_timeout: Duration::from_secs(90),
        ..(*w.spec).clone()
    });
    let proxy = w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    let app = w.create("app");
    let (call, out) = w.start("app");
    assert!(
        out.iter()
            .all(|a| !matches!(a, Action::Answer { .. } | Action::Forward(_))),
        "{out:?}"
    );
    assert_eq!(w.m.next_deadline(), Some(w.now + Duration::from_secs(15)));
    let out = w.advance(Duration::from_millis(14_900));
    assert!(!answered_ok(&out, call), "still held: {out:?}");
    let out = w.advance(Duration::from_millis(100));
    assert!(answered_ok(&out, call), "deferred at 15 s: {out:?}");
    assert!(matches!(
        w.m.status_override(&app),
        Some(StatusOverride::Running { .. })
    ));
    // The next app of the same sync is not held again.
    let app2 = w.create("app2");
    let (call2, out) = w.start("app2");
    assert!(answered_ok(&out, call2), "deferred at once: {out:?}");
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(app.clone())), "{out:?}");
    assert!(out.contains(&Action::Start(app2.clone())), "{out:?}");
    w.started("app");
    w.started("app2");
    // The proxy restarts later; an app restarted meanwhile is held anew.
    w.exited("proxy", 1);
    w.exited("app", 1);
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.create("app");
    let (call3, out) = w.start("app");
    assert!(!answered_ok(&out, call3), "held anew: {out:?}");
    let out = w.advance(Duration::from_secs(14));
    assert!(!answered_ok(&out, call3), "{out:?}");
    let _ = proxy;
}

/// A held start that runs into its ready-timeout before half the grace
/// period is refused as before (`fail`).
#[test]
fn a_short_ready_timeout_still_refuses_a_held_start() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.create("app");
    let (call, _) = w.start("app");
    let out = w.advance(Duration::from_secs(10));
    let refused = out
        .iter()
        .any(|a| matches!(a, Action::Answer { call: c, result: Err(_) } if *c == call));
    assert!(refused, "{out:?}");
}

#[test]
fn app_first_start_is_deferred_and_reads_as_running() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let app = w.create("app");
    let (c, out) = w.start("app");
    assert!(
        out.contains(&Action::Answer {
            call: c,
            result: Ok(())
        }),
        "{out:?}"
    );
    assert!(matches!(
        w.m.status_override(&app),
        Some(StatusOverride::Running { .. })
    ));
    assert!(w.m.exec_refusal(&app).is_some());
    let proxy = w.create("proxy");
    let (c, out) = w.start("proxy");
    assert!(forwarded(&out, c));
    w.feed(Event::StartDone {
        container: proxy.clone(),
        ok: true,
    });
    let out = w.feed(Event::Ready { container: proxy });
    assert!(out.contains(&Action::Start(app.clone())), "{out:?}");
    w.feed(Event::StartDone {
        container: app.clone(),
        ok: true,
    });
    assert_eq!(w.m.status_override(&app), None);
}

#[test]
fn ready_timeout_fail_refuses_and_reads_as_exited() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = w.create("proxy");
    let (c, _) = w.start("proxy");
    let _ = c;
    w.feed(Event::StartDone {
        container: proxy,
        ok: true,
    });
    let app = w.create("app");
    let (c, _) = w.start("app");
    let out = w.advance(Duration::from_secs(11));
    let refused = out.iter().any(|a| matches!(a, Action::Answer { call, result: Err(r) } if *call == c && r.message.contains("proxy")));
    assert!(refused, "{out:?}");
    assert!(matches!(
        w.m.status_override(&app),
        Some(StatusOverride::Exited { code: 128, .. })
    ));
}

/// kubelet's start of main lost its answer with the runtime's connection
/// (containerd killed under it): main is neither running nor exited until
/// the runtime is read. containerd that comes back with main still created
/// makes kubelet create a new attempt; the Job is complete only when that
/// one exits, and the sidecar is stopped only then.
#[test]
fn a_lost_start_answer_is_read_before_the_job_counts_as_done() {
    let stop_sent = |out: &[Action]| out.iter().any(|a| matches!(a, Action::Stop { .. }));
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.ready("proxy");
    let first = w.create("main");
    w.start("main");
    let out = w.feed(Event::StartLost {
        container: first.clone(),
    });
    assert!(out.contains(&Action::Read(first.clone())), "{out:?}");
    let out = w.advance(Duration::from_secs(5));
    assert!(!stop_sent(&out), "{out:?}");
    assert!(
        w.m.is_running(&first),
        "a start of unknown outcome counts as starting"
    );
    let out = w.feed(Event::Observed {
        container: first,
        state: RuntimeState::Created,
    });
    assert!(!stop_sent(&out), "{out:?}");
    assert!(!stop_sent(&w.advance(Duration::from_secs(5))));
    w.create("main");
    w.start("main");
    w.started("main");
    assert!(!stop_sent(&w.advance(Duration::from_secs(5))));
    let mut out = w.exited("main", 0);
    out.extend(w.advance(Duration::from_secs(2)));
    let proxy = w.ids["proxy"].clone();
    assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
}

/// The same lost answer, and the runtime had started main, which exited
/// meanwhile: the Job is done as soon as that is read.
#[test]
fn a_lost_start_answer_read_as_exited_completes_the_job() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.ready("proxy");
    let main = w.create("main");
    w.start("main");
    w.feed(Event::StartLost {
        container: main.clone(),
    });
    w.advance(Duration::from_secs(5));
    let mut out = w.feed(Event::Observed {
        container: main,
        state: RuntimeState::Exited { code: 0 },
    });
    out.extend(w.advance(Duration::from_secs(2)));
    let proxy = w.ids["proxy"].clone();
    assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
}

#[test]
fn job_completion_stops_sidecars_in_reverse_and_rewrites_exit() {
    let mut w = World::new(spec(
        &["a", "b"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    for s in ["a", "b"] {
        let id = w.create(s);
        w.start(s);
        w.feed(Event::StartDone {
            container: id.clone(),
            ok: true,
        });
        w.feed(Event::Ready { container: id });
    }
    let main = w.create("main");
    w.start("main");
    w.feed(Event::StartDone {
        container: main.clone(),
        ok: true,
    });
    w.advance(Duration::from_secs(2));
    assert!(w.m.watched().contains(&main));
    let out = w.feed(Event::Exited {
        container: main,
        code: 1,
    });
    let b = w.ids["b"].clone();
    let a = w.ids["a"].clone();
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Stop { container, .. } if *container == b)),
        "{out:?}"
    );
    assert!(!out
        .iter()
        .any(|x| matches!(x, Action::Stop { container, .. } if *container == a)));
    let out = w.feed(Event::Exited {
        container: b.clone(),
        code: 143,
    });
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Stop { container, .. } if *container == a)),
        "{out:?}"
    );
    assert!(matches!(
        w.m.status_override(&b),
        Some(StatusOverride::IfExited { code: 0, .. })
    ));
}

/// A Job pod (Never) whose app never started (its sidecar never got
/// ready, `fail`): kubelet reads the app as exited 128, so the Job is done
/// and the sidecar is stopped. (Found by the property test's invariant 7:
/// before, the pod ran on with its sidecar.)
#[test]
fn a_job_whose_app_never_started_stops_its_sidecar() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    let proxy = w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.create("app");
    w.start("app");
    let mut out = w.advance(Duration::from_secs(10));
    out.extend(w.advance(Duration::from_secs(5)));
    assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
}

/// Job completion while kubelet's start of a sidecar (a new attempt,
/// OnFailure) is on its way to the runtime: the sidecar is stopped once
/// that start has landed, not before (a stop then would find it created,
/// and the start would run it on). Found by the property test.
#[test]
fn a_sidecar_whose_start_is_on_its_way_is_stopped_once_it_has_landed() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::OnFailure),
        OnReadyTimeout::Fail,
    ));
    w.bring_up(&["proxy", "app"]);
    w.exited("proxy", 1);
    let proxy = w.create("proxy");
    w.start("proxy");
    w.advance(Duration::from_secs(3));
    let mut out = w.exited("app", 0);
    out.extend(w.advance(Duration::from_secs(3)));
    assert!(
        stops_of(&out, &proxy).is_empty(),
        "not before its start landed: {out:?}"
    );
    let out = w.started("proxy");
    assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
}

/// kubelet kills a deferred app alone (its HTTP liveness probe failed, or
/// its postStart hook, on kubelet v1.28.7) and makes a new attempt: the
/// pod is not shutting down, and the new attempt starts once the proxy is
/// ready. (Before, the first stop marked the pod as shutting down for
/// good, and the new attempt waited out its ready-timeout.)
#[test]
fn an_app_killed_alone_while_deferred_starts_again_once_its_sidecar_is_ready() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    w.spec = Arc::new(PodSpec {
        ready_timeout: Duration::from_secs(90),
        ..(*w.spec).clone()
    });
    w.create("app");
    w.start("app");
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    w.advance(Duration::from_secs(3));
    w.stop("app", Duration::from_secs(30));
    let app = w.create("app");
    let (call, _) = w.start("app");
    // Held (the proxy runs), then deferred after half the grace period.
    let out = w.advance(Duration::from_secs(15));
    assert!(
        out.contains(&Action::Answer {
            call,
            result: Ok(())
        }),
        "deferred: {out:?}"
    );
    w.advance(Duration::from_secs(2));
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(app)), "{out:?}");
}

/// A Job pod (Never) whose app kubelet killed alone (a failed liveness
/// probe) and whose worker then exits: both are terminal, the Job is done
/// and the sidecar is stopped. (Found by the property test: the app's stop
/// counted as the start of a deletion, which held Job completion back for
/// good.)
#[test]
fn a_job_whose_app_was_killed_alone_completes() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    w.bring_up(&["proxy", "app", "worker"]);
    let proxy = w.ids["proxy"].clone();
    w.advance(Duration::from_secs(3));
    let (call, out) = w.stop("app", Duration::from_secs(30));
    assert!(forwarded(&out, call), "{out:?}");
    w.exited("app", 137);
    let mut out = w.exited("worker", 0);
    out.extend(w.advance(Duration::from_secs(5)));
    assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
}

#[test]
fn lone_sidecar_stop_goes_ahead_after_the_evidence_window() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = w.create("proxy");
    w.start("proxy");
    w.feed(Event::StartDone {
        container: proxy.clone(),
        ok: true,
    });
    w.feed(Event::Ready {
        container: proxy.clone(),
    });
    let app = w.create("app");
    w.start("app");
    w.feed(Event::StartDone {
        container: app,
        ok: true,
    });
    let call = w.call();
    let out = w.feed(Event::StopCalled {
        call,
        container: proxy,
        timeout: Duration::from_secs(30),
        deadline: None,
    });
    assert!(!out.iter().any(|a| matches!(a, Action::ForwardStop { .. })));
    let out = w.advance(Duration::from_millis(2100));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::ForwardStop { call: c, .. } if *c == call)),
        "{out:?}"
    );
}

#[test]
fn unknown_containers_are_forwarded() {
    let mut m = Machine::new(Settings::default());
    let now = Instant::now();
    let out = m.handle(
        now,
        Event::StartCalled {
            call: CallId(1),
            container: "x".into(),
            deadline: None,
        },
    );
    assert_eq!(out, vec![Action::Forward(CallId(1))]);
    let out = m.handle(
        now,
        Event::StopCalled {
            call: CallId(2),
            container: "x".into(),
            timeout: Duration::from_secs(2),
            deadline: None,
        },
    );
    assert_eq!(out, vec![Action::Forward(CallId(2))]);
}

/// One step of the random scenario.
#[derive(Clone, Debug)]
enum Step {
    Create(usize),
    Start(usize),
    Ready(usize),
    Exit(usize, i32),
    /// Pod deletion: kubelet stops every running container at once.
    Delete,
    StopOne(usize),
    Advance(u64),
    /// The shim restarts (held calls fail; the state is restored from its
    /// records and reconciled with the runtime). With true, the starts and
    /// stops it had sent reached the runtime (their answers were lost); with
    /// false, they were lost with it.
    Crash(bool),
    /// containerd restarts while kubelet's starts are on their way: their
    /// answers are lost ([`Event::StartLost`]). With true the starts had
    /// landed; with false the containers are still created, and kubelet,
    /// told the start failed, makes new attempts.
    RuntimeRestart(bool),
    /// The next start to reach the model's runtime fails there (the
    /// container exits 128 without having run).
    FailNextStart,
    /// kubelet's deadline for its held start passes: the call is
    /// cancelled ([`Event::Cancelled`]), the container stays created, and
    /// kubelet makes a new attempt.
    CancelHeld,
    /// kubelet's garbage collection removes an exited container.
    Remove(usize),
    /// kubelet stops the pod's sandbox (after its stops, or with
    /// containers still running): the runtime kills what still runs in it
    /// once the call reaches it.
    StopPod,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4usize).prop_map(Step::Create),
        (0..5usize).prop_map(Step::Start),
        (0..2usize).prop_map(Step::Ready),
        ((0..5usize), prop_oneof![Just(0), Just(1), Just(143)]).prop_map(|(c, e)| Step::Exit(c, e)),
        Just(Step::Delete),
        (0..4usize).prop_map(Step::StopOne),
        (1..5000u64).prop_map(Step::Advance),
        any::<bool>().prop_map(Step::Crash),
        any::<bool>().prop_map(Step::RuntimeRestart),
        Just(Step::FailNextStart),
        Just(Step::CancelHeld),
        (0..5usize).prop_map(Step::Remove),
        Just(Step::StopPod),
    ]
}

fn restart() -> impl Strategy<Value = Restart> {
    prop_oneof![
        Just(Restart::Explicit(RestartPolicy::Never)),
        Just(Restart::Explicit(RestartPolicy::OnFailure)),
        Just(Restart::Explicit(RestartPolicy::Always)),
        Just(Restart::JobDefault),
        Just(Restart::Default),
    ]
}

/// The pod's containers; the last is an init container (created first when
/// the case has one, see `with_init`).
const NAMES: [&str; 5] = ["s0", "s1", "app", "worker", "init"];
const INIT: usize = 4;

fn is_sidecar(name: &str) -> bool {
    name.starts_with('s')
}

/// The model's own knowledge of which containers are init containers (the
/// machine has to guess it from what kubelet does).
fn is_init(name: &str) -> bool {
    name == NAMES[INIT]
}

fn name_of(id: &str) -> String {
    id.split('-').next().unwrap_or("").to_string()
}

/// kubelet's killPod in the model: StopContainer (timeout 30 s) for every
/// container that reads as running (really running, deferred, or the shim's
/// start on its way), normal ones first or, with `sidecars_first`, sidecars
/// first (kubelet sends them from one goroutine each, in no set order; the
/// evidence window exists for a sidecar's stop that comes first). Records
/// the calls; returns the machine's actions.
fn kill_pod(
    w: &mut World,
    sidecars_first: bool,
    running: &HashMap<String, bool>,
    calls: &mut Vec<CallId>,
    pre_stops: &mut HashMap<CallId, String>,
    stops: &mut HashMap<CallId, (String, Instant, Duration)>,
    wishes: &mut HashMap<String, (Instant, Duration)>,
) -> Vec<Action> {
    let mut ids: Vec<String> = w.all.iter().map(|(id, ..)| id.clone()).collect();
    ids.sort_by_key(|id| is_sidecar(&name_of(id)) != sidecars_first);
    let mut out = Vec::new();
    for id in ids {
        let reads_running = running.get(&id).copied().unwrap_or(false)
            || matches!(
                w.m.status_override(&id),
                Some(StatusOverride::Running { .. })
            );
        if !reads_running {
            continue;
        }
        let call = w.call();
        calls.push(call);
        if w.pre_stop_of(&name_of(&id)).is_some() {
            // An exec preStop hook first (ExecSync, timeout 0); kubelet's
            // StopContainer follows once it returned (below).
            pre_stops.insert(call, id.clone());
            wish(wishes, &id, w.now, Duration::from_secs(30));
            out.extend(w.feed(Event::PreStopCalled {
                call,
                container: id,
            }));
            continue;
        }
        stops.insert(call, (id.clone(), w.now, Duration::from_secs(30)));
        wish(wishes, &id, w.now, Duration::from_secs(30));
        out.extend(w.feed(Event::StopCalled {
            call,
            container: id,
            timeout: Duration::from_secs(30),
            deadline: None,
        }));
    }
    out
}

/// Whether one of kubelet's starts is held (not answered yet): kubelet's
/// sync of the pod waits on it.
fn start_held(w: &World, start_calls: &HashMap<CallId, String>) -> bool {
    start_calls
        .keys()
        .any(|c| w.answered.get(c).copied().unwrap_or(0) == 0)
}

/// kubelet asks to stop a container: the first wish's arrival and the
/// shortest timeout stand.
fn wish(wishes: &mut HashMap<String, (Instant, Duration)>, id: &str, now: Instant, t: Duration) {
    let e = wishes.entry(id.to_string()).or_insert((now, t));
    e.1 = e.1.min(t);
}

/// What the model's runtime has yet to carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Land {
    /// kubelet's start, forwarded: kubelet waits for its answer.
    KubeletStart,
    /// The shim's own start of a deferred container.
    ShimStart,
    /// A stop: the container exits.
    Exit,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Invariants over random event orders:
    /// 1. a normal container never really starts while a sidecar is not
    ///    running and ready, unless its ready-timeout ran out;
    /// 2. during pod deletion no sidecar gets its stop from the shim while a
    ///    normal container runs, unless that stop's grace ran out;
    /// 3. every held call is answered exactly once, at the latest once
    ///    enough time has passed (a restart of the shim answers the calls
    ///    it held with an error);
    /// 4. a start answered as done happened, or reads as never started;
    /// 5. an init container answered as started really starts;
    /// 6. a pod deleted while one of kubelet's starts is held (kubelet's kill
    ///    waits for it) gets that start answered within half its grace
    ///    period, whatever its ready-timeout;
    /// and all of this across restarts of the shim at any step. Which
    /// containers are init containers is the model's knowledge (`is_init`),
    /// never the machine's guess; kubelet's sync is one goroutine (nothing
    /// else while a start is held) and goes on after a regular container
    /// ([`Event::PodWork`]), never after an init container.
    #[test]
    fn invariants(random in proptest::collection::vec(step(), 1..60), restart in restart(), start_on_timeout in any::<bool>(), warm in any::<bool>(), with_init in any::<bool>(), sidecars_first in any::<bool>(), long_timeout in any::<bool>(), job in any::<bool>(), pre_stop in any::<bool>(), short_deadline in any::<bool>()) {
        // Half the cases start from a pod that came up normally, so that
        // shutdown and Job completion are reached often. Some have an init
        // container: kubelet creates it first and creates nothing else until
        // it exited.
        let mut steps = Vec::new();
        if with_init {
            steps.push(Step::Create(INIT));
            steps.push(Step::Start(INIT));
            if warm {
                // Its deferred start is sent after 2 s and lands with the
                // next step that lets time pass.
                steps.push(Step::Advance(2_500));
                steps.push(Step::Advance(1));
                steps.push(Step::Exit(INIT, 0));
            }
        }
        if warm {
            for i in 0..4 {
                // (A start lands with the next step that lets time pass.)
                steps.extend([Step::Create(i), Step::Start(i), Step::Advance(1)]);
                // (With kubelet's short deadline the sidecars get ready
                // only later, if at all: the apps' starts are held.)
                if i < 2 && !short_deadline {
                    steps.push(Step::Ready(i));
                }
            }
        }
        // Half the cases are Job pods (Never) that nobody deletes, so that
        // Job completion is reached often.
        let restart = if job { Restart::Explicit(RestartPolicy::Never) } else { restart };
        steps.extend(random.into_iter().filter(|s| !job || !matches!(s, Step::Delete)));
        // Enough time for every bound to pass; in a Job, the normal
        // containers that run then finish.
        // (kubelet's sync makes and starts what is missing, first).
        if job {
            for i in 0..4 {
                steps.extend([Step::Create(i), Step::Start(i), Step::Advance(1)]);
                if i < 2 {
                    steps.push(Step::Ready(i));
                }
            }
            steps.extend([Step::Advance(200_000), Step::Advance(1), Step::Exit(2, 0), Step::Exit(3, 1)]);
        }
        steps.extend((0..5).map(|_| Step::Advance(200_000)));
        let on_timeout = if start_on_timeout { OnReadyTimeout::Start } else { OnReadyTimeout::Fail };
        let mut w = World::new(spec(&["s0", "s1"], restart, on_timeout));
        // A ready-timeout shorter than half the grace period (30 s), or
        // longer: then held starts end as deferrals.
        let ready_timeout = Duration::from_secs(if long_timeout { 60 } else { 10 });
        w.spec = Arc::new(PodSpec { ready_timeout, ..(*w.spec).clone() });
        // A deletion kubelet has to put off until its held start returns.
        let mut delete_at: Option<Instant> = None;
        // Starts answered by a restart of the shim (no action says so).
        let mut failed_at: HashMap<CallId, Instant> = HashMap::new();
        // Containers whose start kubelet saw fail (refused, cancelled,
        // failed in the runtime): it makes a new attempt.
        let mut refused: std::collections::HashSet<String> = Default::default();
        let mut fail_next_start = false;
        let mut stop_pod_calls: Vec<CallId> = Vec::new();
        // kubelet's preStop hooks of sidecars: call → container.
        let mut pre_stops: HashMap<CallId, String> = HashMap::new();
        if pre_stop {
            w.sidecar_pre_stop = Some(PreStop::Exec(vec!["drain".into()]));
        }
        // A kubelet whose runtime-request-timeout (8 s) is shorter than the
        // ready-timeout and the hold: its starts are answered before it.
        if short_deadline {
            w.start_deadline = Some(Duration::from_secs(8));
        }
        let mut start_sent: HashMap<CallId, Instant> = HashMap::new();
        // The model's truth: which container ids really run, sidecar readiness.
        let mut running: HashMap<String, bool> = HashMap::new();
        let mut ready: HashMap<String, bool> = HashMap::new();
        let mut calls: Vec<CallId> = Vec::new();
        // Start calls / deferrals: when the container began waiting.
        let mut waiting_since: HashMap<String, Instant> = HashMap::new();
        let mut deleting = false;
        // Held sidecar stops: call → (container, arrived, timeout).
        let mut stops: HashMap<CallId, (String, Instant, Duration)> = HashMap::new();
        let mut start_calls: HashMap<CallId, String> = HashMap::new();
        let mut deferred: std::collections::HashSet<String> = Default::default();
        let mut exited: std::collections::HashSet<String> = Default::default();
        let mut codes: HashMap<String, i32> = HashMap::new();
        // kubelet's first stop of each container: (arrived, timeout).
        let mut wishes: HashMap<String, (Instant, Duration)> = HashMap::new();
        // Starts and stops sent to the runtime, not carried out yet: they
        // land with the next step that lets time pass. (true: a start.)
        let mut landing: Vec<(Land, String)> = Vec::new();


        for s in steps {
            let out = match s {
                Step::Create(i) => {
                    let name = NAMES[i];
                    // kubelet creates a new attempt only when the latest one
                    // is not running and no start of it is under way, and
                    // no regular container before the init container exited.
                    let live = w.ids.get(name).is_some_and(|id| running.contains_key(id) && !exited.contains(id) && !refused.contains(id));
                    // An ended attempt is made again as the restart policy says.
                    let again = w.ids.get(name).is_none_or(|id| {
                        let failed = refused.contains(id) || codes.get(id).is_some_and(|c| *c != 0);
                        match restart {
                            Restart::Explicit(RestartPolicy::Never) => !exited.contains(id) && !refused.contains(id),
                            Restart::Explicit(RestartPolicy::OnFailure) | Restart::JobDefault => failed || !exited.contains(id),
                            _ => true,
                        }
                    });
                    if !again { continue; }
                    let init_pending = with_init && i != INIT && !w.ids.get(NAMES[INIT]).is_some_and(|id| exited.contains(id));
                    // kubelet's sync of the pod is one goroutine: it creates
                    // nothing while one of its starts is held.
                    let start_held = start_held(&w, &start_calls);
                    if live || deleting || init_pending || start_held { continue; }
                    w.create(name);
                    continue;
                }
                Step::Start(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    // kubelet starts nothing in a pod being deleted, nor
                    // while another of its starts is held.
                    let start_held = start_held(&w, &start_calls);
                    if running.contains_key(&id) || exited.contains(&id) || refused.contains(&id) || deleting || start_held { continue; }
                    let (call, mut out) = w.start(NAMES[i]);
                    start_sent.insert(call, w.now);
                    calls.push(call);
                    start_calls.insert(call, id.clone());
                    running.insert(id.clone(), false);
                    waiting_since.insert(id, w.now);
                    // After a regular container kubelet goes on at once to
                    // the next one it has not created (its image pull may
                    // take minutes); after an init container it waits.
                    // (the next: a container it has not created, or whose
                    // latest attempt never started and is made again).
                    let next = NAMES[..INIT].iter().any(|n| {
                        *n != NAMES[i]
                            && w.ids.get(*n).is_none_or(|id| !running.contains_key(id) && !exited.contains(id))
                    });
                    if !is_init(NAMES[i]) && next && w.answered.contains_key(&call) {
                        out.extend(w.feed(Event::PodWork { pod: "pod".into() }));
                    }
                    out
                }
                Step::Ready(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if !running.get(&id).copied().unwrap_or(false) { continue; }
                    ready.insert(id.clone(), true);
                    w.feed(Event::Ready { container: id })
                }
                Step::Exit(i, code) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if !running.get(&id).copied().unwrap_or(false) { continue; }
                    running.remove(&id);
                    ready.remove(&id);
                    exited.insert(id.clone());
                    codes.insert(id.clone(), code);
                    w.feed(Event::Exited { container: id, code })
                }
                Step::Delete => {
                    // kubelet's kill waits for the sync in progress: while
                    // one of its starts is held, it comes once that start
                    // returns (below).
                    if deleting || delete_at.is_some() { continue; }
                    delete_at = Some(w.now);
                    Vec::new()
                }
                Step::StopOne(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if !running.get(&id).copied().unwrap_or(false) || deleting { continue; }
                    let call = w.call();
                    calls.push(call);
                    stops.insert(call, (id.clone(), w.now, Duration::from_secs(5)));
                    wish(&mut wishes, &id, w.now, Duration::from_secs(5));
                    w.feed(Event::StopCalled { call, container: id, timeout: Duration::from_secs(5), deadline: None })
                }
                Step::Advance(ms) => {
                    let mut out = Vec::new();
                    let mut ms = ms;
                    for (kind, id) in std::mem::take(&mut landing) {
                        if kind != Land::Exit && std::mem::take(&mut fail_next_start) {
                            running.remove(&id);
                            exited.insert(id.clone());
                            codes.insert(id.clone(), 128);
                            deferred.remove(&id);
                            out.extend(w.feed(Event::StartDone { container: id, ok: false }));
                        } else if kind != Land::Exit {
                            running.insert(id.clone(), true);
                            deferred.remove(&id);
                            out.extend(w.feed(Event::StartDone { container: id, ok: true }));
                        } else if running.get(&id).copied().unwrap_or(false) {
                            running.remove(&id);
                            ready.remove(&id);
                            exited.insert(id.clone());
                            codes.insert(id.clone(), 143);
                            out.extend(w.feed(Event::Exited { container: id, code: 143 }));
                        }
                    }
                    // Time passes in steps of at most a second, so that what
                    // the machine does at a deadline happens about then.
                    while ms > 0 {
                        let d = ms.min(1_000);
                        ms -= d;
                        out.extend(w.advance(Duration::from_millis(d)));
                    }
                    out
                }
                Step::FailNextStart => {
                    fail_next_start = true;
                    continue;
                }
                Step::CancelHeld => {
                    let held: Vec<CallId> = start_calls.keys().filter(|c| w.answered.get(c).copied().unwrap_or(0) == 0).copied().collect();
                    let mut out = Vec::new();
                    for call in held {
                        w.answered.insert(call, 1);
                        failed_at.insert(call, w.now);
                        let id = start_calls[&call].clone();
                        running.remove(&id);
                        refused.insert(id);
                        out.extend(w.feed(Event::Cancelled { call }));
                    }
                    out
                }
                Step::StopPod => {
                    // kubelet's pod worker is busy while a start is held.
                    if start_held(&w, &start_calls) { continue; }
                    // kubelet creates nothing in a pod whose sandbox it stops.
                    deleting = true;
                    let call = w.call();
                    calls.push(call);
                    stop_pod_calls.push(call);
                    w.feed(Event::StopPodCalled { call, pod: "pod".into(), deadline: None })
                }
                Step::Remove(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if !exited.contains(&id) && !refused.contains(&id) { continue; }
                    w.feed(Event::ContainerRemoved { container: id })
                }
                Step::RuntimeRestart(landed) => {
                    let mut out = Vec::new();
                    let (kubelets, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut landing).into_iter().partition(|(k, _)| *k == Land::KubeletStart);
                    landing = rest;
                    for (_, id) in kubelets {
                        if landed {
                            running.insert(id.clone(), true);
                        } else {
                            running.remove(&id);
                        }
                        out.extend(w.feed(Event::StartLost { container: id }));
                    }
                    out
                }
                Step::Crash(landed) => {
                    // The calls it held fail with the connection; kubelet
                    // makes a new attempt of a container whose start failed.
                    for c in &calls {
                        if w.answered.get(c).copied().unwrap_or(0) == 0 {
                            failed_at.insert(*c, w.now);
                            if let Some(id) = start_calls.get(c) {
                                if !running.get(id).copied().unwrap_or(false) {
                                    running.remove(id);
                                }
                            }
                        }
                        w.answered.entry(*c).or_insert(1);
                    }
                    for (kind, id) in std::mem::take(&mut landing) {
                        if !landed {
                            // The start never happened: kubelet sees the
                            // container CREATED and makes a new attempt
                            // (unless it was told the start happened).
                            if kind != Land::Exit && !deferred.contains(&id) {
                                running.remove(&id);
                            }
                            continue;
                        }
                        if kind != Land::Exit {
                            running.insert(id.clone(), true);
                            deferred.remove(&id);
                        } else if running.get(&id).copied().unwrap_or(false) {
                            running.remove(&id);
                            ready.remove(&id);
                            exited.insert(id.clone());
                            codes.insert(id.clone(), 143);
                        }
                    }
                    let view = w.runtime(|id| {
                        if running.get(id).copied().unwrap_or(false) {
                            RuntimeState::Running
                        } else if exited.contains(id) {
                            RuntimeState::Exited { code: codes.get(id).copied().unwrap_or(143) }
                        } else {
                            RuntimeState::Created
                        }
                    });
                    let (mut out, _) = w.crash(view);
                    if deleting {
                        // kubelet's killPod failed with the connection: it
                        // tries again.
                        out.extend(kill_pod(&mut w, sidecars_first, &running, &mut calls, &mut pre_stops, &mut stops, &mut wishes));
                    }
                    out
                }
            };
            // Apply the actions to the model and check the invariants.
            let mut queue = out;
            loop {
                while let Some(a) = queue.pop() {
                    // The shim reads a container whose start's answer was lost:
                    // the model's runtime says what it knows.
                    if let Action::Read(id) = &a {
                        let state = if running.get(id).copied().unwrap_or(false) {
                            RuntimeState::Running
                        } else if exited.contains(id) {
                            RuntimeState::Exited { code: codes.get(id).copied().unwrap_or(143) }
                        } else {
                            RuntimeState::Created
                        };
                        queue.extend(w.feed(Event::Observed { container: id.clone(), state }));
                        continue;
                    }
                    if let Action::Answer { call, result: Ok(()) } = &a {
                        if let Some(id) = start_calls.get(call) {
                            deferred.insert(id.clone());
                        }
                    }
                    if let Action::Answer { call, result: Err(_) } = &a {
                        if let Some(id) = start_calls.get(call) {
                            if !running.get(id).copied().unwrap_or(false) {
                                running.remove(id);
                                refused.insert(id.clone());
                            }
                        }
                    }
                    let started = match &a {
                        Action::Forward(c) => start_calls.get(c).cloned(),
                        Action::Start(id) => Some(id.clone()),
                        _ => None,
                    };
                    if let Some(id) = started {
                        let name = name_of(&id);
                        let needed: Vec<&str> = if is_sidecar(&name) {
                            ["s0", "s1"].into_iter().take_while(|s| *s != name).collect()
                        } else {
                            vec!["s0", "s1"]
                        };
                        let all_ready = needed.iter().all(|s| w.ids.get(*s).is_some_and(|sid| ready.get(sid).copied().unwrap_or(false) && running.get(sid).copied().unwrap_or(false)));
                        let timed_out = waiting_since.get(&id).is_some_and(|t| w.now >= *t + ready_timeout - Duration::from_millis(1));
                        prop_assert!(all_ready || timed_out || is_init(&name), "{name} started with sidecars not ready at {:?}", w.now);
                        let kind = if matches!(a, Action::Start(_)) { Land::ShimStart } else { Land::KubeletStart };
                        landing.push((kind, id));
                    }
                    // A sidecar's preStop hook runs (held until the apps
                    // exited, or its grace ran out); kubelet's StopContainer
                    // of it follows at once.
                    if let Action::Forward(c) = &a {
                        if let Some(id) = pre_stops.get(c).cloned() {
                            if running.get(&id).copied().unwrap_or(false) {
                                let normal_running = running.iter().any(|(cid, r)| *r && !is_sidecar(&name_of(cid)) && !is_init(&name_of(cid)));
                                let grace_out = wishes.get(&id).is_some_and(|(arrived, t)| w.now >= *arrived + *t + Duration::from_secs(1));
                                prop_assert!(!normal_running || grace_out, "preStop of {id} ran while a normal container runs: {running:?}");
                            }
                            let call = w.call();
                            calls.push(call);
                            stops.insert(call, (id.clone(), w.now, Duration::from_secs(30)));
                            queue.extend(w.feed(Event::StopCalled { call, container: id, timeout: Duration::from_secs(30), deadline: None }));
                        }
                    }
                    // StopPodSandbox reaches the runtime: what runs dies.
                    if let Action::Forward(c) = &a {
                        if stop_pod_calls.contains(c) {
                            for (id, r) in &running {
                                if *r {
                                    landing.push((Land::Exit, id.clone()));
                                }
                            }
                        }
                    }
                    let stopped = match &a {
                        // A repeated stop shares the first one's wait.
                        Action::ForwardStop { call, .. } | Action::Forward(call) => stops.get(call).map(|(id, ..)| (id.clone(), wishes.get(id).copied())),
                        // The shim's own stop: Job completion, teardown, or a
                        // stop kubelet asked for before a restart.
                        Action::Stop { container, .. } => Some((container.clone(), wishes.get(container).copied())),
                        _ => None,
                    };
                    let own = matches!(a, Action::Stop { .. });
                    if let Some((id, held)) = stopped {
                        // (A stop of a sidecar that exited already signals nothing.)
                        // During deletion, and for the shim's own stops (Job
                        // completion) at any time: no sidecar before the normal
                        // containers, and sidecars in reverse order.
                        let name = name_of(&id);
                        if (deleting || own) && is_sidecar(&name) && running.get(&id).copied().unwrap_or(false) {
                            let grace_out = held.is_some_and(|(arrived, t)| w.now >= arrived + t + Duration::from_secs(1));
                            let later_running: Vec<&String> = running.iter().filter(|(cid, r)| **r && is_sidecar(&name_of(cid)) && name_of(cid) > name).map(|(cid, _)| cid).collect();
                            prop_assert!(later_running.is_empty() || grace_out, "sidecar {id} stopped while later sidecars run: {later_running:?}\n{:#?}", w.actions.iter().map(|(t, a)| format!("{:?} {:?}", t, a)).collect::<Vec<_>>());
                        }
                        if (deleting || own) && is_sidecar(&name) && running.get(&id).copied().unwrap_or(false) {
                            let normal_running = running.iter().any(|(cid, r)| *r && !is_sidecar(&name_of(cid)) && !is_init(&name_of(cid)));
                            let grace_out = held.is_some_and(|(arrived, t)| w.now >= arrived + t + Duration::from_secs(1));
                            prop_assert!(!normal_running || grace_out, "sidecar {id} stopped while a normal container runs: {:?}\n{:#?}\n{:?}", running, w.actions.iter().map(|(t, a)| format!("{:?} {:?}", t, a)).collect::<Vec<_>>(), w.m.containers.iter().map(|(k, c)| format!("{k}: {:?} {:?} {:?}", c.role, c.state, c.stop_sent)).collect::<Vec<_>>());
                        }
                        if running.get(&id).copied().unwrap_or(false) {
                            landing.push((Land::Exit, id));
                        }
                    }
                }
                // kubelet's pod worker kills the pod once its starts returned.
                if delete_at.is_some() && !deleting && !start_held(&w, &start_calls) {
                    deleting = true;
                    let (kubelets, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut landing).into_iter().partition(|(k, _)| *k == Land::KubeletStart);
                    landing = rest;
                    for (_, id) in kubelets {
                        running.insert(id.clone(), true);
                        queue.extend(w.feed(Event::StartDone { container: id, ok: true }));
                    }
                    queue.extend(kill_pod(&mut w, sidecars_first, &running, &mut calls, &mut pre_stops, &mut stops, &mut wishes));
                    continue;
                }
                break;
            }
        }
        prop_assert_eq!(w.m.held_calls(), 0);
        // 4. Promises are kept, restarts or not: a start the shim answered
        // happened or reads as never started; a deleted pod ends with
        // nothing running.
        for id in &deferred {
            let started = running.get(id).copied().unwrap_or(false);
            let never = matches!(w.m.status_override(id), Some(StatusOverride::Exited { .. }));
            prop_assert!(started || never, "{id}: answered as started, neither started nor failed: {:?}", w.m.status_override(id));
        }
        // 5. An init container kubelet was told had started really starts:
        // kubelet waits for it to finish before anything else.
        if let Some(id) = w.ids.get(NAMES[INIT]) {
            if deferred.contains(id) && !deleting {
                let ran = running.get(id).copied().unwrap_or(false) || exited.contains(id);
                prop_assert!(ran, "init container {id} answered as started, never started: {:?}", w.m.status_override(id));
            }
        }
        // 7. A Job pod under Never whose normal containers all ended (exited,
        // or their start failed) has no sidecar left running.
        if restart == Restart::Explicit(RestartPolicy::Never) && !deleting {
            let ended = |id: &String| {
                exited.contains(id)
                    || refused.contains(id)
                    || matches!(w.m.status_override(id), Some(StatusOverride::Exited { .. }))
            };
            let normals: Vec<&String> = ["app", "worker"].iter().filter_map(|n| w.ids.get(*n)).collect();
            let init_done = !with_init || w.ids.get(NAMES[INIT]).is_some_and(ended);
            if init_done && normals.len() == 2 && normals.iter().all(|id| ended(id)) {
                let left: Vec<&String> = running.iter().filter(|(id, r)| **r && is_sidecar(&name_of(id))).map(|(id, _)| id).collect();
                prop_assert!(left.is_empty(), "normal containers ended, sidecars still run: {left:?}\n{:#?}", w.actions.iter().map(|(t, a)| format!("{:?} {:?}", t, a)).collect::<Vec<_>>());
            }
        }
        // 8. A start is answered before kubelet's deadline for it.
        if let Some(limit) = w.start_deadline {
            for (c, sent) in &start_sent {
                let answered = w.actions.iter().find_map(|(t, a)| match a {
                    Action::Forward(x) | Action::Answer { call: x, .. } if x == c => Some(*t),
                    _ => None,
                }).or_else(|| failed_at.get(c).copied());
                if let Some(t) = answered {
                    prop_assert!(t <= *sent + limit, "start {c:?} answered {:?} after it was sent, past kubelet's {limit:?}", t - *sent);
                }
            }
        }
        // 6. kubelet's kill did not wait for a held start beyond half the
        // grace period (plus the model's 1 s time steps).
        if let Some(d) = delete_at {
            for c in start_calls.keys() {
                let answered = w.actions.iter().find_map(|(t, a)| match a {
                    Action::Forward(x) | Action::Answer { call: x, .. } if x == c => Some(*t),
                    _ => None,
                }).or_else(|| failed_at.get(c).copied());
                if let Some(t) = answered {
                    prop_assert!(t <= d + Duration::from_secs(16), "start {c:?} held {:?} into the pod's deletion", t - d);
                }
            }
        }
        if deleting {
            let left: Vec<&String> = running.iter().filter(|(_, r)| **r).map(|(id, _)| id).collect();
            prop_assert!(left.is_empty(), "still running after the pod's deletion: {left:?}");
        }
        for c in calls {
            let n = w.answered.get(&c).copied().unwrap_or(0);
            prop_assert_eq!(n, 1, "call {:?} answered {} times", c, n);
        }
    }
}

#[test]
fn stop_pod_sandbox_with_running_containers_tears_down_in_order() {
    let mut w = World::new(spec(&["a", "b"], Restart::Default, OnReadyTimeout::Fail));
    for s in ["a", "b"] {
        let id = w.create(s);
        w.start(s);
        w.feed(Event::StartDone {
            container: id.clone(),
            ok: true,
        });
        w.feed(Event::Ready { container: id });
    }
    let app = w.create("app");
    w.start("app");
    w.feed(Event::StartDone {
        container: app.clone(),
        ok: true,
    });
    let call = w.call();
    let out = w.feed(Event::StopPodCalled {
        call,
        pod: "pod".into(),
        deadline: None,
    });
    // The app first; no sidecar yet, and the sandbox call waits.
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Stop { container, .. } if *container == app)),
        "{out:?}"
    );
    assert!(!out
        .iter()
        .any(|x| matches!(x, Action::Stop { container, .. } if *container != app)));
    assert!(!out.contains(&Action::Forward(call)));
    let (a, b) = (w.ids["a"].clone(), w.ids["b"].clone());
    let out = w.feed(Event::Exited {
        container: app,
        code: 0,
    });
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Stop { container, .. } if *container == b)),
        "{out:?}"
    );
    assert!(!out
        .iter()
        .any(|x| matches!(x, Action::Stop { container, .. } if *container == a)));
    let out = w.feed(Event::Exited {
        container: b,
        code: 143,
    });
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Stop { container, .. } if *container == a)),
        "{out:?}"
    );
    assert!(!out.contains(&Action::Forward(call)));
    let out = w.feed(Event::Exited {
        container: a,
        code: 143,
    });
    assert!(
        out.contains(&Action::Forward(call)),
        "sandbox stop forwarded last: {out:?}"
    );
}

#[test]
fn a_deferred_container_nothing_follows_is_an_init_container() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    // kubelet starts an init container and waits for it to finish: it
    // creates nothing else meanwhile.
    let init = w.create("init");
    let (c, out) = w.start("init");
    assert!(
        out.contains(&Action::Answer {
            call: c,
            result: Ok(())
        }),
        "{out:?}"
    );
    let window = Settings::default().init_window;
    let out = w.advance(window - Duration::from_millis(100));
    assert!(!out.contains(&Action::Start(init.clone())));
    let out = w.advance(Duration::from_millis(200));
    assert!(out.contains(&Action::Start(init.clone())), "{out:?}");
    w.feed(Event::StartDone {
        container: init.clone(),
        ok: true,
    });
    assert_eq!(w.m.status_override(&init), None);
    w.feed(Event::Exited {
        container: init,
        code: 0,
    });
    // Then the regular containers: the app waits for its sidecar as usual.
    let proxy = w.create("proxy");
    w.start("proxy");
    w.feed(Event::StartDone {
        container: proxy.clone(),
        ok: true,
    });
    w.create("app");
    let (app_call, out) = w.start("app");
    assert!(!forwarded(&out, app_call));
    let out = w.feed(Event::Ready { container: proxy });
    assert!(forwarded(&out, app_call), "{out:?}");
    // The init container's exit does not count as the Job's completion.
    let out = w.advance(Duration::from_secs(5));
    assert!(
        !out.iter().any(|a| matches!(a, Action::Stop { .. })),
        "{out:?}"
    );
}

/// An app listed before its sidecar, whose image kubelet pulls for a long
/// time first: the PullImage for the pod shows that kubelet went on past the
/// app, so the app is no init container and waits for its sidecar however
/// long the pull takes (the 2 s window alone started it after 2 s).
#[test]
fn a_pull_for_the_pod_after_a_deferred_app_keeps_it_deferred() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let app = w.create("app");
    w.start("app");
    w.advance(Duration::from_millis(5));
    w.feed(Event::PodWork { pod: "pod".into() });
    // Well past the init window, within the ready-timeout (10 s).
    for _ in 0..8 {
        let out = w.advance(Duration::from_secs(1));
        assert!(!out.contains(&Action::Start(app.clone())), "{out:?}");
    }
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(app)), "{out:?}");
}

/// The sidecar crashed and waits out kubelet's crash-loop backoff when the
/// app is started again: kubelet creates nothing for a while, but a pod
/// whose sidecar exists is past its init containers, so the app waits for
/// the sidecar's next attempt (it was started as an init container after
/// the init window, without its sidecar). Found by the property test's own
/// init oracle.
#[test]
fn an_app_restarted_while_its_sidecar_backs_off_is_no_init_container() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Always),
        OnReadyTimeout::Fail,
    ));
    w.bring_up(&["proxy", "app"]);
    w.exited("proxy", 1);
    w.exited("app", 1);
    let app = w.create("app");
    w.start("app");
    for _ in 0..8 {
        let out = w.advance(Duration::from_secs(1));
        assert!(!out.contains(&Action::Start(app.clone())), "{out:?}");
    }
    w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(app)), "{out:?}");
}

// ---------------------------------------------------------------------------
// Restarts of the shim, repeated calls, caps

/// A pod [proxy, app] (app listed second) up to the proxy ready.
fn proxy_running(w: &mut World) -> String {
    let proxy = w.create("proxy");
    w.start("proxy");
    w.started("proxy");
    proxy
}

fn running_except(w: &World, created: &[&str]) -> Vec<RuntimePod> {
    let created: Vec<String> = created.iter().map(|n| w.ids[*n].clone()).collect();
    w.runtime(|id| {
        if created.iter().any(|c| c == id) {
            RuntimeState::Created
        } else {
            RuntimeState::Running
        }
    })
}

#[test]
fn a_deferred_start_survives_a_restart_and_happens_when_the_sidecar_is_ready() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let app = w.create("app");
    w.start("app");
    let proxy = proxy_running(&mut w);
    let (out, report) = w.crash(running_except(&w, &["app"]));
    assert_eq!(report.kept, 1);
    assert!(!out.contains(&Action::Start(app.clone())), "{out:?}");
    assert!(matches!(
        w.m.status_override(&app),
        Some(StatusOverride::Running { .. })
    ));
    // Readiness is checked again.
    assert_eq!(w.m.probes(), vec![(proxy.clone(), "pod".to_string())]);
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(app)), "{out:?}");
}

#[test]
fn a_start_the_shim_had_sent_is_sent_again_unless_the_runtime_has_it_running() {
    for landed in [false, true] {
        let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
        let app = w.create("app");
        w.start("app");
        proxy_running(&mut w);
        let out = w.ready("proxy");
        assert!(out.contains(&Action::Start(app.clone())));
        // The shim dies before the runtime's answer.
        let view = if landed {
            running_except(&w, &[])
        } else {
            running_except(&w, &["app"])
        };
        let (out, _) = w.crash(view);
        assert_eq!(
            out.contains(&Action::Start(app.clone())),
            !landed,
            "{out:?}"
        );
        if landed {
            assert_eq!(w.m.status_override(&app), None);
        } else {
            // Still reads as running meanwhile.
            assert!(matches!(
                w.m.status_override(&app),
                Some(StatusOverride::Running { .. })
            ));
        }
    }
}

#[test]
fn job_completion_resumes_after_a_restart_and_keeps_the_exit_code_rewrite() {
    for stop_landed in [false, true] {
        let mut w = World::new(spec(
            &["proxy"],
            Restart::Explicit(RestartPolicy::Never),
            OnReadyTimeout::Fail,
        ));
        let proxy = proxy_running(&mut w);
        w.ready("proxy");
        w.create("main");
        w.start("main");
        w.started("main");
        w.advance(Duration::from_secs(2));
        let out = w.exited("main", 0);
        assert_eq!(stops_of(&out, &proxy).len(), 1, "{out:?}");
        let main = w.ids["main"].clone();
        let view = w.runtime(|id| {
            if id == main {
                RuntimeState::Exited { code: 0 }
            } else if stop_landed {
                RuntimeState::Exited { code: 143 }
            } else {
                RuntimeState::Running
            }
        });
        let (out, _) = w.crash(view);
        assert_eq!(
            stops_of(&out, &proxy).len(),
            usize::from(!stop_landed),
            "{out:?}"
        );
        assert!(matches!(
            w.m.status_override(&proxy),
            Some(StatusOverride::IfExited { code: 0, .. })
        ));
    }
}

#[test]
fn a_held_sidecar_stop_is_resumed_after_a_restart_once_the_app_exits() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = proxy_running(&mut w);
    w.ready("proxy");
    w.create("app");
    w.start("app");
    w.started("app");
    let (app_call, out) = w.stop("app", Duration::from_secs(30));
    assert!(forwarded(&out, app_call));
    let (_, out) = w.stop("proxy", Duration::from_secs(30));
    assert!(!out.iter().any(|a| matches!(a, Action::ForwardStop { .. })));
    w.now += Duration::from_secs(5);
    let (out, _) = w.crash(running_except(&w, &[]));
    assert!(stops_of(&out, &proxy).is_empty(), "{out:?}");
    let out = w.advance(Duration::from_secs(3));
    assert!(stops_of(&out, &proxy).is_empty(), "{out:?}");
    let out = w.exited("app", 0);
    // 30 s from kubelet's stop, 8 s gone.
    assert_eq!(
        stops_of(&out, &proxy),
        vec![Duration::from_secs(22)],
        "{out:?}"
    );
    // kubelet's retried stop joins: forwarded at once.
    let (call, out) = w.stop("proxy", Duration::from_secs(30));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::ForwardStop { call: c, .. } if *c == call)),
        "{out:?}"
    );
}

#[test]
fn a_repeated_sidecar_stop_joins_the_first_ones_wait() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    proxy_running(&mut w);
    w.ready("proxy");
    w.create("app");
    w.start("app");
    w.started("app");
    w.stop("app", Duration::from_secs(30));
    let (first, _) = w.stop("proxy", Duration::from_secs(30));
    w.now += Duration::from_secs(5);
    let (second, _) = w.stop("proxy", Duration::from_secs(30));
    w.now += Duration::from_secs(1);
    let out = w.exited("app", 0);
    let timeouts: Vec<(CallId, Duration)> = out
        .iter()
        .filter_map(|a| match a {
            Action::ForwardStop { call, timeout } => Some((*call, *timeout)),
            _ => None,
        })
        .collect();
    assert_eq!(
        timeouts,
        vec![
            (first, Duration::from_secs(24)),
            (second, Duration::from_secs(24))
        ]
    );
    // Out of grace at the first one's deadline, not the second's.
    let mut w2 = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    proxy_running(&mut w2);
    w2.create("app");
    w2.start("app");
    w2.started("app");
    w2.stop("app", Duration::from_secs(30));
    w2.stop("proxy", Duration::from_secs(10));
    w2.now += Duration::from_secs(5);
    let (second, _) = w2.stop("proxy", Duration::from_secs(10));
    let out = w2.advance(Duration::from_secs(6) + Duration::from_millis(10));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::ForwardStop { call, .. } if *call == second)),
        "{out:?}"
    );
}

#[test]
fn repeated_starts_end_where_the_first_one_does() {
    // Deferred: answered again at once, the deferral unchanged.
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let app = w.create("app");
    w.start("app");
    let before = w.m.status_override(&app);
    w.now += Duration::from_secs(1);
    let (c, out) = w.start("app");
    assert!(out.contains(&Action::Answer {
        call: c,
        result: Ok(())
    }));
    assert_eq!(w.m.status_override(&app), before);

    // Held: two calls wait together; one start reaches the runtime and the
    // other gets its outcome.
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = proxy_running(&mut w);
    let app = w.create("app");
    let (first, _) = w.start("app");
    let (second, _) = w.start("app");
    let out = w.feed(Event::Ready { container: proxy });
    assert!(
        forwarded(&out, first) && !forwarded(&out, second),
        "{out:?}"
    );
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::Answer { call, .. } if *call == second)));
    let out = w.feed(Event::StartDone {
        container: app,
        ok: true,
    });
    assert!(out.contains(&Action::Answer {
        call: second,
        result: Ok(())
    }));
    // Running: the runtime answers a repeat as it would.
    let (third, out) = w.start("app");
    assert!(forwarded(&out, third));

    // Refused: the same refusal again.
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    proxy_running(&mut w);
    w.create("app");
    w.start("app");
    w.advance(Duration::from_secs(11));
    let (c, out) = w.start("app");
    assert!(
        out.iter().any(
            |a| matches!(a, Action::Answer { call, result: Err(r) } if *call == c && r.message.contains("proxy"))
        ),
        "{out:?}"
    );
}

#[test]
fn a_newer_attempt_supersedes_a_deferred_start() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let old = w.create("app");
    w.start("app");
    let new = w.create("app");
    assert!(matches!(
        w.m.status_override(&old),
        Some(StatusOverride::Exited { code: 137, .. })
    ));
    w.start("app");
    proxy_running(&mut w);
    let out = w.ready("proxy");
    assert!(out.contains(&Action::Start(new)), "{out:?}");
    assert!(!out.contains(&Action::Start(old)), "{out:?}");
}

#[test]
fn reconcile_forgets_vanished_pods_and_rebuilds_annotated_ones() {
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    let proxy = proxy_running(&mut w);
    let (_, report) = w.crash(Vec::new());
    assert_eq!(report.vanished, vec!["pod".to_string()]);
    assert!(!w.m.knows(&proxy) && !w.m.knows_any());
    // A pod the state directory lost: rebuilt from the runtime.
    let view = vec![RuntimePod {
        id: "other".into(),
        name: "default/o".into(),
        spec: Some(w.spec.clone()),
        containers: vec![
            RuntimeContainer {
                id: "c-proxy".into(),
                name: "proxy".into(),
                attempt: 0,
                state: RuntimeState::Running,
                pre_stop: None,
                grace: Some(Duration::from_secs(7)),
                regular: true,
            },
            RuntimeContainer {
                id: "c-init".into(),
                name: "setup".into(),
                attempt: 0,
                state: RuntimeState::Exited { code: 0 },
                pre_stop: None,
                grace: None,
                regular: false,
            },
        ],
    }];
    let (_, report) = w.m.reconcile(w.now, view);
    assert_eq!(report.rebuilt, 1);
    assert!(w.m.knows("c-proxy") && !w.m.knows("c-init"));
    assert!(w.m.needs_probe("c-proxy"));
}

#[test]
fn beyond_the_caps_calls_are_forwarded_with_a_warning() {
    let settings = Settings {
        max_pods: 1,
        max_held: 1,
        max_deferred: 1,
        ..Settings::default()
    };
    let warned = |out: &[Action]| out.iter().any(|a| matches!(a, Action::Warn(_)));
    let mut w = World::new(spec(&["proxy"], Restart::Default, OnReadyTimeout::Fail));
    w.m = Machine::new(settings);
    // Deferred starts: the second one starts at once.
    w.create("app");
    let (_, out) = w.start("app");
    assert!(!warned(&out));
    w.create("worker");
    let (c, out) = w.start("worker");
    assert!(forwarded(&out, c) && warned(&out), "{out:?}");
    // Held calls: the second one is forwarded.
    proxy_running(&mut w);
    w.create("a");
    let (c1, out) = w.start("a");
    assert!(!forwarded(&out, c1));
    w.create("b");
    let (c2, out) = w.start("b");
    assert!(forwarded(&out, c2) && warned(&out), "{out:?}");
    // Pods: a second pod is not managed.
    let out = w.feed(Event::Created {
        pod: "pod2".into(),
        pod_name: "default/q".into(),
        spec: w.spec.clone(),
        container: "q-app".into(),
        name: "app".into(),
        attempt: 0,
        pre_stop: None,
        grace: None,
    });
    assert!(warned(&out) && !w.m.knows("q-app"), "{out:?}");
}

#[test]
fn records_round_trip_through_json() {
    let mut w = World::new(spec(
        &["proxy"],
        Restart::Explicit(RestartPolicy::Never),
        OnReadyTimeout::Fail,
    ));
    w.create("app");
    w.start("app");
    proxy_running(&mut w);
    w.stop("proxy", Duration::from_secs(9));
    let clock = WallClock::at(w.now, std::time::SystemTime::now());
    let record = w.m.record("pod", &clock).unwrap();
    let json = serde_json::to_vec(&record).unwrap();
    let back: PodRecord = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, record);
    let mut m = Machine::new(Settings::default());
    m.restore(w.now, &clock, back);
    assert_eq!(m.record("pod", &clock).unwrap(), record);
}

/// An exit the shim heard from containerd's task events, before the CRI
/// wrote it down, survives a restart whose reconcile still reads the
/// container running: a container that exited never runs again.
#[test]
fn reconcile_keeps_an_exit_the_cri_has_not_written_down_yet() {
    let mut w = World::new(spec(&["proxy"], Restart::JobDefault, OnReadyTimeout::Fail));
    proxy_running(&mut w);
    let app = w.create("app");
    w.start("app");
    w.started("app");
    assert!(w.m.is_watched(&app));
    w.exited("app", 0);
    let view = w.runtime(|_| RuntimeState::Running);
    w.crash(view);
    assert!(w.m.knows(&app));
    assert!(
        !w.m.is_watched(&app),
        "the exited app reads as running again"
    );
}
