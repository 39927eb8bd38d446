//! The demo's scenarios (`hack/demo`, `benches/demo.rs`; `tests/demo.rs`
//! plays one): the same pod played by the kubelet simulator once straight
//! against containerd and once through the shim, observed from what cannot
//! be either's bookkeeping, and turned into a [`timeline::Figure`].
//!
//! * app-first startup: the app is listed before a sidecar that opens its
//!   port 1.5 s after it starts; the app tries to reach it once.
//! * Job completion: a Job pod whose main container exits after 2 s, next to
//!   a sidecar that exits 143 on SIGTERM.
//! * ordered shutdown: on deletion the app needs 2 s after SIGTERM to send a
//!   last message through its sidecar.
//!
//! Containers' lives come from containerd (ContainerStatus asked directly,
//! never through the shim); their notable moments from what they wrote
//! themselves (`/proc/uptime` into a bind-mounted host directory); the pod
//! phase from the simulator (what kubelet would compute from what it read).
//! Each scenario waits for what it shows, or for its cut-off; the runs are
//! never judged here.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use k8s_cri::v1::{ContainerState, ContainerStatus};

use super::kubelet::{
    unix_nanos_at, ContainerDef, Event, Kubelet, KubeletConfig, Phase, PodDef, PodHandle,
};
use super::timeline::{Attempt, Figure, Lane, Mark, Run, Tone};
use super::{sh, tail, wait_for, wait_for_value, PrivateContainerd, ShimProcess};

/// Generous: a loaded 2-core machine runs several things at once.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The port the sidecars listen on (each pod has its own network namespace).
const PORT: u16 = 8080;
/// A Job pod without the shim is watched this long after its main
/// container exited (the shim's Job completion takes about 1 s).
const JOB_CUT_OFF: Duration = Duration::from_secs(4);
/// Drawn after the last thing worth seeing.
const MARGIN: Duration = Duration::from_millis(600);

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";

fn ready_key(container: &str) -> String {
    format!("sidecar-shim.io/ready.{container}")
}

