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
    answered: HashMap<CallId, usize>,
    actions: Vec<(Instant, Action)>,
}

impl World {
    fn new(spec: Arc<PodSpec>) -> World {
        World {
            m: Machine::new(Settings::default()),
            now: Instant::now(),
            spec,
            next_call: 0,
            ids: HashMap::new(),
            answered: HashMap::new(),
            actions: Vec::new(),
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
        self.feed(Event::Created {
            pod: "pod".into(),
            pod_name: "default/p".into(),
            spec: self.spec.clone(),
            container: id.clone(),
            name: name.into(),
            attempt,
            pre_stop: None,
            grace: Some(Duration::from_secs(30)),
        });
        id
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
                deadline: None,
            }),
        )
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.feed(Event::Tick)
    }
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
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4usize).prop_map(Step::Create),
        (0..4usize).prop_map(Step::Start),
        (0..2usize).prop_map(Step::Ready),
        ((0..4usize), prop_oneof![Just(0), Just(1), Just(143)]).prop_map(|(c, e)| Step::Exit(c, e)),
        Just(Step::Delete),
        (0..4usize).prop_map(Step::StopOne),
        (1..5000u64).prop_map(Step::Advance),
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

const NAMES: [&str; 4] = ["s0", "s1", "app", "worker"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Invariants over random event orders:
    /// 1. a normal container never really starts while a sidecar is not
    ///    running and ready, unless its ready-timeout ran out;
    /// 2. during pod deletion no sidecar gets its stop from the shim while a
    ///    normal container runs, unless that stop's grace ran out;
    /// 3. every held call is answered exactly once, at the latest once
    ///    enough time has passed.
    #[test]
    fn invariants(random in proptest::collection::vec(step(), 1..60), restart in restart(), start_on_timeout in any::<bool>(), warm in any::<bool>()) {
        // Half the cases start from a pod that came up normally, so that
        // shutdown and Job completion are reached often.
        let mut steps = Vec::new();
        if warm {
            for i in 0..4 {
                steps.push(Step::Create(i));
                steps.push(Step::Start(i));
                if i < 2 {
                    steps.push(Step::Ready(i));
                }
            }
        }
        steps.extend(random);
        let on_timeout = if start_on_timeout { OnReadyTimeout::Start } else { OnReadyTimeout::Fail };
        let mut w = World::new(spec(&["s0", "s1"], restart, on_timeout));
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
        // Containers the machine took for init containers (deferred with
        // nothing created after them): they start without their sidecars.
        let mut init: std::collections::HashSet<String> = Default::default();

        let is_sidecar = |name: &str| name.starts_with('s');
        let name_of = |id: &str| id.split('-').next().unwrap_or("").to_string();

        for s in steps {
            let out = match s {
                Step::Create(i) => {
                    let name = NAMES[i];
                    let live = w.ids.get(name).is_some_and(|id| running.get(id).copied().unwrap_or(false));
                    if live || deleting { continue; }
                    w.create(name);
                    continue;
                }
                Step::Start(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if running.contains_key(&id) || exited.contains(&id) { continue; }
                    let (call, out) = w.start(NAMES[i]);
                    calls.push(call);
                    start_calls.insert(call, id.clone());
                    running.insert(id.clone(), false);
                    waiting_since.insert(id, w.now);
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
                    w.feed(Event::Exited { container: id, code })
                }
                Step::Delete => {
                    if deleting { continue; }
                    deleting = true;
                    let mut out = Vec::new();
                    let ids: Vec<String> = w.ids.values().cloned().collect();
                    // kubelet stops every running container; normal ones first
                    // here, the machine must not depend on the order.
                    let mut ids = ids;
                    ids.sort_by_key(|id| is_sidecar(&name_of(id)));
                    for id in ids {
                        // kubelet stops what reads as running: really running, or deferred.
                        if !running.get(&id).copied().unwrap_or(false) && !deferred.contains(&id) { continue; }
                        let call = w.call();
                        calls.push(call);
                        stops.insert(call, (id.clone(), w.now, Duration::from_secs(30)));
                        out.extend(w.feed(Event::StopCalled { call, container: id, timeout: Duration::from_secs(30), deadline: None }));
                    }
                    out
                }
                Step::StopOne(i) => {
                    let Some(id) = w.ids.get(NAMES[i]).cloned() else { continue };
                    if !running.get(&id).copied().unwrap_or(false) || deleting { continue; }
                    let call = w.call();
                    calls.push(call);
                    stops.insert(call, (id.clone(), w.now, Duration::from_secs(5)));
                    w.feed(Event::StopCalled { call, container: id, timeout: Duration::from_secs(5), deadline: None })
                }
                Step::Advance(ms) => w.advance(Duration::from_millis(ms)),
            };
            // Apply the actions to the model and check the invariants.
            let mut queue = out;
            for a in &queue {
                if let Action::Log(note) = a {
                    if note.what == "treated as an init container" {
                        if let Some(id) = w.ids.get(&note.container) {
                            init.insert(id.clone());
                        }
                    }
                }
            }
            while let Some(a) = queue.pop() {
                if let Action::Answer { call, result: Ok(()) } = &a {
                    if let Some(id) = start_calls.get(call) {
                        deferred.insert(id.clone());
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
                    let timed_out = waiting_since.get(&id).is_some_and(|t| w.now >= *t + Duration::from_secs(10) - Duration::from_millis(1));
                    prop_assert!(all_ready || timed_out || init.contains(&id), "{name} started with sidecars not ready at {:?}", w.now);
                    running.insert(id.clone(), true);
                    deferred.remove(&id);
                    queue.extend(w.feed(Event::StartDone { container: id, ok: true }));
                }
                let stopped = match &a {
                    Action::ForwardStop { call, .. } | Action::Forward(call) => stops.get(call).map(|(id, arrived, t)| (id.clone(), Some((*arrived, *t)))),
                    Action::Stop { container, .. } => Some((container.clone(), None)),
                    _ => None,
                };
                if let Some((id, held)) = stopped {
                    if deleting && is_sidecar(&name_of(&id)) {
                        let normal_running = running.iter().any(|(cid, r)| *r && !is_sidecar(&name_of(cid)) && !init.contains(cid));
                        let grace_out = held.is_some_and(|(arrived, t)| w.now >= arrived + t + Duration::from_secs(1));
                        prop_assert!(!normal_running || grace_out, "sidecar {id} stopped while a normal container runs");
                    }
                    if running.get(&id).copied().unwrap_or(false) {
                        running.remove(&id);
                        ready.remove(&id);
                        exited.insert(id.clone());
                        queue.extend(w.feed(Event::Exited { container: id, code: 143 }));
                    }
                }
            }
        }
        // Enough time for every bound to pass.
        for _ in 0..5 {
            let out = w.advance(Duration::from_secs(200));
            for a in out {
                if let Action::Start(id) = a {
                    w.feed(Event::StartDone { container: id, ok: true });
                }
            }
        }
        prop_assert_eq!(w.m.held_calls(), 0);
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
    let out = w.advance(Duration::from_millis(1900));
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
