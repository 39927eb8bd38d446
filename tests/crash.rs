//! Crashes and runtime restarts lose no lifecycle state.
//!
//! Each test plays one lifecycle scenario through the shim binary in front
//! of a private containerd, driven by the kubelet simulator, and at one step
//! boundary either
//! * kills the shim with SIGKILL and starts a new one on the same state
//!   directory and socket (the simulated kubelet then retries as kubelet
//!   does: a new attempt after a failed start, killPod again after a failed
//!   kill), or
//! * kills containerd with SIGKILL and starts it again while the shim waits
//!   at that step, then lets the shim go on, or
//! * kills both, starts the shim while containerd is still down, then
//!   containerd.
//!
//! The step boundaries are the shim's failpoints (`src/failpoint.rs`):
//! `after:<event>:<container>` freezes the shim once the machine has
//! recorded an event and written it to the state directory, before anything
//! it decided is carried out; `before:...` freezes it before the event is
//! recorded. The shim creates `<point>.reached` when it gets there, so the
//! test kills it at exactly that step.
//!
//! Every test then checks the outcome the lifecycle defines, as it is
//! without a fault (each scenario also runs once without one): final
//! container states from containerd itself, exit codes and the pod phase as
//! kubelet reads them through the shim, ordering from what the containers
//! recorded (`/proc/uptime`, one clock for all), and no container of the
//! pod running twice.

mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStatus, ContainerStatusRequest, ListContainersRequest,
};
use support::kubelet::*;
use support::state_of as state;
use support::*;

/// Generous: a loaded 2-core machine runs several of these at once.
const TIMEOUT: Duration = Duration::from_secs(90);
const GRACE: Duration = Duration::from_secs(15);
const PORT: u16 = 8080;
/// A container's `/proc/uptime` (10 ms steps) against containerd's
/// wall-clock timestamps converted to uptime.
const CLOCK_SLACK: f64 = 0.02;

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const READY_PROXY: &str = "sidecar-shim.io/ready.proxy";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// kill -9 the shim at the point, start a new one.
    KillShim,
    /// kill -9 containerd while the shim waits at the point, start it again,
    /// let the shim go on.
    RestartContainerd,
    /// kill -9 both at the point; the new shim starts while containerd is
    /// still down (it must reconcile once containerd is back).
    KillBoth,
}

/// containerd, the shim (armed with one failpoint), a kubelet simulator and
/// a directory shared with the containers.
struct Env {
    kubelet: Kubelet,
    shim: Option<ShimProcess>,
    containerd: PrivateContainerd,
    listen: PathBuf,
    points: PathBuf,
    shared: PathBuf,
}