/// A scenario of the demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    AppFirst,
    JobCompletion,
    Shutdown,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [
        Scenario::AppFirst,
        Scenario::JobCompletion,
        Scenario::Shutdown,
    ];

    /// File name stem.
    pub fn slug(self) -> &'static str {
        match self {
            Scenario::AppFirst => "app-first",
            Scenario::JobCompletion => "job-completion",
            Scenario::Shutdown => "shutdown",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::AppFirst => "App-first startup: the app is listed before its sidecar",
            Scenario::JobCompletion => {
                "Job completion: the main container exits, the sidecar would not"
            }
            Scenario::Shutdown => {
                "Ordered shutdown: the app flushes through its sidecar after SIGTERM"
            }
        }
    }

    /// What to look at in the figure.
    pub fn look_at(self) -> &'static str {
        match self {
            Scenario::AppFirst => {
                "kubelet starts the app first and its one connection attempt fails before the \
                 sidecar listens; through the shim the app's start is deferred until the \
                 sidecar's port is open, and it connects."
            }
            Scenario::JobCompletion => {
                "without the shim the sidecar runs on after main exited 0 and the pod stays \
                 Running; through the shim the sidecar gets SIGTERM right after main's exit, is \
                 reported exit 0, and the pod Succeeds."
            }
            Scenario::Shutdown => {
                "on pod deletion kubelet sends every container SIGTERM at once: without the \
                 shim the sidecar is gone and the app's last message is lost (the pod Fails); \
                 through the shim the sidecar gets SIGTERM only after the app exited, and \
                 relays the message."
            }
        }
    }

    /// The pod, its containers sharing `shared` at /shared.
    fn pod(self, shared: &Path) -> Result<PodDef> {
        let idle = "while :; do sleep 3600 & wait $!; done";
        Ok(match self {
            Scenario::AppFirst => PodDef::new("web")
                .termination_grace(Duration::from_secs(2))
                .annotation(SIDECARS, "proxy")
                .annotation(&ready_key("proxy"), &format!("tcp://:{PORT}"))
                .container(
                    ContainerDef::new(
                        "app",
                        sh(&format!(
                            "trap 'exit 0' TERM; \
                             if echo hello | nc -w 2 127.0.0.1 {PORT}; then {}; else {}; fi; {idle}",
                            mark("app", Tone::Good, "connected to sidecar"),
                            mark("app", Tone::Bad, "connect failed"),
                        )),
                    )
                    .mount(shared, "/shared"),
                )
                .container(
                    ContainerDef::new(
                        "proxy",
                        sh(&format!(
                            "trap 'exit 0' TERM; sleep 1.5; nc -ll -p {PORT} -e true & {}; {idle}",
                            mark("proxy", Tone::Info, "listening"),
                        )),
                    )
                    .mount(shared, "/shared"),
                ),
            Scenario::JobCompletion => PodDef::job("report")
                .annotation(SIDECARS, "proxy")
                .annotation(RESTART_POLICY, "Never")
                .container(
                    ContainerDef::new(
                        "proxy",
                        sh(&format!(
                            "trap '{}; exit 143' TERM; touch /shared/proxy.ready; {idle}",
                            mark("proxy", Tone::Info, "got SIGTERM"),
                        )),
                    )
                    .mount(shared, "/shared"),
                )
                .container(
                    ContainerDef::new(
                        "main",
                        sh("while [ ! -e /shared/proxy.ready ]; do sleep 0.05; done; \
                            sleep 2; exit 0"),
                    )
                    .mount(shared, "/shared"),
                ),
            Scenario::Shutdown => {
                // The sidecar relays one line per connection (the shim's
                // readiness check connects and sends nothing).
                std::fs::write(
                    shared.join("relay.sh"),
                    format!(
                        "read -r line && {}\n",
                        mark("proxy", Tone::Good, "relayed $line")
                    ),
                )
                .context("writing relay.sh")?;
                PodDef::new("shop")
                    .termination_grace(Duration::from_secs(10))
                    .annotation(SIDECARS, "proxy")
                    .annotation(&ready_key("proxy"), &format!("tcp://:{PORT}"))
                    .container(
                        ContainerDef::new(
                            "proxy",
                            sh(&format!(
                                "trap '{}; exit 0' TERM; nc -ll -p {PORT} -e sh /shared/relay.sh & \
                                 touch /shared/proxy.ready; {idle}",
                                mark("proxy", Tone::Info, "got SIGTERM"),
                            )),
                        )
                        .mount(shared, "/shared"),
                    )
                    .container(
                        ContainerDef::new(
                            "app",
                            sh(&format!(
                                "trap '{}; sleep 2; \
                                 if echo bye | nc -w 2 127.0.0.1 {PORT}; then {}; exit 0; fi; \
                                 {}; exit 1' TERM; touch /shared/app.ready; {idle}",
                                mark("app", Tone::Info, "got SIGTERM"),
                                mark("app", Tone::Good, "message sent"),
                                mark("app", Tone::Bad, "message lost"),
                            )),
                        )
                        .mount(shared, "/shared"),
                    )
            }
        })
    }
}

/// Shell: append `UPTIME TONE LABEL` to /shared/NAME.marks (the container's
/// own reading of /proc/uptime: one clock for every container and the host).
/// `label` must not contain a single quote.
fn mark(name: &str, tone: Tone, label: &str) -> String {
    let tone = match tone {
        Tone::Good => "good",
        Tone::Bad => "bad",
        Tone::Info => "info",
    };
    format!("read -r up _ < /proc/uptime; echo \"$up {tone} {label}\" >> /shared/{name}.marks")
}

/// Which way the kubelet simulator talks to containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Containerd,
    Shim,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Containerd => "without the shim: kubelet → containerd",
            Via::Shim => "with the shim: kubelet → sidecar-shim → containerd",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Via::Containerd => "direct",
            Via::Shim => "shim",
        }
    }
}

/// A private containerd, the shim in front of it, and a kubelet simulator
/// for each way. (Fields drop in order: simulators, shim, containerd.)
pub struct Stage {
    direct: Kubelet,
    via_shim: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
}

impl Stage {
    pub async fn start() -> Result<Stage> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let kubelet = |endpoint: &Path| {
            Kubelet::with_config(
                endpoint,
                &containerd.pod_log_root(),
                KubeletConfig::default(),
            )
        };
        Ok(Stage {
            direct: kubelet(containerd.socket()),
            via_shim: kubelet(shim.listen()),
            shim,
            containerd,
        })
    }

    fn kubelet(&self, via: Via) -> &Kubelet {
        match via {
            Via::Containerd => &self.direct,
            Via::Shim => &self.via_shim,
        }
    }

    /// containerd's own status of a container, bypassing the shim.
    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }
}

