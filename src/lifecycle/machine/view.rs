//! A read-only snapshot of what the machine manages, for the admin API
//! (`sidecar-shim status`): pods, their containers' lifecycle states, the
//! calls held and the starts deferred.
//!
//! The snapshot is made of the shim's own small types (no protobuf here):
//! the admin module converts them to its wire types. It only reads the
//! machine's private state, so that the machine's own types can change
//! without the admin API noticing: adapting to a change means adapting the
//! few `match`es below.

use std::time::Instant;

use super::{CallId, ContainerId, Held, Machine, PodId, Role, State};

/// One managed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub sandbox_id: PodId,
    /// `namespace/name`, as kubelet named the sandbox.
    pub name: String,
    /// Sidecar container names in start order.
    pub sidecars: Vec<String>,
    /// Sidecars in start order first, then the others in creation order.
    pub containers: Vec<ContainerView>,
    /// Held calls about the pod or its containers, oldest call first.
    pub held: Vec<HeldView>,
    /// A sign of shutdown arrived.
    pub terminating: bool,
    /// Job completion declared.
    pub job_complete: bool,
}

/// One container (attempt) of a managed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub id: ContainerId,
    pub name: String,
    pub role: RoleView,
    pub state: StateView,
    /// A sidecar passed its readiness check (false for the others).
    pub ready: bool,
    /// A sidecar's readiness check, as in the annotation.
    pub ready_check: Option<String>,
    /// The shim stopped it (Job completion): its exit code is rewritten.
    pub stopped_by_shim: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleView {
    /// With its position in start order.
    Sidecar(usize),
    Normal,
    /// Taken for an init container and left alone.
    Init,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateView {
    Created,
    /// Answered as started, the real start waits for the sidecars.
    Deferred {
        since: Instant,
        deadline: Instant,
    },
    Starting,
    Running,
    Exited {
        code: i32,
    },
    NeverStarted {
        code: i32,
        reason: String,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldKind {
    Start,
    Stop,
    PreStop,
    StopPod,
}

/// A call the shim holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldView {
    pub call: CallId,
    pub kind: HeldKind,
    /// The container it is about (None for StopPodSandbox).
    pub container: Option<ContainerId>,
    /// When the machine began to hold it, where the machine records that
    /// (stops and preStop hooks); the caller knows it for the others.
    pub since: Option<Instant>,
    /// The latest it is released: its deadline, or the end of its grace.
    pub until: Option<Instant>,
}

impl Machine {
    /// What the machine manages now, pods ordered by name.
    pub fn view(&self) -> Vec<PodView> {
        let mut pods: Vec<PodView> = self
            .pods
            .iter()
            .map(|(id, pod)| {
                let mut containers: Vec<ContainerView> = pod
                    .containers
                    .iter()
                    .filter_map(|cid| {
                        let c = self.containers.get(cid)?;
                        Some(ContainerView {
                            id: cid.clone(),
                            name: c.name.clone(),
                            role: match c.role {
                                Role::Sidecar(i) => RoleView::Sidecar(i),
                                Role::Normal => RoleView::Normal,
                                Role::Init => RoleView::Init,
                            },
                            state: match &c.state {
                                State::Created => StateView::Created,
                                State::Deferred {
                                    since, deadline, ..
                                } => StateView::Deferred {
                                    since: *since,
                                    deadline: *deadline,
                                },
                                State::Starting => StateView::Starting,
                                State::Running => StateView::Running,
                                State::Exited { code, .. } => StateView::Exited { code: *code },
                                State::NeverStarted {
                                    code,
                                    reason,
                                    message,
                                    ..
                                } => StateView::NeverStarted {
                                    code: *code,
                                    reason: reason.to_string(),
                                    message: message.clone(),
                                },
                            },
                            ready: c.ready,
                            ready_check: pod.spec.ready.get(&c.name).map(|r| r.to_string()),
                            stopped_by_shim: c.stopped_by_shim,
                        })
                    })
                    .collect();
                // Stable: attempts of one name, and the non-sidecars, keep
                // their creation order.
                containers.sort_by_key(|c| match c.role {
                    RoleView::Sidecar(i) => i,
                    _ => usize::MAX,
                });
                let mut held: Vec<HeldView> = self
                    .held
                    .iter()
                    .filter(|(_, h)| self.held_pod(h) == Some(id))
                    .map(|(call, h)| self.held_view(*call, h, pod.grace))
                    .collect();
                held.sort_by_key(|h| h.call);
                PodView {
                    sandbox_id: id.clone(),
                    name: pod.name.clone(),
                    sidecars: pod.spec.sidecars.clone(),
                    containers,
                    held,
                    terminating: pod.terminating.is_some(),
                    job_complete: pod.job_done,
                }
            })
            .collect();
        pods.sort_by(|a, b| (&a.name, &a.sandbox_id).cmp(&(&b.name, &b.sandbox_id)));
        pods
    }

    fn held_view(&self, call: CallId, h: &Held, grace: std::time::Duration) -> HeldView {
        let slack = self.settings.grace_slack;
        let (kind, container, since, until) = match h {
            Held::Start {
                container,
                deadline,
                defer_at,
                ..
            } => (
                HeldKind::Start,
                Some(container),
                None,
                Some((*deadline).min(*defer_at)),
            ),
            Held::Joined { container } => (HeldKind::Start, Some(container), None, None),
            Held::Stop {
                container,
                arrived,
                timeout,
                answer_by,
                ..
            } => {
                let end = *arrived + *timeout + slack;
                let until = answer_by.map_or(end, |a| a.min(end));
                (HeldKind::Stop, Some(container), Some(*arrived), Some(until))
            }
            Held::PreStop {
                container, arrived, ..
            } => (
                HeldKind::PreStop,
                Some(container),
                Some(*arrived),
                Some(*arrived + grace + slack),
            ),
            Held::StopPod { deadline, .. } => (HeldKind::StopPod, None, None, Some(*deadline)),
        };
        HeldView {
            call,
            kind,
            container: container.cloned(),
            since,
            until,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::lifecycle::machine::{Event, Settings};
    use crate::lifecycle::spec::{OnReadyTimeout, PodSpec, ReadyCheck, Restart, RestartPolicy};

    fn spec(sidecars: &[&str], restart: Restart) -> Arc<PodSpec> {
        Arc::new(PodSpec {
            sidecars: sidecars.iter().map(|s| s.to_string()).collect(),
            ready: sidecars
                .iter()
                .map(|s| (s.to_string(), ReadyCheck::Tcp { port: 8080 }))
                .collect::<BTreeMap<_, _>>(),
            restart,
            ready_timeout: Duration::from_secs(90),
            on_ready_timeout: OnReadyTimeout::Fail,
        })
    }

    fn created(spec: &Arc<PodSpec>, pod: &str, id: &str, name: &str) -> Event {
        Event::Created {
            pod: pod.into(),
            pod_name: format!("default/{pod}"),
            spec: spec.clone(),
            container: id.into(),
            name: name.into(),
            attempt: 0,
            pre_stop: None,
            grace: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn empty_machine_has_no_pods() {
        assert!(Machine::new(Settings::default()).view().is_empty());
    }

    /// [app, proxy]: the app's start is deferred; then [proxy, app] in a
    /// second pod: the app's start is held. Containers come sidecars first.
    #[test]
    fn deferred_and_held_starts() {
        let mut m = Machine::new(Settings::default());
        let t0 = Instant::now();
        let s = spec(&["proxy"], Restart::Explicit(RestartPolicy::Always));
        m.handle(t0, created(&s, "p1", "app1", "app"));
        m.handle(
            t0,
            Event::StartCalled {
                call: CallId(1),
                container: "app1".into(),
                deadline: None,
            },
        );
        m.handle(t0, created(&s, "p1", "proxy1", "proxy"));

        let t1 = t0 + Duration::from_secs(1);
        m.handle(t1, created(&s, "p2", "proxy2", "proxy"));
        m.handle(
            t1,
            Event::StartCalled {
                call: CallId(2),
                container: "proxy2".into(),
                deadline: None,
            },
        );
        m.handle(
            t1,
            Event::StartDone {
                container: "proxy2".into(),
                ok: true,
            },
        );
        m.handle(t1, created(&s, "p2", "app2", "app"));
        m.handle(
            t1,
            Event::StartCalled {
                call: CallId(3),
                container: "app2".into(),
                deadline: Some(t1 + Duration::from_secs(120)),
            },
        );

        let pods = m.view();
        assert_eq!(pods.len(), 2);
        let p1 = &pods[0];
        assert_eq!(p1.name, "default/p1");
        assert_eq!(p1.sidecars, ["proxy"]);
        let names: Vec<_> = p1.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["proxy", "app"]);
        assert_eq!(p1.containers[0].role, RoleView::Sidecar(0));
        assert_eq!(p1.containers[0].state, StateView::Created);
        assert_eq!(p1.containers[0].ready_check.as_deref(), Some("tcp://:8080"));
        assert_eq!(p1.containers[1].role, RoleView::Normal);
        assert_eq!(p1.containers[1].ready_check, None);
        assert_eq!(
            p1.containers[1].state,
            StateView::Deferred {
                since: t0,
                deadline: t0 + Duration::from_secs(90)
            }
        );
        assert!(p1.held.is_empty());

        let p2 = &pods[1];
        assert_eq!(p2.containers[0].state, StateView::Running);
        assert!(!p2.containers[0].ready);
        assert_eq!(p2.containers[1].state, StateView::Created);
        assert_eq!(
            p2.held,
            [HeldView {
                call: CallId(3),
                kind: HeldKind::Start,
                container: Some("app2".into()),
                since: None,
                // Half the pod's grace period (10 s) comes before the
                // ready-timeout and kubelet's deadline: then the start is
                // answered and deferred.
                until: Some(t1 + Duration::from_secs(5)),
            }]
        );

        // The proxy becomes ready: the held start goes on, nothing is held.
        m.handle(
            t1,
            Event::Ready {
                container: "proxy2".into(),
            },
        );
        let p2 = &m.view()[1];
        assert!(p2.containers[0].ready);
        assert_eq!(p2.containers[1].state, StateView::Starting);
        assert!(p2.held.is_empty());
    }

    /// A Job pod whose app exited: the shim stops the sidecar, which then
    /// reads as stopped by the shim; kubelet's stop of a sidecar is held
    /// with its grace in a terminating pod.
    #[test]
    fn job_completion_and_held_stop() {
        let settings = Settings::default();
        let settle = settings.settle;
        let slack = settings.grace_slack;
        let mut m = Machine::new(settings);
        let t0 = Instant::now();
        let s = spec(&["proxy"], Restart::Explicit(RestartPolicy::Never));
        m.handle(t0, created(&s, "job", "proxy1", "proxy"));
        m.handle(
            t0,
            Event::StartCalled {
                call: CallId(1),
                container: "proxy1".into(),
                deadline: None,
            },
        );
        m.handle(
            t0,
            Event::StartDone {
                container: "proxy1".into(),
                ok: true,
            },
        );
        m.handle(
            t0,
            Event::Ready {
                container: "proxy1".into(),
            },
        );
        m.handle(t0, created(&s, "job", "app1", "app"));
        m.handle(
            t0,
            Event::StartCalled {
                call: CallId(2),
                container: "app1".into(),
                deadline: None,
            },
        );
        m.handle(
            t0,
            Event::StartDone {
                container: "app1".into(),
                ok: true,
            },
        );
        let t1 = t0 + settle + Duration::from_secs(1);
        m.handle(
            t1,
            Event::Exited {
                container: "app1".into(),
                code: 0,
            },
        );
        let pod = &m.view()[0];
        assert!(pod.job_complete);
        assert_eq!(pod.containers[1].state, StateView::Exited { code: 0 });
        assert!(pod.containers[0].stopped_by_shim);
        assert!(!pod.containers[1].stopped_by_shim);

        // A second pod, deleted: the app is still running, the sidecar's
        // stop is held.
        let s = spec(&["proxy"], Restart::Explicit(RestartPolicy::Always));
        m.handle(t1, created(&s, "web", "proxy2", "proxy"));
        m.handle(
            t1,
            Event::StartDone {
                container: "proxy2".into(),
                ok: true,
            },
        );
        m.handle(t1, created(&s, "web", "app2", "app"));
        m.handle(
            t1,
            Event::StartDone {
                container: "app2".into(),
                ok: true,
            },
        );
        m.handle(
            t1,
            Event::StopCalled {
                call: CallId(10),
                container: "app2".into(),
                timeout: Duration::from_secs(10),
                deadline: None,
            },
        );
        m.handle(
            t1,
            Event::StopCalled {
                call: CallId(11),
                container: "proxy2".into(),
                timeout: Duration::from_secs(10),
                deadline: None,
            },
        );
        let web = &m.view()[1];
        assert_eq!(web.name, "default/web");
        assert!(web.terminating);
        assert_eq!(
            web.held,
            [HeldView {
                call: CallId(11),
                kind: HeldKind::Stop,
                container: Some("proxy2".into()),
                since: Some(t1),
                until: Some(t1 + Duration::from_secs(10) + slack),
            }]
        );
    }
}