impl Env {
    async fn start(point: Option<&str>) -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let points = containerd.dir().join("failpoints");
        let shared = containerd.dir().join("shared");
        std::fs::create_dir_all(&points)?;
        std::fs::create_dir_all(&shared)?;
        let points_dir = points.display().to_string();
        let mut env = vec![("SIDECAR_SHIM_FAILPOINT_DIR", points_dir.as_str())];
        if let Some(p) = point {
            env.push(("SIDECAR_SHIM_FAILPOINTS", p));
        }
        let shim = ShimProcess::start_with_env(&listen, containerd.socket(), &[], &env).await?;
        let kubelet = Kubelet::with_config(
            &listen,
            &containerd.pod_log_root(),
            KubeletConfig {
                initial_backoff: Duration::from_secs(1),
                ..Default::default()
            },
        );
        Ok(Env {
            kubelet,
            shim: Some(shim),
            containerd,
            listen,
            points,
            shared,
        })
    }

    fn shim(&self) -> &ShimProcess {
        self.shim.as_ref().expect("a shim runs")
    }

    /// Wait for the shim to reach `point`, then do the fault.
    async fn inject(&mut self, point: &str, fault: Fault) -> Result<()> {
        let reached = self.points.join(format!("{point}.reached"));
        wait_for(TIMEOUT, &format!("the shim to reach {point}"), || {
            let reached = reached.clone();
            async move { reached.exists() }
        })
        .await?;
        if fault != Fault::KillShim {
            self.await_recorded_exit(point).await?;
        }
        match fault {
            Fault::KillShim => {
                let mut old = self.shim.take().expect("a shim runs");
                old.kill9().await?;
                drop(old);
                let shim = ShimProcess::start(&self.listen, self.containerd.socket(), &[]).await?;
                self.shim = Some(shim);
            }
            Fault::RestartContainerd => {
                self.containerd.kill()?;
                self.containerd.restart().await?;
                std::fs::write(self.points.join(format!("{point}.release")), "")?;
            }
            Fault::KillBoth => {
                let mut old = self.shim.take().expect("a shim runs");
                old.kill9().await?;
                drop(old);
                self.containerd.kill()?;
                let shim = ShimProcess::start(&self.listen, self.containerd.socket(), &[]).await?;
                self.shim = Some(shim);
                self.containerd.restart().await?;
            }
        }
        eprintln!("{fault:?} at {point}");
        Ok(())
    }

    /// At `after:exited:NAME`, wait until containerd's CRI has recorded the
    /// exit of NAME. The shim hears of an exit from containerd's task
    /// events, before the CRI has deleted the task and written the exit
    /// down; containerd killed in between loses the exit code itself
    /// (1.7 and later then report exit 255 "Unknown", with or without the
    /// shim). The fault is meant to land after the exit, as containerd
    /// knows it.
    async fn await_recorded_exit(&self, point: &str) -> Result<()> {
        let Some(name) = point.strip_prefix("after:exited:") else {
            return Ok(());
        };
        wait_for(
            TIMEOUT,
            &format!("containerd to record {name}'s exit"),
            move || async move {
                let (mut rt, _) = self.containerd.cri();
                let Ok(list) = rt.list_containers(ListContainersRequest::default()).await else {
                    return false;
                };
                let mut named = list
                    .into_inner()
                    .containers
                    .into_iter()
                    .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
                    .peekable();
                named.peek().is_some()
                    && named.all(|c| c.state == ContainerState::ContainerExited as i32)
            },
        )
        .await
    }

    /// containerd's own view of a container (never through the shim).
    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }

    /// containerd's view of every attempt of the pod's containers.
    async fn attempts(&self, pod: &PodHandle) -> Result<Vec<ContainerStatus>> {
        let (mut rt, _) = self.containerd.cri();
        let list = rt
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    label_selector: [(LABEL_POD_UID.to_string(), pod.uid().to_string())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        let mut out = Vec::new();
        for c in list {
            out.push(self.truth(&c.id).await?);
        }
        Ok(out)
    }

    /// The latest attempt of `name`, in containerd.
    async fn latest(&self, pod: &PodHandle, name: &str) -> Result<ContainerStatus> {
        self.attempts(pod)
            .await?
            .into_iter()
            .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
            .max_by_key(|c| c.metadata.as_ref().map(|m| m.attempt))
            .with_context(|| format!("no {name} in containerd"))
    }

    /// No container name of the pod runs twice in containerd.
    async fn no_duplicates(&self, pod: &PodHandle) -> Result<()> {
        let mut running: Vec<String> = self
            .attempts(pod)
            .await?
            .into_iter()
            .filter(|c| state(c) == ContainerState::ContainerRunning)
            .filter_map(|c| c.metadata.map(|m| m.name))
            .collect();
        running.sort();
        let before = running.len();
        running.dedup();
        ensure!(
            running.len() == before,
            "a container runs twice in containerd: {running:?}"
        );
        Ok(())
    }

    fn explain(&self, pod: &PodHandle) -> String {
        let mut s = pod.summary();
        let _ = writeln!(s, "--- shared files ---");
        if let Ok(entries) = std::fs::read_dir(&self.shared) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let _ = writeln!(s, "  {}: {}", e.file_name().to_string_lossy(), text.trim());
            }
        }
        let _ = writeln!(s, "--- shim log (info and up) ---");
        for l in self.shim().log().lines() {
            if !l.contains(" DEBUG ") && !l.contains(" TRACE ") {
                let _ = writeln!(s, "  {l}");
            }
        }
        s
    }
}

/// A CRI timestamp as `/proc/uptime` seconds.
fn uptime_of(nanos: i64) -> f64 {
    let now = Instant::now();
    uptime_at(now) - (unix_nanos_at(now) - nanos) as f64 / 1e9
}

/// Every uptime a container appended to `dir/file`.
fn recorded(dir: &Path, file: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(parse_uptime)
        .collect()
}