/// Play `scenario` both ways, without the shim first.
pub async fn figure(stage: &Stage, scenario: Scenario) -> Result<Figure> {
    let mut runs = Vec::new();
    for via in [Via::Containerd, Via::Shim] {
        runs.push(play(stage, scenario, via).await?);
    }
    Ok(Figure {
        title: scenario.title().to_string(),
        caption: format!("Look at: {}", scenario.look_at()),
        runs,
    })
}

/// What a scenario saw, besides the containers.
struct Seen {
    end: i64,
    cut_off: bool,
    pod_marks: Vec<Mark>,
}

/// Play `scenario` once, `via` the shim or not; the pod is removed after.
pub async fn play(stage: &Stage, scenario: Scenario, via: Via) -> Result<Run> {
    let shared = stage
        .containerd
        .dir()
        .join(format!("demo-{}-{}", scenario.slug(), via.slug()));
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    let pod = stage.kubelet(via).run_pod(scenario.pod(&shared)?).await?;
    let seen = match scenario {
        Scenario::AppFirst => app_first(&shared).await,
        Scenario::JobCompletion => job_completion(stage, &pod).await,
        Scenario::Shutdown => shutdown(stage, &pod, &shared).await,
    };
    let run = match seen {
        Ok(seen) => collect(stage, &pod, &shared, via, seen).await,
        Err(e) => Err(e),
    };
    let run = run.with_context(|| {
        let shim = match via {
            Via::Shim => format!(
                "\nshim log (last lines):\n{}",
                tail(stage.shim.log_path(), 30)
            ),
            Via::Containerd => String::new(),
        };
        format!("{} {via:?}\n{}{shim}", scenario.slug(), pod.summary())
    });
    // Whatever still runs gets kubelet's minimum grace (2 s).
    pod.delete(Some(Duration::ZERO))
        .await
        .with_context(|| format!("deleting pod {}", pod.name()))?;
    run
}

/// Until the app has tried its sidecar and the sidecar listens, then a
/// moment more: a cut-off, both keep running.
async fn app_first(shared: &Path) -> Result<Seen> {
    let tried = wait_for_value(TIMEOUT, "the app's connection attempt", || {
        let m = read_marks(shared, "app").into_iter().next();
        async move { Ok(m) }
    })
    .await?;
    let listening = wait_for_value(TIMEOUT, "the sidecar to listen", || {
        let m = read_marks(shared, "proxy").into_iter().next();
        async move { Ok(m) }
    })
    .await?;
    let end = hold_until(tried.at.max(listening.at) + nanos(MARGIN) * 2).await;
    Ok(Seen {
        end,
        cut_off: true,
        pod_marks: Vec::new(),
    })
}

/// Until the pod's phase is terminal, or [`JOB_CUT_OFF`] after main exited.
async fn job_completion(stage: &Stage, pod: &PodHandle) -> Result<Seen> {
    let main_id = wait_for_value(TIMEOUT, "main to be created", || {
        let id = pod.container_ids("main").pop();
        async move { Ok(id) }
    })
    .await?;
    let main = wait_for_value(TIMEOUT, "main to exit", || {
        let id = main_id.clone();
        async move {
            let s = stage.truth(&id).await?;
            Ok((s.state == ContainerState::ContainerExited as i32).then_some(s))
        }
    })
    .await?;
    let cut_off = main.finished_at + nanos(JOB_CUT_OFF);
    let left = Duration::from_nanos(u64::try_from(cut_off - now_nanos()).unwrap_or(0));
    let completed = wait_for(left, "a terminal phase", || async move {
        pod.phase().is_terminal()
    })
    .await
    .is_ok();
    if !completed {
        return Ok(Seen {
            end: hold_until(cut_off).await,
            cut_off: true,
            pod_marks: Vec::new(),
        });
    }
    let phased = pod
        .events()
        .iter()
        .filter(|e| matches!(e.event, Event::PhaseChanged { .. }))
        .map(|e| unix_nanos_at(e.at))
        .max()
        .unwrap_or_else(now_nanos);
    Ok(Seen {
        end: hold_until(phased + nanos(MARGIN)).await,
        cut_off: false,
        pod_marks: Vec::new(),
    })
}

/// Both containers ready, a moment, then the pod is deleted (kubelet's
/// killPod, grace 10 s); until everything exited.
async fn shutdown(stage: &Stage, pod: &PodHandle, shared: &Path) -> Result<Seen> {
    wait_for(TIMEOUT, "both containers to be ready", || {
        let ready = shared.join("app.ready").exists() && shared.join("proxy.ready").exists();
        async move { ready }
    })
    .await?;
    hold_until(now_nanos() + nanos(MARGIN)).await;
    let deleted = Instant::now();
    pod.terminate(None).await?;
    let mut last = unix_nanos_at(Instant::now());
    for def in &pod.def().containers {
        for id in pod.container_ids(&def.name) {
            last = last.max(stage.truth(&id).await?.finished_at);
        }
    }
    Ok(Seen {
        end: last + nanos(MARGIN) / 2,
        cut_off: false,
        pod_marks: vec![Mark {
            at: unix_nanos_at(deleted),
            label: "pod deleted".to_string(),
            tone: Tone::Info,
        }],
    })
}

/// The run as containerd and the containers saw it.
async fn collect(
    stage: &Stage,
    pod: &PodHandle,
    shared: &Path,
    via: Via,
    seen: Seen,
) -> Result<Run> {
    let sidecars: Vec<&str> = pod
        .def()
        .annotations
        .get(SIDECARS)
        .map(|s| s.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let mut lanes = Vec::new();
    for def in &pod.def().containers {
        let read = pod.synced(&def.name);
        let mut attempts = Vec::new();
        for id in pod.container_ids(&def.name) {
            let s = stage.truth(&id).await?;
            let reported = read
                .as_ref()
                .filter(|r| r.id == id && s.finished_at > 0 && r.exit_code != s.exit_code)
                .map(|r| format!("kubelet reads {}", r.exit_code));
            attempts.push(Attempt {
                created_at: s.created_at,
                started_at: s.started_at,
                finished_at: s.finished_at,
                exit_code: s.exit_code,
                reported,
            });
        }
        lanes.push(Lane {
            name: def.name.clone(),
            sidecar: sidecars.contains(&def.name.as_str()),
            attempts,
            marks: read_marks(shared, &def.name),
        });
    }
    let mut phases = vec![(
        pod.calls()
            .first()
            .map_or(seen.end, |c| unix_nanos_at(c.start)),
        format!("{:?}", Phase::Pending),
    )];
    phases.extend(pod.events().iter().filter_map(|e| match e.event {
        Event::PhaseChanged { to, .. } => Some((unix_nanos_at(e.at), format!("{to:?}"))),
        _ => None,
    }));
    Ok(Run {
        label: via.label().to_string(),
        lanes,
        phases,
        pod_marks: seen.pod_marks,
        end: seen.end,
        cut_off: seen.cut_off,
    })
}

/// The marks a container wrote into `shared/NAME.marks`, in wall-clock
/// nanoseconds.
pub fn read_marks(shared: &Path, name: &str) -> Vec<Mark> {
    let text = std::fs::read_to_string(shared.join(format!("{name}.marks"))).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let up: f64 = parts.next()?.parse().ok()?;
            let tone = Tone::parse(parts.next()?)?;
            Some(Mark {
                at: unix_nanos_of_uptime(up),
                label: parts.next().unwrap_or("").to_string(),
                tone,
            })
        })
        .collect()
}

/// Seconds since boot now (CLOCK_BOOTTIME, the clock /proc/uptime shows
/// rounded down to 10 ms).
fn boottime_now() -> f64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A `/proc/uptime` reading as wall-clock nanoseconds (the CRI's clock).
pub fn unix_nanos_of_uptime(uptime: f64) -> i64 {
    let (boot, wall) = (boottime_now(), now_nanos());
    wall - ((boot - uptime) * 1e9) as i64
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Let the picture run on until wall-clock `at` (what is drawn, not a
/// synchronisation: nothing waits for it); returns `at`.
async fn hold_until(at: i64) -> i64 {
    let left = at - now_nanos();
    if left > 0 {
        tokio::time::sleep(Duration::from_nanos(left.unsigned_abs())).await;
    }
    at
}