fn lines(dir: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A shell that records SIGTERM's arrival in /shared/NAME.term and exits
/// `code` (after `on_term`), runs `body`, then idles.
fn script(name: &str, code: i32, on_term: &str, body: &str) -> Vec<String> {
    sh(&format!(
        "trap 'cat /proc/uptime >> /shared/{name}.term; {on_term} exit {code}' TERM; {body} \
         while :; do sleep 3600 & wait $!; done"
    ))
}

/// The proxy of every scenario: opens its port 1.5 s after it starts and
/// relays one line per connection into /shared/received (the readiness
/// check connects and sends nothing); exits `code` on SIGTERM.
fn proxy(code: i32) -> Vec<String> {
    script(
        "proxy",
        code,
        "",
        &format!(
            "sleep 1.5; cat /proc/uptime >> /shared/proxy.listen; \
             nc -ll -p {PORT} -e sh -c 'read line && echo \"$line\" >> /shared/received' &"
        ),
    )
}

/// An app that says hello through the proxy once at start (recording
/// whether it got through) and, when `bye`, a last message 2 s after its
/// SIGTERM.
fn app(bye: bool) -> Vec<String> {
    let on_term = if bye {
        "sleep 2; echo bye | nc -w 5 127.0.0.1 8080 && cat /proc/uptime > /shared/app.sent;"
    } else {
        ""
    };
    script(
        "app",
        0,
        on_term,
        &format!(
            "cat /proc/uptime >> /shared/app.start; \
             if echo hello | nc -w 5 127.0.0.1 {PORT}; then echo ok >> /shared/app.connect; \
             else echo failed >> /shared/app.connect; fi;"
        ),
    )
}

// ---------------------------------------------------------------------------
// The scenarios

#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// [app, proxy]: the app's start is deferred until the proxy is ready.
    AppFirst,
    /// [proxy, app]: the app's start is held until the proxy is ready.
    SidecarFirst,
    /// A Job pod [proxy, main]: main exits 0, the proxy is stopped and
    /// reads as exit 0, the pod Succeeds.
    JobCompletion,
    /// Deletion of [proxy, app]: the app sends a last message through the
    /// proxy 2 s after its SIGTERM; the proxy's SIGTERM comes after.
    Shutdown,
}

fn pod_def(scenario: Scenario, dir: &Path) -> PodDef {
    let base = |name: &str| {
        PodDef::new(name)
            .termination_grace(GRACE)
            .annotation(SIDECARS, "proxy")
            .annotation(READY_PROXY, &format!("tcp://:{PORT}"))
    };
    let c = |name: &str, cmd: Vec<String>| ContainerDef::new(name, cmd).mount(dir, "/shared");
    match scenario {
        Scenario::AppFirst => base("app-first")
            .container(c("app", app(false)))
            .container(c("proxy", proxy(0))),
        Scenario::SidecarFirst => base("sidecar-first")
            .container(c("proxy", proxy(0)))
            .container(c("app", app(false))),
        Scenario::JobCompletion => PodDef::job("job")
            .termination_grace(GRACE)
            .annotation(SIDECARS, "proxy")
            .annotation(READY_PROXY, &format!("tcp://:{PORT}"))
            .annotation(RESTART_POLICY, "Never")
            .container(c("proxy", proxy(143)))
            .container(c(
                "main",
                sh("cat /proc/uptime >> /shared/main.start; sleep 1; exit 0"),
            )),
        Scenario::Shutdown => base("shutdown")
            .container(c("proxy", proxy(0)))
            .container(c("app", app(true))),
    }
}

/// Run `scenario`, injecting `fault` at `point` (None: no fault), and check
/// its outcome.
async fn run(scenario: Scenario, fault: Option<(&str, Fault)>) {
    let mut env = Env::start(fault.map(|(p, _)| p))
        .await
        .expect("environment");
    let dir = env.shared.clone();
    let pod = env
        .kubelet
        .run_pod(pod_def(scenario, &dir))
        .await
        .expect("run pod");
    let outcome = async {
        play(&mut env, scenario, fault, &pod, &dir).await?;
        promises_kept(&pod)
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", env.explain(&pod));
    }
}

/// kubelet never had to make a new attempt of a container it had been
/// told was started: a start the shim answered held across the fault. (A
/// new attempt after a start or create that failed with the fault is what
/// kubelet does with any runtime.)
fn promises_kept(pod: &PodHandle) -> Result<()> {
    let broken: Vec<_> = pod
        .duplicates()
        .into_iter()
        .filter(|d| matches!(d.start_answer, Some(Ok(()))))
        .collect();
    ensure!(
        broken.is_empty(),
        "kubelet re-created containers it was told had started: {broken:?}"
    );
    Ok(())
}

async fn play(
    env: &mut Env,
    scenario: Scenario,
    fault: Option<(&str, Fault)>,
    pod: &PodHandle,
    dir: &Path,
) -> Result<()> {
    {
        if let Scenario::Shutdown = scenario {
            // The faults of this scenario are on the way down.
            wait_running(env, pod, dir).await?;
            let ids: Vec<String> = ["proxy", "app"]
                .iter()
                .filter_map(|n| pod.container_ids(n).pop())
                .collect();
            let watch = watch_exits(env.containerd.socket().to_path_buf(), ids);
            let inject = async {
                match fault {
                    Some((point, fault)) => env.inject(point, fault).await,
                    None => Ok(()),
                }
            };
            let (deleted, injected) =
                tokio::join!(tokio::time::timeout(TIMEOUT, pod.delete(None)), inject);
            injected?;
            deleted.context("kubelet's deletion did not finish")??;
            let exits = watch.await.context("watch task")??;
            return check_shutdown(dir, exits);
        }
        if let Some((point, fault)) = fault {
            env.inject(point, fault).await?;
        }
        match scenario {
            Scenario::AppFirst | Scenario::SidecarFirst => {
                wait_running(env, pod, dir).await?;
                check_started(env, pod, dir).await
            }
            Scenario::JobCompletion | Scenario::Shutdown => check_job(env, pod, dir).await,
        }
    }
}

/// Both containers run in containerd and the app said hello.
async fn wait_running(env: &Env, pod: &PodHandle, dir: &Path) -> Result<()> {
    wait_for_value(TIMEOUT, "proxy and app to run", || async {
        for name in ["proxy", "app"] {
            if state(&env.latest(pod, name).await?) != ContainerState::ContainerRunning {
                return Ok(None);
            }
        }
        Ok((!lines(dir, "app.connect").is_empty()).then_some(()))
    })
    .await
}

/// Startup: every app run reached the proxy on its first try, after the
/// proxy opened its port; one app and one proxy run; kubelet reads them
/// running.
async fn check_started(env: &Env, pod: &PodHandle, dir: &Path) -> Result<()> {
    env.no_duplicates(pod).await?;
    let connects = lines(dir, "app.connect");
    ensure!(
        connects.iter().all(|l| l == "ok"),
        "the app did not reach its sidecar on its first try: {connects:?}"
    );
    let listen = recorded(dir, "proxy.listen");
    let starts = recorded(dir, "app.start");
    let first_listen = listen.first().copied().context("proxy never listened")?;
    for s in &starts {
        ensure!(
            *s + CLOCK_SLACK >= first_listen,
            "the app started at {s:.3}, before the proxy listened at {first_listen:.3}"
        );
    }
    for name in ["proxy", "app"] {
        let read = pod
            .latest(name)
            .await
            .with_context(|| format!("kubelet cannot read {name}"))?;
        ensure!(
            state(&read) == ContainerState::ContainerRunning,
            "kubelet reads {name} as {:?}",
            state(&read)
        );
    }
    Ok(())
}

/// Job completion: the pod Succeeded; containerd saw main exit 0 and the
/// proxy exit 143 from its SIGTERM, which came after main's exit; kubelet
/// read the proxy as exit 0.
async fn check_job(env: &Env, pod: &PodHandle, dir: &Path) -> Result<()> {
    check_job_ended(env, pod, dir, 0).await
}

/// [`check_job`] for a main that containerd says exited with `main_exit`:
/// the pod Succeeded for 0, else Failed, and kubelet read main's exit as
/// containerd gives it.
async fn check_job_ended(env: &Env, pod: &PodHandle, dir: &Path, main_exit: i32) -> Result<()> {
    let phase = if main_exit == 0 {
        Phase::Succeeded
    } else {
        Phase::Failed
    };
    pod.wait_phase(phase, TIMEOUT).await?;
    let main = env.latest(pod, "main").await?;
    let proxy = env.latest(pod, "proxy").await?;
    ensure!(
        (state(&main), main.exit_code) == (ContainerState::ContainerExited, main_exit),
        "containerd: main {:?} exit {}",
        state(&main),
        main.exit_code
    );
    let read = pod.synced("main").context("kubelet never read main")?;
    ensure!(
        (read.exit_code, read.reason.as_str()) == (main.exit_code, main.reason.as_str()),
        "kubelet read main as exit {} {:?}, containerd says {} {:?}",
        read.exit_code,
        read.reason,
        main.exit_code,
        main.reason
    );
    ensure!(
        (state(&proxy), proxy.exit_code) == (ContainerState::ContainerExited, 143),
        "containerd: proxy {:?} exit {}",
        state(&proxy),
        proxy.exit_code
    );
    let read = pod.synced("proxy").context("kubelet never read proxy")?;
    ensure!(
        (read.exit_code, read.reason.as_str()) == (0, "Completed"),
        "kubelet read proxy as exit {} {:?}",
        read.exit_code,
        read.reason
    );
    let term = recorded(dir, "proxy.term");
    let main_done = uptime_of(main.finished_at);
    ensure!(
        term.len() == 1 && term[0] + CLOCK_SLACK >= main_done,
        "proxy SIGTERM at {term:?}, main exited at {main_done:.3}"
    );
    Ok(())
}

/// Poll containerd (directly) until each container exited, keeping its
/// final status; errors while containerd restarts are retried.
fn watch_exits(
    socket: PathBuf,
    ids: Vec<String>,
) -> tokio::task::JoinHandle<Result<Vec<ContainerStatus>>> {
    tokio::spawn(async move {
        let mut done: Vec<Option<ContainerStatus>> = vec![None; ids.len()];
        let deadline = Instant::now() + TIMEOUT;
        while done.iter().any(Option::is_none) {
            let (mut rt, _) = cri_client(&socket);
            for (i, id) in ids.iter().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let r = rt
                    .container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    })
                    .await;
                if let Ok(Some(s)) = r.map(|r| r.into_inner().status) {
                    if state(&s) == ContainerState::ContainerExited {
                        done[i] = Some(s);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("containers {ids:?} did not all exit within {TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(done.into_iter().flatten().collect())
    })
}

/// Shutdown: the app got SIGTERM, sent its last message through the proxy
/// and exited 0; only then did the proxy get its SIGTERM; the message
/// arrived.
fn check_shutdown(dir: &Path, exits: Vec<ContainerStatus>) -> Result<()> {
    let [proxy, app] = &exits[..] else {
        bail!("statuses {exits:?}");
    };
    ensure!(
        (state(app), app.exit_code) == (ContainerState::ContainerExited, 0),
        "app {:?} exit {}",
        state(app),
        app.exit_code
    );
    let app_done = uptime_of(app.finished_at);
    let term = recorded(dir, "proxy.term");
    ensure!(
        term.len() == 1 && term[0] + CLOCK_SLACK >= app_done,
        "proxy SIGTERM at {term:?}, app exited at {app_done:.3}"
    );
    ensure!(
        !recorded(dir, "app.sent").is_empty(),
        "the app could not send its last message"
    );
    let received = lines(dir, "received");
    ensure!(
        received.last().map(String::as_str) == Some("bye"),
        "the proxy relayed {received:?}, want bye last"
    );
    ensure!(
        state(proxy) == ContainerState::ContainerExited,
        "proxy {:?}",
        state(proxy)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The matrix

macro_rules! crash_tests {
    ($($name:ident: $scenario:ident, $point:expr, $fault:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run(Scenario::$scenario, $point.map(|p: &str| (p, $fault))).await;
        }
    )*};
}

const NONE: Option<&str> = None;
use Fault::*;

crash_tests! {
    app_first_without_a_fault: AppFirst, NONE, KillShim;
    app_first_shim_killed_with_the_start_deferred_before_kubelet_heard: AppFirst, Some("after:start:app"), KillShim;
    app_first_shim_killed_when_the_sidecar_was_created: AppFirst, Some("after:created:proxy"), KillShim;
    app_first_shim_killed_when_the_sidecar_became_ready: AppFirst, Some("after:ready:proxy"), KillShim;
    app_first_shim_killed_with_the_deferred_start_in_flight: AppFirst, Some("before:started:app"), KillShim;
    app_first_containerd_restarted_with_the_start_deferred: AppFirst, Some("after:start:app"), RestartContainerd;
    app_first_containerd_restarted_when_the_sidecar_became_ready: AppFirst, Some("after:ready:proxy"), RestartContainerd;
    app_first_both_killed_when_the_sidecar_became_ready: AppFirst, Some("after:ready:proxy"), KillBoth;

    sidecar_first_without_a_fault: SidecarFirst, NONE, KillShim;
    sidecar_first_shim_killed_with_the_start_held: SidecarFirst, Some("after:start:app"), KillShim;
    sidecar_first_shim_killed_when_the_held_start_was_released: SidecarFirst, Some("after:ready:proxy"), KillShim;
    sidecar_first_containerd_restarted_with_the_start_held: SidecarFirst, Some("after:start:app"), RestartContainerd;

    job_without_a_fault: JobCompletion, NONE, KillShim;
    job_shim_killed_when_main_exited: JobCompletion, Some("after:exited:main"), KillShim;
    job_shim_killed_with_the_sidecar_stop_sent: JobCompletion, Some("before:exited:proxy"), KillShim;
    job_shim_killed_after_the_sidecar_exited: JobCompletion, Some("after:exited:proxy"), KillShim;
    job_containerd_restarted_when_main_exited: JobCompletion, Some("after:exited:main"), RestartContainerd;
    job_both_killed_when_main_exited: JobCompletion, Some("after:exited:main"), KillBoth;

    shutdown_without_a_fault: Shutdown, NONE, KillShim;
    shutdown_shim_killed_with_the_sidecar_stop_held: Shutdown, Some("after:stop:proxy"), KillShim;
    shutdown_shim_killed_when_the_app_exited: Shutdown, Some("after:exited:app"), KillShim;
    shutdown_shim_killed_at_stop_pod_sandbox: Shutdown, Some("after:stop-pod"), KillShim;
    shutdown_containerd_restarted_with_the_sidecar_stop_held: Shutdown, Some("after:stop:proxy"), RestartContainerd;
}

// ---------------------------------------------------------------------------
// containerd down while the shim itself must act

/// containerd is down when the sidecar becomes ready: the shim's own start
/// of the deferred app fails, is tried again, and lands once containerd is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_start_lands_after_containerd_comes_back() {
    let mut env = Env::start(None).await.expect("environment");
    let dir = env.shared.clone();
    let pod = env
        .kubelet
        .run_pod(pod_def(Scenario::AppFirst, &dir))
        .await
        .expect("run pod");
    let outcome = async {
        // The proxy runs (so the app's start was answered and deferred) but
        // does not listen yet, and the shim checks it inside the pod's
        // network namespace (it asked containerd where that is); then
        // containerd goes away.
        let log = env.shim().log_path().to_path_buf();
        wait_for_value(TIMEOUT, "the shim to check the proxy", || async {
            let running =
                state(&env.latest(&pod, "proxy").await?) == ContainerState::ContainerRunning;
            let checking = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("sidecar not ready yet") && !l.contains("network namespace"));
            Ok((running && checking && recorded(&dir, "proxy.listen").is_empty()).then_some(()))
        })
        .await?;
        env.containerd.kill()?;
        // The proxy opens its port; the shim sees it ready (its check
        // connects inside the pod's network namespace, no containerd
        // needed) and its start of the app fails.
        wait_for(TIMEOUT, "the shim to retry the start", || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("runtime unreachable; starting the deferred container again")
            }
        })
        .await?;
        env.containerd.restart().await?;
        wait_running(&env, &pod, &dir).await?;
        check_started(&env, &pod, &dir).await?;
        promises_kept(&pod)
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", env.explain(&pod));
    }
}

/// containerd dies under kubelet's start of main: it is frozen while the
/// shim waits for the proxy (which opens its port only then), so the shim
/// sends main's start to a containerd that never answers; then it is
/// killed, so kubelet's start fails without containerd's answer. Whether
/// main started is known only once containerd is back; the shim reads it
/// then. main never ran, so it reads as created,
/// kubelet creates main again, and the proxy is stopped only after that
/// attempt exits, not when the lost start failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_waits_out_a_start_lost_with_containerd() {
    let mut env = Env::start(None).await.expect("environment");
    let dir = env.shared.clone();
    // The Job scenario's pod, with a proxy that opens its port only when
    // the test creates /shared/open (after containerd is frozen).
    let c = |name: &str, cmd: Vec<String>| ContainerDef::new(name, cmd).mount(&dir, "/shared");
    let gated = script(
        "proxy",
        143,
        "",
        &format!(
            "while [ ! -f /shared/open ]; do sleep 0.1; done; \
             cat /proc/uptime >> /shared/proxy.listen; nc -ll -p {PORT} -e true &"
        ),
    );
    let def = PodDef::job("job")
        .termination_grace(GRACE)
        .annotation(SIDECARS, "proxy")
        .annotation(READY_PROXY, &format!("tcp://:{PORT}"))
        .annotation(RESTART_POLICY, "Never")
        .container(c("proxy", gated))
        .container(c(
            "main",
            sh("cat /proc/uptime >> /shared/main.start; sleep 1; exit 0"),
        ));
    let pod = env.kubelet.run_pod(def).await.expect("run pod");
    let outcome = async {
        // main's start is held until the proxy listens, and the shim checks
        // the proxy inside the pod's network namespace (no containerd
        // needed once it knows where that is).
        let log = env.shim().log_path().to_path_buf();
        let logged = |what: &'static str| {
            let log = log.clone();
            move || {
                let log = log.clone();
                async move {
                    std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .lines()
                        .any(|l| l.contains(what) && !l.contains("network namespace"))
                }
            }
        };
        wait_for(TIMEOUT, "the shim to check the proxy", logged("sidecar not ready yet")).await?;
        // main created and its start held (kubelet's CreateContainer must
        // not meet the frozen containerd).
        wait_for(TIMEOUT, "the shim to hold main's start", logged("start held")).await?;
        env.containerd.freeze()?;
        std::fs::write(dir.join("open"), "")?;
        wait_for(TIMEOUT, "the shim to send main's start on", logged("held start released"))
            .await?;
        env.containerd.kill()?;
        env.containerd.restart().await?;
        check_job_ended(&env, &pod, &dir, 0).await?;
        let attempts = env
            .attempts(&pod)
            .await?
            .into_iter()
            .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == "main"))
            .count();
        ensure!(
            attempts == 2 && recorded(&dir, "main.start").len() == 1,
            "main: {attempts} attempts at containerd, {} runs recorded (want 2 and 1: the lost start never ran)",
            recorded(&dir, "main.start").len()
        );
        promises_kept(&pod)
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", env.explain(&pod));
    }
}

/// containerd is down when main exits: the shim's exit polling fails
/// meanwhile, sees the exit once containerd is back, and the Job completes.
///
/// As containerd reports main's exit: 1.6 gets it from main's shim when it
/// starts again (exit 0, the Job succeeds). 1.7 and 2.x do not: at start-up
/// they take the shim of a task that is no longer running for a leaked one
/// ("cleaning leaked shim process"), stop it and report the exit as 255
/// "Unknown", to kubelet as much as to the shim (the Job fails). Either
/// way the shim stops the proxy after main and kubelet reads what
/// containerd says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes_when_containerd_comes_back_after_main_exited() {
    let mut env = Env::start(None).await.expect("environment");
    let dir = env.shared.clone();
    let pod = env
        .kubelet
        .run_pod(pod_def(Scenario::JobCompletion, &dir))
        .await
        .expect("run pod");
    let outcome = async {
        wait_for(TIMEOUT, "main to start", || async {
            !recorded(&dir, "main.start").is_empty()
        })
        .await?;
        env.containerd.kill()?;
        // main runs for 1 s; its exit happens while containerd is down.
        let started = recorded(&dir, "main.start")[0];
        wait_for(TIMEOUT, "main's second to pass", || async move {
            uptime_at(Instant::now()) > started + 1.5
        })
        .await?;
        env.containerd.restart().await?;
        let main = wait_for_value(TIMEOUT, "containerd to report main's exit", || async {
            let main = env.latest(&pod, "main").await?;
            Ok((state(&main) == ContainerState::ContainerExited).then_some(main))
        })
        .await?;
        let exit = (main.exit_code, main.reason.as_str());
        let lost = (255, "Unknown");
        ensure!(
            exit == (0, "Completed")
                || (exit == lost && env.containerd.selected_version() != "1.6"),
            "containerd {}: main exit {exit:?}",
            env.containerd.version()
        );
        check_job_ended(&env, &pod, &dir, main.exit_code).await?;
        promises_kept(&pod)
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", env.explain(&pod));
    }
}
