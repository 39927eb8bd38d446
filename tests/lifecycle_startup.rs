//! Sidecar startup end to end: the `sidecar-shim` binary in front of a
//! private containerd, driven by the kubelet simulator (`support::kubelet`).
//!
//! Order and timing are judged from what cannot be the shim's or the
//! simulator's own bookkeeping: containerd's timestamps, read from containerd
//! directly (never through the shim), and what the containers themselves
//! wrote into a shared host directory (`/proc/uptime`, one clock for every
//! container and the host). The simulator's call records are used for what
//! kubelet did and saw (which calls, how long they took, what they
//! answered).
//!
//! Scenarios:
//! * a. spec order [app, sidecar], TCP readiness: the app's start is
//!   answered at once and deferred; kubelet reads it as running meanwhile and
//!   makes no second attempt; it really starts after the port opened.
//! * b. spec order [sidecar, app], HTTP readiness: the app's start is held
//!   until the sidecar answers 200.
//! * c. two sidecars with exec readiness: each starts after the one before
//!   is ready, the app after both; on deletion SIGTERM goes app, sidecar 2,
//!   sidecar 1, each once the one before has exited (every container takes
//!   1 s to exit, so the order shows in containerd's `finished_at`).
//! * g. a malformed annotation: the pod runs as without the shim (next to a
//!   control that is held), with one warning in the shim's log.
//! * h. a pod without annotations: the shim answers exactly as containerd.
//! * j. a sidecar that never becomes ready (ready-timeout 5 s, fail): the
//!   app never runs and kubelet reads why; once the sidecar is ready a retry
//!   goes through; a pod deleted while its app waits is torn down within its
//!   grace period.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerState, ContainerStateValue, ContainerStatus,
    ContainerStatusRequest, ContainerStatusResponse, CreateContainerRequest,
    CreateContainerResponse, ExecSyncRequest, ExecSyncResponse, ListContainersRequest,
    ListContainersResponse, ListPodSandboxRequest, ListPodSandboxResponse, PodSandboxFilter,
    PodSandboxStatusRequest, PodSandboxStatusResponse, StartContainerRequest,
    StartContainerResponse, StopContainerRequest, StopContainerResponse,
};
use support::kubelet::*;
use support::state_of as state;
use support::*;
use tonic::transport::Channel;

/// Generous: a loaded 2-core machine runs several of these at once.
const TIMEOUT: Duration = Duration::from_secs(60);
/// kubelet's first crash-loop backoff, shortened so retries come quickly.
const BACKOFF: Duration = Duration::from_secs(1);
/// terminationGracePeriodSeconds of every pod here.
const GRACE: Duration = Duration::from_secs(10);
/// The port sidecars open (every pod has its own network namespace).
const PORT: u16 = 8080;
/// Slack when comparing a container's `/proc/uptime` reading (10 ms steps)
/// with a containerd wall-clock time converted to uptime.
const CLOCK_SLACK: f64 = 0.02;
/// How long every container here takes to exit after its SIGTERM (its trap
/// sleeps this long). It is what makes a stop order visible: a container
/// signalled only once the one before it had exited finishes at least this
/// long after it, while containers signalled together finish together.
const EXIT_DELAY: Duration = Duration::from_secs(1);
/// The ready-timeout of a pod without the annotation (README, "Annotations"):
/// how long a held start would wait for a sidecar that never gets ready.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The timeout of the execs the tests send.
const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

const SIDECARS: &str = "sidecar-shim.io/sidecars";

fn ready_key(container: &str) -> String {
    format!("sidecar-shim.io/ready.{container}")
}

// ---------------------------------------------------------------------------
// The environment

/// containerd, the shim in front of it, a simulated kubelet talking to the
/// shim, and a host directory to share with containers. (Fields drop in
/// order: kubelet, shim, containerd.)
struct Env {
    kubelet: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
    /// Mounted at /shared in the containers.
    shared: PathBuf,
}

impl Env {
    async fn start() -> Result<Env> {
        Self::start_with(KubeletConfig {
            initial_backoff: BACKOFF,
            ..Default::default()
        })
        .await
    }

    async fn start_with(config: KubeletConfig) -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let kubelet = Kubelet::with_config(shim.listen(), &containerd.pod_log_root(), config);
        let shared = containerd.dir().join("shared");
        std::fs::create_dir_all(&shared)?;
        Ok(Env {
            kubelet,
            shim,
            containerd,
            shared,
        })
    }

    /// A fresh subdirectory of the shared directory (one per pod when a test
    /// runs several).
    fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.shared.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A client straight to containerd, bypassing the shim.
    fn direct(&self) -> RuntimeServiceClient<Channel> {
        self.containerd.cri().0
    }

    /// A client through the shim (as kubelet's).
    fn via_shim(&self) -> RuntimeServiceClient<Channel> {
        self.shim.cri().0
    }

    /// containerd's own status of a container.
    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        container_status(&self.direct(), id).await
    }

    /// The shim's log without the per-call debug lines: its decisions,
    /// warnings and errors.
    fn decisions(&self) -> String {
        self.shim
            .log()
            .lines()
            .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything worth seeing when an assertion about `pod` fails.
    fn diag(&self, pod: &PodHandle) -> String {
        format!(
            "{}\nshim log (info and up):\n{}",
            pod.summary(),
            self.decisions()
        )
    }
}

/// A CRI timestamp (wall-clock nanoseconds) as `/proc/uptime` seconds.
fn uptime_of_nanos(nanos: i64) -> f64 {
    let now = Instant::now();
    uptime_at(now) - (unix_nanos_at(now) - nanos) as f64 / 1e9
}

/// Every uptime a container appended to `dir/file`, in order.
fn recorded_all(dir: &Path, file: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(parse_uptime)
        .collect()
}

/// The first uptime recorded in `dir/file`, waiting for it.
async fn recorded(dir: &Path, file: &str) -> Result<f64> {
    wait_for_value(TIMEOUT, &format!("{file} to be recorded"), || {
        let v = recorded_all(dir, file).first().copied();
        async move { Ok(v) }
    })
    .await
}

/// A container command: SIGTERM is trapped (recorded in /shared/NAME.term,
/// then exit 0 after [`EXIT_DELAY`]), `body` runs (it must end with `;` or
/// `&`), then the shell idles until SIGTERM (in `wait`, which the trapped
/// signal interrupts at once).
fn script(name: &str, body: &str) -> Vec<String> {
    sh(&format!(
        "trap 'cat /proc/uptime >> /shared/{name}.term; sleep {}; exit 0' TERM; {body} \
         while :; do sleep 3600 & wait $!; done",
        EXIT_DELAY.as_secs()
    ))
}

/// Shell: append the uptime to /shared/FILE.
fn rec(file: &str) -> String {
    format!("cat /proc/uptime >> /shared/{file};")
}

/// The calls kubelet's first sync made, as (method, container, attempt,
/// error code).
fn start_sequence(pod: &PodHandle) -> Vec<(String, String, Option<u32>, Option<tonic::Code>)> {
    pod.calls()
        .into_iter()
        .filter(|c| c.origin == Origin::Start)
        .map(|c| {
            (
                c.method.to_string(),
                c.container.unwrap_or_default(),
                c.attempt,
                c.error.map(|e| e.code),
            )
        })
        .collect()
}

async fn wait_call_done(pod: &PodHandle, method: &str, container: &str) -> Result<CriCall> {
    wait_for_value(
        TIMEOUT,
        &format!("kubelet's {method} of {container} to return"),
        || {
            let c = pod
                .first_call(method, Some(container))
                .filter(|c| !c.in_flight());
            async move { Ok(c) }
        },
    )
    .await
    .with_context(|| pod.summary())
}

/// Wait until containerd itself runs some attempt of `name`; returns its id
/// and containerd's status.
async fn wait_really_running(
    env: &Env,
    pod: &PodHandle,
    name: &str,
) -> Result<(String, ContainerStatus)> {
    wait_for_value(
        TIMEOUT,
        &format!("containerd to run {name}"),
        || async move {
            for id in pod.container_ids(name) {
                let s = env.truth(&id).await?;
                if state(&s) == ContainerState::ContainerRunning {
                    return Ok(Some((id, s)));
                }
            }
            Ok(None)
        },
    )
    .await
    .with_context(|| env.diag(pod))
}

/// Delete `pod` the way kubelet does, and check from containerd and the
/// containers' own records that SIGTERM reached the containers in `order`
/// (normal containers first, then the sidecars last to first), each only
/// once the one before it had exited. Returns the simulator's stop timings.
///
/// Every container takes [`EXIT_DELAY`] to exit after its SIGTERM, so the
/// order shows in containerd's `finished_at`: a container signalled only
/// after the one before had exited finishes at least `EXIT_DELAY` after it,
/// and its SIGTERM record is no earlier than that exit. Had the shim let
/// every SIGTERM through at once, all would have been signalled together
/// and finished together, `EXIT_DELAY` short of both checks.
async fn check_stopped_in_order(
    env: &Env,
    pod: &PodHandle,
    dir: &Path,
    order: &[&str],
) -> Result<Vec<StopTiming>> {
    let ids = order
        .iter()
        .map(|name| pod.container_ids(name).pop().context("no attempt"))
        .collect::<Result<Vec<_>>>()?;
    // Up to the removal: the stopped containers stay in containerd, to be
    // read directly.
    let timings = pod.terminate(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    let mut exits = Vec::new();
    for (name, id) in order.iter().zip(&ids) {
        let t = env.truth(id).await?;
        let term = recorded(dir, &format!("{name}.term")).await?;
        ensure!(
            state(&t) == ContainerState::ContainerExited && t.exit_code == 0,
            "{name} not ended by its SIGTERM trap: {:?} exit {}\n{}",
            state(&t),
            t.exit_code,
            env.diag(pod)
        );
        exits.push((*name, term, t.finished_at));
    }
    let line: Vec<String> = exits
        .iter()
        .map(|(name, term, done)| {
            format!(
                "{name} SIGTERM {term:.2} exited {:.3}",
                uptime_of_nanos(*done)
            )
        })
        .collect();
    eprintln!("stop order (uptime): {}", line.join("; "));
    let delay = EXIT_DELAY.as_nanos() as i64;
    let slack = (CLOCK_SLACK * 1e9) as i64;
    for pair in exits.windows(2) {
        let [(before, _, before_done), (after, after_term, after_done)] = pair else {
            unreachable!()
        };
        let before_exit = uptime_of_nanos(*before_done);
        ensure!(
            *after_term >= before_exit - CLOCK_SLACK,
            "{after} got SIGTERM at {after_term}, before {before} exited at {before_exit:.3}\n{}",
            env.diag(pod)
        );
        ensure!(
            after_done - before_done >= delay - slack,
            "{after} exited {:.3} s after {before}, less than the {EXIT_DELAY:?} it takes \
             after its SIGTERM\n{}",
            (after_done - before_done) as f64 / 1e9,
            env.diag(pod)
        );
    }
    // kubelet asked for every stop before the first container had even
    // exited: the order is the shim's doing.
    let first_exit = exits.first().map(|e| e.2).context("no containers")?;
    for t in &timings {
        ensure!(
            unix_nanos_at(t.sent) < first_exit,
            "kubelet stopped {} only after {} exited: {timings:?}",
            t.container,
            order[0]
        );
    }
    let removed = pod.delete(None).await?;
    ensure!(removed.is_empty(), "stopped again on removal: {removed:?}");
    Ok(timings)
}

/// Has kubelet read the app in a sync of its own (after a PLEG relist, not
/// while starting it)?
fn read_by_a_sync(pod: &PodHandle) -> bool {
    pod.calls_of("ContainerStatus", Some("app"))
        .iter()
        .any(|c| c.origin == Origin::Sync && c.ok())
}

fn list_filter(state: Option<ContainerState>, uid: &str) -> ListContainersRequest {
    ListContainersRequest {
        filter: Some(ContainerFilter {
            state: state.map(|s| ContainerStateValue { state: s as i32 }),
            label_selector: [(LABEL_POD_UID.to_string(), uid.to_string())].into(),
            ..Default::default()
        }),
    }
}

// ---------------------------------------------------------------------------
// a. [app, sidecar]: deferred

/// Spec order [app, proxy], proxy ready on TCP: kubelet's StartContainer of
/// the app is answered at once (kubelet has not created the proxy yet and
/// would deadlock), the app reads as running everywhere kubelet looks while
/// containerd has it CREATED, exec into it fails at once, kubelet makes no
/// second attempt, and containerd starts it only after the proxy opened its
/// port (which it does once the test lets it: after these checks, and after
/// kubelet's PLEG relisted and kubelet read the pod while the app waited).
/// On deletion the proxy gets its SIGTERM once the app has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_app_listed_first_is_deferred_until_the_sidecar_port_opens() -> Result<()> {
    let env = Env::start().await?;
    let dir = &env.shared;
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("defer-tcp")
                .termination_grace(GRACE)
                .annotation(SIDECARS, "proxy")
                .annotation(&ready_key("proxy"), &format!("tcp://:{PORT}"))
                .container(
                    ContainerDef::new("app", script("app", &rec("app.start")))
                        .mount(dir, "/shared"),
                )
                .container(gated_proxy(dir)),
        )
        .await?;

    // kubelet's start of the app comes back at once...
    let app_start = wait_call_done(&pod, "StartContainer", "app").await?;
    ensure!(
        app_start.ok(),
        "app's StartContainer failed\n{}",
        env.diag(&pod)
    );
    let app_id = pod.container_ids("app")[0].clone();

    // ... and while containerd still has it CREATED, everything kubelet reads
    // says RUNNING, and an exec fails at once.
    let mut shim = env.via_shim();
    let before = env.truth(&app_id).await?;
    let status = container_status(&shim, &app_id).await?;
    let all = shim
        .list_containers(list_filter(None, pod.uid()))
        .await?
        .into_inner()
        .containers;
    let running = shim
        .list_containers(list_filter(
            Some(ContainerState::ContainerRunning),
            pod.uid(),
        ))
        .await?
        .into_inner()
        .containers;
    let created = shim
        .list_containers(list_filter(
            Some(ContainerState::ContainerCreated),
            pod.uid(),
        ))
        .await?
        .into_inner()
        .containers;
    let exec_began = Instant::now();
    let exec = exec_sync(&mut shim, &app_id, &["true"], EXEC_TIMEOUT.as_secs() as i64).await;
    let exec_took = exec_began.elapsed();
    let after = env.truth(&app_id).await?;
    ensure!(
        state(&before) == ContainerState::ContainerCreated
            && state(&after) == ContainerState::ContainerCreated,
        "containerd started the app before the checks were done (before {:?}, after {:?})\n{}",
        state(&before),
        state(&after),
        env.diag(&pod)
    );
    assert_eq!(
        state(&status),
        ContainerState::ContainerRunning,
        "{status:?}"
    );
    let listed = all
        .iter()
        .find(|c| c.id == app_id)
        .context("app not listed")?;
    assert_eq!(listed.state, ContainerState::ContainerRunning as i32);
    ensure!(
        running.iter().any(|c| c.id == app_id),
        "app not listed with state filter RUNNING: {running:?}"
    );
    ensure!(
        !created.iter().any(|c| c.id == app_id),
        "app listed with state filter CREATED: {created:?}"
    );
    let err = exec.err().context("exec into the deferred app succeeded")?;
    ensure!(
        format!("{err:#}").contains("has not started"),
        "exec error: {err:#}"
    );
    // At once: a shim waiting for the app would have run into the exec's
    // own 10 s timeout (the port stays closed until the test opens it).
    ensure!(exec_took < EXEC_TIMEOUT / 2, "exec took {exec_took:?}");

    // kubelet reads the pod while the app waits (a sync after a PLEG
    // relist); then the proxy may open its port.
    wait_for(TIMEOUT, "kubelet to read the app while it waits", || {
        let read = read_by_a_sync(&pod);
        async move { read }
    })
    .await
    .with_context(|| env.diag(&pod))?;
    std::fs::write(dir.join("open"), "")?;

    // containerd starts the app only after the port opened.
    let (_, app) = wait_really_running(&env, &pod, "app").await?;
    let listen_at = recorded(dir, "proxy.listen").await?;
    let app_at = recorded(dir, "app.start").await?;
    let proxy = env.truth(&pod.container_ids("proxy")[0]).await?;
    let app_started = uptime_of_nanos(app.started_at);
    let proxy_started = uptime_of_nanos(proxy.started_at);
    eprintln!(
        "uptime: app StartContainer {:.3}..{:.3}, proxy started {proxy_started:.3}, \
         port opened {listen_at:.2}, app started {app_started:.3} (recorded {app_at:.2})",
        uptime_at(app_start.start),
        uptime_at(app_start.end.unwrap_or(app_start.start)),
    );
    ensure!(
        app_at >= listen_at && app_started >= listen_at - CLOCK_SLACK,
        "app started at {app_at} (containerd {app_started:.3}), port opened at {listen_at}\n{}",
        env.diag(&pod)
    );
    ensure!(app_started > proxy_started, "app before proxy");
    // Deferred, not held: answered before the proxy even opened its port,
    // and so well before the 90 s ready-timeout a held start would have
    // waited for (kubelet creates the proxy only after this answer).
    let answered = app_start.end.context("in flight")?;
    ensure!(
        uptime_at(answered) < listen_at && app_start.duration() < Some(DEFAULT_READY_TIMEOUT / 2),
        "app's StartContainer took {:?}, returned at {:.3}, port opened at {listen_at}",
        app_start.duration(),
        uptime_at(answered)
    );

    // kubelet read the pod while the app waited, saw it RUNNING, and made
    // no second attempt.
    ensure!(
        pod.calls_of("ContainerStatus", Some("app"))
            .iter()
            .any(|c| c.origin == Origin::Sync
                && c.ok()
                && c.end.is_some_and(|e| unix_nanos_at(e) < app.started_at)),
        "kubelet did not read the app while it waited\n{}",
        env.diag(&pod)
    );
    let synced = pod.synced("app").context("kubelet never read the app")?;
    ensure!(
        synced.id == app_id && state(&synced) == ContainerState::ContainerRunning,
        "kubelet read {synced:?}"
    );
    ensure!(
        pod.duplicates().is_empty() && pod.container_ids("app").len() == 1,
        "{}",
        env.diag(&pod)
    );
    pod.wait_phase(Phase::Running, TIMEOUT).await?;

    // Teardown: the sidecar gets its SIGTERM once the app has exited.
    check_stopped_in_order(&env, &pod, dir, &["app", "proxy"]).await?;
    ensure!(pod.duplicates().is_empty(), "{}", env.diag(&pod));
    assert_eq!(recorded_all(dir, "app.start").len(), 1);
    Ok(())
}

// ---------------------------------------------------------------------------
// b. [sidecar, app]: held

/// Spec order [proxy, app], proxy ready on HTTP: the proxy serves at once but
/// answers 404 until, 1 s later, it writes the file the check asks for.
/// kubelet's StartContainer of the app is held until the proxy answers 200
/// and the app starts only then. On deletion the proxy gets its SIGTERM once
/// the app has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_app_listed_after_its_sidecar_is_held_until_http_200() -> Result<()> {
    let env = Env::start().await?;
    let dir = &env.shared;
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("hold-http")
                .termination_grace(GRACE)
                .annotation(SIDECARS, "proxy")
                .annotation(&ready_key("proxy"), &format!("http://:{PORT}/ready"))
                .container(
                    ContainerDef::new(
                        "proxy",
                        script(
                            "proxy",
                            &format!(
                                "mkdir -p /www; {} httpd -f -p {PORT} -h /www & sleep 1; {} \
                                 echo ok > /www/ready;",
                                rec("proxy.start"),
                                rec("proxy.ready")
                            ),
                        ),
                    )
                    .mount(dir, "/shared"),
                )
                .container(
                    ContainerDef::new("app", script("app", &rec("app.start")))
                        .mount(dir, "/shared"),
                ),
        )
        .await?;

    let (app_id, app) = wait_really_running(&env, &pod, "app").await?;
    let app_start = wait_call_done(&pod, "StartContainer", "app").await?;
    ensure!(app_start.ok(), "{}", env.diag(&pod));
    let ready_at = recorded(dir, "proxy.ready").await?;
    let app_at = recorded(dir, "app.start").await?;
    let app_started = uptime_of_nanos(app.started_at);
    let (sent, answered) = (
        uptime_at(app_start.start),
        uptime_at(app_start.end.context("in flight")?),
    );
    eprintln!(
        "uptime: app StartContainer {sent:.3}..{answered:.3} ({:?}), 200 from {ready_at:.2}, \
         app started {app_started:.3} (recorded {app_at:.2})",
        app_start.duration()
    );
    ensure!(
        app_at >= ready_at && app_started >= ready_at - CLOCK_SLACK,
        "app started at {app_at} (containerd {app_started:.3}) before the sidecar served 200 \
         at {ready_at}\n{}",
        env.diag(&pod)
    );
    // Held: sent before the sidecar was ready, answered after the app
    // started (the shim forwards it once ready), so it lasted the wait.
    ensure!(
        sent < ready_at && answered >= app_started - CLOCK_SLACK,
        "StartContainer {sent:.3}..{answered:.3}, ready {ready_at}, started {app_started:.3}"
    );
    let waited = ready_at - sent;
    let took = app_start.duration().context("in flight")?.as_secs_f64();
    ensure!(
        took >= waited - CLOCK_SLACK && took < waited + 3.0,
        "StartContainer took {took:.3} s for a wait of {waited:.3} s"
    );
    // The proxy was created and started before the app (kubelet's order).
    let proxy = env.truth(&pod.container_ids("proxy")[0]).await?;
    ensure!(proxy.started_at < app.created_at);
    ensure!(
        pod.duplicates().is_empty() && pod.container_ids("app") == [app_id],
        "{}",
        env.diag(&pod)
    );
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    check_stopped_in_order(&env, &pod, dir, &["app", "proxy"]).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// c. two sidecars, exec readiness; reverse-order stop

/// terminationGracePeriodSeconds of the pod in c: its three containers stop
/// one after the other, each taking [`EXIT_DELAY`] after the shim saw the
/// one before exit; well clear of that, so that only a stop held until its
/// grace ran out (the failure) comes near it.
const SEQUENTIAL_GRACE: Duration = Duration::from_secs(30);

/// Sidecars s1 and s2 (in that order), each ready (an exec check finds
/// /tmp/ready) about 1 s after it starts; spec order [s1, s2, app]. s2
/// starts after s1 is ready, the app after both. On deletion the app gets
/// SIGTERM first, then s2 once the app exited, then s1 once s2 exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_two_exec_sidecars_start_in_order_and_stop_in_reverse() -> Result<()> {
    let env = Env::start().await?;
    let dir = &env.shared;
    let check = r#"exec:["sh","-c","test -f /tmp/ready"]"#;
    let sidecar = |name: &str| {
        ContainerDef::new(
            name,
            script(
                name,
                &format!(
                    "{} sleep 1; {} touch /tmp/ready;",
                    rec(&format!("{name}.start")),
                    rec(&format!("{name}.ready"))
                ),
            ),
        )
        .mount(dir, "/shared")
    };
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("two-exec")
                .termination_grace(SEQUENTIAL_GRACE)
                .annotation(SIDECARS, "s1,s2")
                .annotation(&ready_key("s1"), check)
                .annotation(&ready_key("s2"), check)
                .container(sidecar("s1"))
                .container(sidecar("s2"))
                .container(
                    ContainerDef::new("app", script("app", &rec("app.start")))
                        .mount(dir, "/shared"),
                ),
        )
        .await?;

    let (_, app) = wait_really_running(&env, &pod, "app").await?;
    pod.wait_started(TIMEOUT).await?;
    let s1 = env.truth(&pod.container_ids("s1")[0]).await?;
    let s2 = env.truth(&pod.container_ids("s2")[0]).await?;
    let s1_ready = recorded(dir, "s1.ready").await?;
    let s2_ready = recorded(dir, "s2.ready").await?;
    let s2_at = recorded(dir, "s2.start").await?;
    let app_at = recorded(dir, "app.start").await?;
    let (s1_started, s2_started, app_started) = (
        uptime_of_nanos(s1.started_at),
        uptime_of_nanos(s2.started_at),
        uptime_of_nanos(app.started_at),
    );
    eprintln!(
        "uptime: s1 started {s1_started:.3} ready {s1_ready:.2}; s2 started {s2_started:.3} \
         (recorded {s2_at:.2}) ready {s2_ready:.2}; app started {app_started:.3} (recorded {app_at:.2})"
    );
    ensure!(
        s2_at >= s1_ready && s2_started >= s1_ready - CLOCK_SLACK,
        "s2 started at {s2_at} (containerd {s2_started:.3}) before s1 was ready at {s1_ready}\n{}",
        env.diag(&pod)
    );
    ensure!(
        app_at >= s2_ready && app_started >= s2_ready - CLOCK_SLACK,
        "app started at {app_at} (containerd {app_started:.3}) before s2 was ready at {s2_ready}\n{}",
        env.diag(&pod)
    );
    // Both later starts were held across the wait for the sidecar before.
    for (name, ready_before) in [("s2", s1_ready), ("app", s2_ready)] {
        let call = wait_call_done(&pod, "StartContainer", name).await?;
        ensure!(call.ok(), "{}", env.diag(&pod));
        let (sent, answered) = (
            uptime_at(call.start),
            uptime_at(call.end.context("in flight")?),
        );
        ensure!(
            sent < ready_before && answered >= ready_before,
            "{name}'s StartContainer {sent:.3}..{answered:.3}, the sidecar before ready at {ready_before}"
        );
    }
    ensure!(pod.duplicates().is_empty(), "{}", env.diag(&pod));
    pod.wait_phase(Phase::Running, TIMEOUT).await?;

    // Deletion: kubelet stops all three at once (each before the app
    // exited); SIGTERM reaches them in reverse order, each after the one
    // before has exited.
    let began = Instant::now();
    let timings = check_stopped_in_order(&env, &pod, dir, &["app", "s2", "s1"]).await?;
    let took = began.elapsed();
    let names: Vec<&str> = timings.iter().map(|t| t.container.as_str()).collect();
    assert_eq!(names, ["s1", "s2", "app"]);
    eprintln!("delete took {took:?}");
    // Not by the grace period running out (each held stop would have waited
    // for it).
    ensure!(took < SEQUENTIAL_GRACE, "delete took {took:?}");
    assert_eq!(pod.phase(), Phase::Succeeded, "{}", env.diag(&pod));
    Ok(())
}

// ---------------------------------------------------------------------------
// g. malformed annotation

/// A pod [proxy, app] whose proxy opens its port only once `open` exists in
/// its shared directory `dir`, with the readiness annotation `ready`.
fn gated_pod(name: &str, dir: &Path, ready: &str) -> PodDef {
    PodDef::new(name)
        .termination_grace(GRACE)
        .annotation(SIDECARS, "proxy")
        .annotation(&ready_key("proxy"), ready)
        .container(gated_proxy(dir))
        .container(ContainerDef::new("app", script("app", &rec("app.start"))).mount(dir, "/shared"))
}

/// A proxy that records its start, opens port [`PORT`] once the test
/// creates `open` in the shared directory `dir`, and records that moment.
fn gated_proxy(dir: &Path) -> ContainerDef {
    ContainerDef::new(
        "proxy",
        script(
            "proxy",
            &format!(
                "{} while [ ! -f /shared/open ]; do sleep 0.1; done; {} \
                 nc -ll -p {PORT} -e true &",
                rec("proxy.start"),
                rec("proxy.listen")
            ),
        ),
    )
    .mount(dir, "/shared")
}

/// `ready.proxy: tcp://:notaport`: the pod is forwarded untouched, and the
/// shim logs exactly one warning naming the pod, the key and the value.
///
/// Untouched is shown against two other runs of the same pod, whose proxy
/// opens port 8080 only when the test lets it: a control through the shim
/// with a valid `tcp://:8080`, whose app is held while the port is closed
/// and starts only after it opened; and the malformed pod straight on
/// containerd. Through the shim the malformed pod's app runs while the
/// control's waits and its proxy has not opened a port at all, kubelet's
/// calls and answers are those of the run without the shim, and on deletion
/// both its containers get SIGTERM together (neither waits for the other to
/// exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_malformed_annotation_runs_the_pod_untouched_with_one_warning() -> Result<()> {
    let env = Env::start().await?;
    let (dir, control_dir, direct_dir) = (
        &env.subdir("bad")?,
        &env.subdir("control")?,
        &env.subdir("direct")?,
    );
    let (key, value) = (ready_key("proxy"), "tcp://:notaport");
    let direct_kubelet = Kubelet::with_config(
        env.containerd.socket(),
        &env.containerd.pod_log_root(),
        env.kubelet.config().clone(),
    );
    let control = env
        .kubelet
        .run_pod(gated_pod(
            "held-control",
            control_dir,
            &format!("tcp://:{PORT}"),
        ))
        .await?;
    let pod = env
        .kubelet
        .run_pod(gated_pod("bad-port", dir, value))
        .await?;
    let direct = direct_kubelet
        .run_pod(gated_pod("bad-port", direct_dir, value))
        .await?;

    // The control's app start is held (its proxy runs, its port is closed)...
    wait_for(TIMEOUT, "the control's app start to be sent", || {
        let c = control.first_call("StartContainer", Some("app"));
        async move { c.is_some() }
    })
    .await
    .with_context(|| env.diag(&control))?;
    // ... while the malformed pod's app runs, started by kubelet's own call.
    let (app_id, app) = wait_really_running(&env, &pod, "app")
        .await
        .context("the malformed pod's app never ran: held like the control?")?;
    let call = wait_call_done(&pod, "StartContainer", "app").await?;
    ensure!(call.ok(), "{}", env.diag(&pod));
    let control_app = env.truth(&control.container_ids("app")[0]).await?;
    let control_waits = control
        .first_call("StartContainer", Some("app"))
        .is_some_and(|c| c.in_flight());
    let (sent, answered) = (
        uptime_at(call.start),
        uptime_at(call.end.context("in flight")?),
    );
    let app_started = uptime_of_nanos(app.started_at);
    eprintln!(
        "malformed: app StartContainer {sent:.3}..{answered:.3} ({:?}), started {app_started:.3}; \
         control app then {:?}, its start in flight: {control_waits}",
        call.duration(),
        state(&control_app)
    );
    ensure!(
        app_started >= sent - CLOCK_SLACK && app_started <= answered + CLOCK_SLACK,
        "app started at {app_started:.3}, StartContainer {sent:.3}..{answered:.3}"
    );
    ensure!(
        !dir.join("proxy.listen").exists(),
        "the malformed pod's proxy opened its port"
    );
    ensure!(
        control_waits && state(&control_app) == ContainerState::ContainerCreated,
        "the control was not held while its port was closed: {control_app:?}\n{}",
        env.diag(&control)
    );
    // kubelet made the same calls and got the same answers as without the
    // shim.
    direct.wait_started(TIMEOUT).await?;
    pod.wait_started(TIMEOUT).await?;
    assert_eq!(start_sequence(&pod), start_sequence(&direct));

    // The control: held until its port opened, so a readiness check taken
    // from the malformed annotation would have held that pod the same way.
    std::fs::write(control_dir.join("open"), "")?;
    let (_, started) = wait_really_running(&env, &control, "app").await?;
    let control_start = wait_call_done(&control, "StartContainer", "app").await?;
    let listen_at = recorded(control_dir, "proxy.listen").await?;
    let control_started = uptime_of_nanos(started.started_at);
    let control_answered = uptime_at(control_start.end.context("in flight")?);
    eprintln!(
        "control: port opened {listen_at:.2}, app started {control_started:.3}, its start \
         answered {control_answered:.3}"
    );
    ensure!(
        control_start.ok()
            && control_started >= listen_at - CLOCK_SLACK
            && control_answered >= listen_at,
        "the control's app was not held until its port opened\n{}",
        env.diag(&control)
    );
    ensure!(
        app_started < listen_at,
        "the malformed pod's app started at {app_started:.3}, after the control's port \
         opened at {listen_at:.2}"
    );

    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    // kubelet reads exactly what containerd says.
    let mut shim = env.via_shim();
    for id in [app_id.clone(), pod.container_ids("proxy")[0].clone()] {
        assert_eq!(container_status(&shim, &id).await?, env.truth(&id).await?);
    }
    let exec = exec_sync(
        &mut shim,
        &app_id,
        &["echo", "hi"],
        EXEC_TIMEOUT.as_secs() as i64,
    )
    .await?;
    assert_eq!((exec.exit_code, exec.stdout.as_str()), (0, "hi\n"));
    ensure!(pod.duplicates().is_empty(), "{}", env.diag(&pod));

    // Deletion as without the shim: both get SIGTERM together, so each gets
    // it before the other has exited (each takes EXIT_DELAY to exit; a
    // sidecar stop held for the app would come only after the app's exit).
    let timings = pod.terminate(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    let (app_end, proxy_end) = (
        env.truth(&app_id).await?,
        env.truth(&pod.container_ids("proxy")[0]).await?,
    );
    let (app_term, proxy_term) = (
        recorded(dir, "app.term").await?,
        recorded(dir, "proxy.term").await?,
    );
    let (app_done, proxy_done) = (
        uptime_of_nanos(app_end.finished_at),
        uptime_of_nanos(proxy_end.finished_at),
    );
    eprintln!(
        "deletion (uptime): app SIGTERM {app_term:.2} exited {app_done:.3}, proxy SIGTERM \
         {proxy_term:.2} exited {proxy_done:.3}"
    );
    ensure!(
        (app_end.exit_code, proxy_end.exit_code) == (0, 0),
        "not ended by their SIGTERM traps: app exit {}, proxy exit {}",
        app_end.exit_code,
        proxy_end.exit_code
    );
    ensure!(
        proxy_term < app_done && app_term < proxy_done,
        "SIGTERMs not together: app {app_term} (exited {app_done:.3}), proxy {proxy_term} \
         (exited {proxy_done:.3})\n{}",
        env.diag(&pod)
    );
    pod.delete(None).await?;
    control.delete(None).await?;
    direct.delete(None).await?;

    // One warning, naming the pod, the key and the value.
    let log = env.shim.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && (l.contains("bad-port") || l.contains(value)))
        .collect();
    ensure!(
        warnings.len() == 1,
        "expected one warning, got {}:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    let w = warnings[0];
    for part in ["default/bad-port", key.as_str(), value] {
        ensure!(w.contains(part), "warning lacks {part:?}: {w}");
    }
    ensure!(
        log.lines().filter(|l| l.contains(value)).count() == 1,
        "the value is logged more than once:\n{log}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// h. no annotations: the shim is transparent

/// An answer of [`transcript`].
#[derive(Debug, PartialEq)]
enum Answer {
    Status(Box<ContainerStatusResponse>),
    Start(StartContainerResponse),
    Exec(ExecSyncResponse),
    Stop(StopContainerResponse),
    List(ListContainersResponse),
    PodStatus(Box<PodSandboxStatusResponse>),
    Pods(ListPodSandboxResponse),
    Create(CreateContainerResponse),
}

/// What was asked, and the answer or the error's code and message.
type Entry = (String, std::result::Result<Answer, (tonic::Code, String)>);

fn entry<T>(
    what: String,
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
    answer: fn(T) -> Answer,
) -> Entry {
    (
        what,
        r.map(|r| answer(r.into_inner()))
            .map_err(|s| (s.code(), s.message().to_string())),
    )
}

/// The same calls to the shim and to containerd: answers and errors.
/// Nothing here changes any state.
async fn transcript(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &PodHandle,
    running: &str,
    exited: &str,
) -> Vec<Entry> {
    let mut out = Vec::new();
    for (what, id) in [
        ("running", running),
        ("exited", exited),
        ("missing", "no-such-container"),
    ] {
        for verbose in [false, true] {
            let r = rt
                .container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose,
                })
                .await;
            out.push(entry(
                format!("ContainerStatus {what} verbose={verbose}"),
                r,
                |r| Answer::Status(Box::new(r)),
            ));
        }
        let r = rt
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await;
        out.push(entry(format!("StartContainer {what}"), r, Answer::Start));
        let r = rt
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: sh("echo out; echo err >&2; exit 2"),
                timeout: 10,
            })
            .await;
        out.push(entry(format!("ExecSync {what}"), r, Answer::Exec));
    }
    let r = rt
        .stop_container(StopContainerRequest {
            container_id: "no-such-container".into(),
            timeout: 1,
        })
        .await;
    out.push(entry("StopContainer missing".into(), r, Answer::Stop));
    for state in [
        None,
        Some(ContainerState::ContainerRunning),
        Some(ContainerState::ContainerExited),
        Some(ContainerState::ContainerCreated),
    ] {
        let r = rt
            .list_containers(list_filter(state, pod.uid()))
            .await
            .map(|r| {
                let mut list = r.into_inner();
                // containerd's order is its map's.
                list.containers.sort_by(|a, b| a.id.cmp(&b.id));
                tonic::Response::new(list)
            });
        out.push(entry(format!("ListContainers {state:?}"), r, Answer::List));
    }
    let r = rt
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                id: running.into(),
                ..Default::default()
            }),
        })
        .await;
    out.push(entry("ListContainers by id".into(), r, Answer::List));
    for (what, id) in [("ours", pod.sandbox_id()), ("missing", "no-such-pod")] {
        let r = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await;
        out.push(entry(format!("PodSandboxStatus {what}"), r, |r| {
            Answer::PodStatus(Box::new(r))
        }));
    }
    let r = rt
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                id: pod.sandbox_id().into(),
                ..Default::default()
            }),
        })
        .await;
    out.push(entry("ListPodSandbox by id".into(), r, Answer::Pods));
    let r = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "no-such-pod".into(),
            config: Some(ContainerConfig::default()),
            sandbox_config: Some(pod.sandbox_config().clone()),
        })
        .await;
    out.push(entry(
        "CreateContainer in a missing pod".into(),
        r,
        Answer::Create,
    ));
    let r = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.sandbox_id().into(),
            config: None,
            sandbox_config: Some(pod.sandbox_config().clone()),
        })
        .await;
    out.push(entry(
        "CreateContainer without config".into(),
        r,
        Answer::Create,
    ));
    out
}

/// A container's status with what differs between two runs of the same pod
/// blanked: ids, times, the pod uid.
fn normalized(mut s: ContainerStatus, uid: &str) -> ContainerStatus {
    s.id.clear();
    s.created_at = 0;
    s.started_at = 0;
    s.finished_at = 0;
    s.log_path = s.log_path.replace(uid, "UID");
    for v in s.labels.values_mut().chain(s.annotations.values_mut()) {
        *v = v.replace(uid, "UID");
    }
    s
}

/// A pod without sidecar annotations, run once through the shim and once
/// straight against containerd by two simulated kubelets: the same calls,
/// the same answers (up to ids and times), and for the pod run through the
/// shim, byte-for-byte the same answers from the shim as from containerd
/// for a set of reads, errors and execs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_pod_without_annotations_gets_containerds_answers() -> Result<()> {
    let env = Env::start().await?;
    let direct_kubelet = Kubelet::with_config(
        env.containerd.socket(),
        &env.containerd.pod_log_root(),
        env.kubelet.config().clone(),
    );
    let def = PodDef::new("plain")
        .termination_grace(GRACE)
        .restart_policy(RestartPolicy::Never)
        .label("app", "plain")
        .annotation("example.com/note", "not for the shim")
        .container(ContainerDef::new("main", script("main", "echo hello;")))
        .container(ContainerDef::new("quitter", sh("echo bye >&2; exit 3")));
    let via = env.kubelet.run_pod(def.clone()).await?;
    let direct = direct_kubelet.run_pod(def).await?;
    for pod in [&via, &direct] {
        pod.wait_state("quitter", ContainerState::ContainerExited, TIMEOUT)
            .await?;
        pod.wait_state("main", ContainerState::ContainerRunning, TIMEOUT)
            .await?;
        pod.wait_started(TIMEOUT).await?;
        pod.wait_phase(Phase::Running, TIMEOUT).await?;
    }

    // kubelet made the same calls and got the same answers.
    assert_eq!(start_sequence(&via), start_sequence(&direct));
    for name in ["main", "quitter"] {
        let a = via.latest(name).await.context("no status via the shim")?;
        let b = direct.latest(name).await.context("no status direct")?;
        assert_eq!(
            normalized(a, via.uid()),
            normalized(b, direct.uid()),
            "{name}"
        );
    }

    // The same requests to the shim and to containerd, about the pod run
    // through the shim: identical answers.
    let (main, quitter) = (
        via.container_ids("main")[0].clone(),
        via.container_ids("quitter")[0].clone(),
    );
    let through = transcript(&mut env.via_shim(), &via, &main, &quitter).await;
    let straight = transcript(&mut env.direct(), &via, &main, &quitter).await;
    assert_eq!(through.len(), straight.len());
    for (a, b) in through.iter().zip(&straight) {
        assert_eq!(a, b);
    }
    eprintln!("{} identical answers; the errors:", through.len());
    for (what, answer) in &through {
        if let Err((code, message)) = answer {
            eprintln!("  {what}: {code:?} {message:?}");
        }
    }

    // Deletion: the same stops, the same end.
    let (a, b) = tokio::join!(via.delete(None), direct.delete(None));
    let (a, b) = (a?, b?);
    let shape = |ts: &[StopTiming]| -> Vec<(String, i64, Option<tonic::Code>)> {
        ts.iter()
            .map(|t| {
                (
                    t.container.clone(),
                    t.timeout,
                    t.error.as_ref().map(|e| e.code),
                )
            })
            .collect()
    };
    assert_eq!(shape(&a), shape(&b));
    assert_eq!(via.phase(), direct.phase());
    for name in ["main", "quitter"] {
        let a = via.synced(name).context("no final status")?;
        let b = direct.synced(name).context("no final status")?;
        assert_eq!(
            normalized(a, via.uid()),
            normalized(b, direct.uid()),
            "{name}"
        );
    }
    ensure!(via.duplicates().is_empty() && direct.duplicates().is_empty());
    ensure!(
        !env.shim.log().contains(" WARN "),
        "warnings:\n{}",
        env.decisions()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// j. a sidecar that is not ready in time

/// A pod whose proxy opens its port only once `open` exists in its shared
/// directory; ready-timeout 5 s, on-ready-timeout fail.
fn unready_pod(name: &str, dir: &Path, order: &[&str]) -> PodDef {
    let mut def = PodDef::new(name)
        .termination_grace(GRACE)
        .annotation(SIDECARS, "proxy")
        .annotation(&ready_key("proxy"), &format!("tcp://:{PORT}"))
        .annotation("sidecar-shim.io/ready-timeout", "5s")
        .annotation("sidecar-shim.io/on-ready-timeout", "fail");
    for c in order {
        let command = match *c {
            "proxy" => script(
                "proxy",
                &format!(
                    "{} while [ ! -f /shared/open ]; do sleep 0.1; done; {} \
                     nc -ll -p {PORT} -e true &",
                    rec("proxy.start"),
                    rec("proxy.listen")
                ),
            ),
            _ => script(c, &rec(&format!("{c}.start"))),
        };
        def = def.container(ContainerDef::new(c, command).mount(dir, "/shared"));
    }
    def
}

/// After the sidecar became ready: exactly one attempt of the app ran, the
/// one whose start went through, after the port opened; every earlier one
/// never ran in containerd and its start was refused naming the sidecar (or,
/// deferred, it read as SidecarNotReady); kubelet made no duplicate.
async fn check_retry_went_through(env: &Env, pod: &PodHandle, dir: &Path) -> Result<()> {
    let (ok_id, app) = wait_really_running(env, pod, "app").await?;
    let listen_at = recorded(dir, "proxy.listen").await?;
    let runs = {
        recorded(dir, "app.start").await?;
        recorded_all(dir, "app.start")
    };
    let app_started = uptime_of_nanos(app.started_at);
    eprintln!(
        "port opened {listen_at:.2}; app attempt {:?} started {app_started:.3}; runs recorded {runs:?}",
        app.metadata.as_ref().map(|m| m.attempt)
    );
    ensure!(
        runs.len() == 1 && runs[0] >= listen_at && app_started >= listen_at - CLOCK_SLACK,
        "app ran at {runs:?} (containerd {app_started:.3}), port opened at {listen_at}\n{}",
        env.diag(pod)
    );
    let ids = pod.container_ids("app");
    let ok_at = ids.iter().position(|i| *i == ok_id).context("unknown id")?;
    ensure!(
        ok_at >= 1,
        "the first attempt ran: no retry\n{}",
        env.diag(pod)
    );
    for id in &ids[..ok_at] {
        let t = env.truth(id).await?;
        ensure!(
            state(&t) == ContainerState::ContainerCreated && t.started_at == 0,
            "attempt {id} ran in containerd: {t:?}"
        );
    }
    // containerd runs the app a moment before kubelet hears the answer.
    wait_for(
        TIMEOUT,
        "the start that went through to be answered",
        || {
            let ok_id = ok_id.clone();
            async move {
                pod.calls_of("StartContainer", Some("app"))
                    .iter()
                    .any(|c| c.id.as_deref() == Some(ok_id.as_str()) && c.end.is_some())
            }
        },
    )
    .await
    .with_context(|| env.diag(pod))?;
    let starts = pod.calls_of("StartContainer", Some("app"));
    for c in &starts {
        if c.id.as_deref() == Some(ok_id.as_str()) {
            ensure!(c.ok(), "the start that went through failed: {c:?}");
        } else if let Some(e) = &c.error {
            ensure!(
                e.message.contains("sidecar proxy"),
                "refusal does not name the sidecar: {e:?}"
            );
        }
    }
    ensure!(pod.duplicates().is_empty(), "{}", env.diag(pod));
    ensure!(
        pod.events().iter().all(
            |e| !matches!(&e.event, Event::Restart { container, exit_code, .. }
                if container == "app" && *exit_code != 128)
        ),
        "{}",
        env.diag(pod)
    );
    Ok(())
}

/// Spec order [proxy, app]: the app's StartContainer is held for the
/// ready-timeout and refused with an error naming the sidecar; the app never
/// runs and kubelet reads it as exited 128 SidecarNotReady, so it retries:
/// a new attempt at once (kubelet's first restart), refused again, then one
/// after the crash-loop backoff (which kubelet measures from the exited
/// attempt's finished_at). Once the proxy opens its port, a retry goes
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_held_start_is_refused_naming_the_sidecar_then_a_retry_goes_through() -> Result<()> {
    let env = Env::start().await?;
    let dir = env.subdir("held")?;
    let pod = env
        .kubelet
        .run_pod(unready_pod("unready-held", &dir, &["proxy", "app"]))
        .await?;
    let first = wait_call_done(&pod, "StartContainer", "app").await?;
    let err = first
        .error
        .clone()
        .with_context(|| format!("the held start succeeded\n{}", env.diag(&pod)))?;
    let took = first.duration().context("in flight")?;
    eprintln!("first app start refused after {took:?}: {err:?}");
    ensure!(
        err.message.contains("sidecar proxy") && err.message.contains("not ready"),
        "unclear refusal: {err:?}"
    );
    ensure!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(9),
        "held {took:?} for a ready-timeout of 5 s"
    );
    let id0 = pod.container_ids("app")[0].clone();
    let seen = container_status(&env.via_shim(), &id0).await?;
    assert_eq!(
        (state(&seen), seen.exit_code, seen.reason.as_str()),
        (ContainerState::ContainerExited, 128, "SidecarNotReady"),
        "{seen:?}"
    );
    let t = env.truth(&id0).await?;
    ensure!(
        state(&t) == ContainerState::ContainerCreated && t.started_at == 0,
        "{t:?}"
    );
    ensure!(!dir.join("app.start").exists(), "the app ran");

    // kubelet retries twice, the second time after its backoff; the proxy
    // becomes ready meanwhile.
    wait_for(TIMEOUT, "kubelet to retry the app twice", || {
        let pod = &pod;
        async move { pod.container_ids("app").len() >= 3 }
    })
    .await
    .with_context(|| env.diag(&pod))?;
    let second = pod
        .calls_of("StartContainer", Some("app"))
        .get(1)
        .and_then(|c| c.end)
        .context("second start not answered")?;
    let third = pod
        .calls_of("CreateContainer", Some("app"))
        .get(2)
        .map(|c| c.start)
        .context("no third attempt")?;
    let gap = third.duration_since(second);
    eprintln!("third attempt created {gap:?} after the second was refused");
    ensure!(
        gap >= BACKOFF - Duration::from_millis(50) && gap < BACKOFF + Duration::from_secs(5),
        "third attempt {gap:?} after the second start was refused (backoff {BACKOFF:?})\n{}",
        env.diag(&pod)
    );
    std::fs::write(dir.join("open"), "")?;
    check_retry_went_through(&env, &pod, &dir).await?;
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    let timings = pod.delete(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    Ok(())
}

/// Spec order [app, proxy]: the app's start is answered and deferred; after
/// the ready-timeout kubelet reads it as exited 128, reason SidecarNotReady,
/// with a message naming the sidecar, while containerd never ran it. kubelet
/// retries; once the proxy opens its port a retry goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_deferred_start_times_out_as_sidecar_not_ready_then_a_retry_goes_through() -> Result<()> {
    let env = Env::start().await?;
    let dir = env.subdir("deferred")?;
    let pod = env
        .kubelet
        .run_pod(unready_pod("unready-deferred", &dir, &["app", "proxy"]))
        .await?;
    let first = wait_call_done(&pod, "StartContainer", "app").await?;
    // Answered, not held: well before the 5 s ready-timeout (on a loaded
    // machine the answer can take a while; a held start would take 5 s).
    ensure!(
        first.ok() && first.duration() < Some(Duration::from_secs(4)),
        "{}",
        env.diag(&pod)
    );
    let answered = first.end.context("in flight")?;
    let id0 = pod.container_ids("app")[0].clone();
    // What kubelet reads: RUNNING for the ready-timeout, then EXITED.
    let mut shim = env.via_shim();
    let mut last_running = answered;
    let deadline = Instant::now() + TIMEOUT;
    let seen = loop {
        let s = container_status(&shim, &id0).await?;
        if state(&s) != ContainerState::ContainerRunning {
            break s;
        }
        last_running = Instant::now();
        ensure!(
            last_running < deadline,
            "the deferred app still reads as running\n{}",
            env.diag(&pod)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deferred_for = last_running.duration_since(answered);
    eprintln!("deferred app read as running for {deferred_for:?}, then {seen:?}");
    assert_eq!(
        (state(&seen), seen.exit_code, seen.reason.as_str()),
        (ContainerState::ContainerExited, 128, "SidecarNotReady"),
        "{seen:?}"
    );
    ensure!(
        seen.message.contains("proxy"),
        "message does not name the sidecar: {seen:?}"
    );
    ensure!(
        deferred_for >= Duration::from_millis(4700) && deferred_for < Duration::from_secs(9),
        "read as running for {deferred_for:?} with a ready-timeout of 5 s"
    );
    let listed = shim
        .list_containers(list_filter(
            Some(ContainerState::ContainerExited),
            pod.uid(),
        ))
        .await?
        .into_inner()
        .containers;
    ensure!(listed.iter().any(|c| c.id == id0), "{listed:?}");
    let t = env.truth(&id0).await?;
    ensure!(
        state(&t) == ContainerState::ContainerCreated && t.started_at == 0,
        "{t:?}"
    );
    // Its times stay put: kubelet measures its crash-loop backoff from
    // finished_at.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = container_status(&shim, &id0).await?;
    ensure!(
        (again.started_at, again.finished_at) == (seen.started_at, seen.finished_at)
            && seen.finished_at >= seen.started_at
            && seen.started_at >= seen.created_at,
        "times move: first read {:?}, 1.1 s later {:?}",
        (seen.created_at, seen.started_at, seen.finished_at),
        (again.created_at, again.started_at, again.finished_at)
    );
    let exec = exec_sync(&mut shim, &id0, &["true"], 5).await;
    ensure!(
        exec.is_err(),
        "exec into a never-started container: {exec:?}"
    );

    wait_for(TIMEOUT, "kubelet to retry the app", || {
        let pod = &pod;
        async move { pod.container_ids("app").len() >= 2 }
    })
    .await
    .with_context(|| env.diag(&pod))?;
    std::fs::write(dir.join("open"), "")?;
    check_retry_went_through(&env, &pod, &dir).await?;
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    let timings = pod.delete(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    Ok(())
}

/// Two pods whose app waits for a proxy that never becomes ready, deleted
/// while it waits: one with the start held ([proxy, app]; kubelet's kill
/// waits for the sync in progress, so for the held start to be refused), one
/// with it deferred ([app, proxy]). Both are torn down within their grace
/// period, the proxies stopped gracefully (SIGTERM, exit 0), the apps never
/// run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_pod_deleted_while_its_app_waits_is_torn_down_within_grace() -> Result<()> {
    let env = Env::start().await?;
    let (held_dir, deferred_dir) = (env.subdir("held")?, env.subdir("deferred")?);
    let held = env
        .kubelet
        .run_pod(unready_pod("wait-held", &held_dir, &["proxy", "app"]))
        .await?;
    let deferred = env
        .kubelet
        .run_pod(unready_pod(
            "wait-deferred",
            &deferred_dir,
            &["app", "proxy"],
        ))
        .await?;
    // The held app's start is in flight; the deferred one was answered and
    // its proxy started.
    wait_for(TIMEOUT, "the app's start to be held", || {
        let held = &held;
        async move {
            held.first_call("StartContainer", Some("app"))
                .is_some_and(|c| c.in_flight())
        }
    })
    .await
    .with_context(|| env.diag(&held))?;
    deferred.wait_started(TIMEOUT).await?;
    recorded(&held_dir, "proxy.start").await?;
    recorded(&deferred_dir, "proxy.start").await?;
    for pod in [&held, &deferred] {
        let id = pod.container_ids("app")[0].clone();
        let t = env.truth(&id).await?;
        ensure!(state(&t) == ContainerState::ContainerCreated, "{t:?}");
    }

    let began = Instant::now();
    let (h, d) = tokio::join!(
        async {
            let r = held.delete(None).await;
            (r, began.elapsed())
        },
        async {
            let r = deferred.delete(None).await;
            (r, began.elapsed())
        }
    );
    let (held_timings, held_took) = (h.0?, h.1);
    let (deferred_timings, deferred_took) = (d.0?, d.1);
    eprintln!("torn down after: held {held_took:?}, deferred {deferred_took:?}");

    for (pod, dir, timings, took) in [
        (&held, &held_dir, &held_timings, held_took),
        (&deferred, &deferred_dir, &deferred_timings, deferred_took),
    ] {
        ensure!(
            took < GRACE,
            "pod {} torn down after {took:?}\n{}",
            pod.name(),
            env.diag(pod)
        );
        ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
        // The proxy trapped its SIGTERM (no SIGKILL at the end of a grace
        // period), the app never ran.
        recorded(dir, "proxy.term").await?;
        ensure!(!dir.join("app.start").exists(), "app of {} ran", pod.name());
        let proxy = pod.synced("proxy").context("no proxy status")?;
        ensure!(
            state(&proxy) == ContainerState::ContainerExited && proxy.exit_code == 0,
            "{proxy:?}"
        );
        ensure!(pod.duplicates().is_empty(), "{}", env.diag(pod));
        let left = env
            .direct()
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    id: pod.sandbox_id().into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        ensure!(left.is_empty(), "sandbox left: {left:?}");
    }
    // The held app: refused naming the sidecar, never stopped (it never
    // ran). The deferred one: kubelet stopped it (it read as running), the
    // stop was answered at once, and it then read as never started.
    let refused = held
        .first_call("StartContainer", Some("app"))
        .and_then(|c| c.error)
        .context("the held start was not refused")?;
    ensure!(refused.message.contains("sidecar proxy"), "{refused:?}");
    ensure!(
        !held_timings.iter().any(|t| t.container == "app"),
        "{held_timings:?}"
    );
    let app_stop = deferred_timings
        .iter()
        .find(|t| t.container == "app")
        .context("the deferred app was not stopped")?;
    ensure!(
        app_stop.returned.duration_since(app_stop.sent) < Duration::from_secs(2),
        "{app_stop:?}"
    );
    let app = deferred.synced("app").context("no app status")?;
    assert_eq!(
        (state(&app), app.exit_code, app.reason.as_str()),
        (ContainerState::ContainerExited, 137, "NeverStarted"),
        "{app:?}"
    );
    Ok(())
}

/// How long the slow registry holds each blob: a first pull of a mesh
/// proxy's image on a node, many times the shim's 1 s init-container window.
const SLOW_PULL: Duration = Duration::from_secs(10);

/// An app listed before its sidecar, whose image kubelet must pull first,
/// from a registry that takes [`SLOW_PULL`] per blob: the app does not start
/// until the sidecar listens, however long the pull. (kubelet does nothing
/// else in the pod while it pulls; the shim used to take such a quiet
/// deferred app for an init container after its init window and start it.)
/// Here the ImageStatus before the pull names no pod, so the PullImage alone
/// tells the shim that kubelet went on (k2 below has kubelet's ImageStatus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_app_listed_first_waits_out_a_slow_pull_of_its_sidecars_image() -> Result<()> {
    let registry = support::registry::SlowRegistry::start(SLOW_PULL).await?;
    let env = Env::start_with(KubeletConfig {
        initial_backoff: BACKOFF,
        image_spec_annotations: false,
        ..Default::default()
    })
    .await?;
    let dir = &env.shared;
    let pod = env
        .kubelet
        .run_pod(app_before_pulled_proxy(
            "slow-pull",
            &registry.image("slow"),
            dir,
        ))
        .await?;
    let pull = wait_call_done(&pod, "PullImage", "proxy").await?;
    let answered = wait_call_done(&pod, "StartContainer", "app").await?;
    let pulled_for = pull.end.context("pull in flight")? - pull.start;
    ensure!(
        pull.ok() && registry.blobs_served() >= 1 && pulled_for >= SLOW_PULL,
        "the proxy's image was not pulled slowly from the registry (ok {}, {} blobs, {pulled_for:?})\n{}",
        pull.ok(),
        registry.blobs_served(),
        env.diag(&pod)
    );
    ensure!(
        answered.ok() && answered.end.context("start in flight")? <= pull.start,
        "kubelet's start of the app was not answered before the pull began\n{}",
        env.diag(&pod)
    );
    app_started_after_its_proxy(&env, &pod).await
}

/// The same pod behind another pod's slow pull, kubelet pulling one image
/// at a time (its default, `serializeImagePulls`): kubelet's PullImage of
/// the proxy's image waits its turn inside kubelet, so all the runtime sees
/// of the pod for [`SLOW_PULL`] after the app's deferred start is an
/// ImageStatus for the proxy's image, carrying the pod's annotations. The
/// app still waits for its proxy. (The shim used to learn that kubelet had
/// gone on only from the PullImage, and started the app after 2 s, its
/// init window then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k2_app_listed_first_waits_out_a_pull_queued_behind_another_pods() -> Result<()> {
    let registry = support::registry::SlowRegistry::start(SLOW_PULL).await?;
    let env = Env::start().await?;
    ensure!(env.kubelet.config().serialize_image_pulls);
    let dir = &env.shared;
    let first = env
        .kubelet
        .run_pod(PodDef::new("first-pull").container(
            ContainerDef::new("main", script("main", "")).image(&registry.image("first")),
        ))
        .await?;
    wait_for_value(TIMEOUT, "first-pull's PullImage to be sent", || {
        let c = first.first_call("PullImage", Some("main"));
        async move { Ok(c) }
    })
    .await?;
    let pod = env
        .kubelet
        .run_pod(app_before_pulled_proxy(
            "queued-pull",
            &registry.image("queued"),
            dir,
        ))
        .await?;
    let first_pull = wait_call_done(&first, "PullImage", "main").await?;
    let pull = wait_call_done(&pod, "PullImage", "proxy").await?;
    let answered = wait_call_done(&pod, "StartContainer", "app").await?;
    let answered_at = answered.end.context("start in flight")?;
    let first_done = first_pull.end.context("pull in flight")?;
    ensure!(
        first_pull.ok() && answered.ok() && pull.start >= first_done,
        "kubelet did not pull the proxy's image after the other pod's\n{}\n{}",
        env.diag(&first),
        env.diag(&pod)
    );
    let quiet = pull.start - answered_at;
    ensure!(
        quiet >= SLOW_PULL / 2,
        "the proxy's PullImage came {quiet:?} after the app's start was answered: \
         no wait in kubelet's pull queue to test\n{}",
        env.diag(&pod)
    );
    app_started_after_its_proxy(&env, &pod).await
}

/// An annotated pod whose app is listed before its proxy, which runs
/// `proxy_image` (to be pulled) and listens on [`PORT`].
fn app_before_pulled_proxy(name: &str, proxy_image: &str, dir: &Path) -> PodDef {
    PodDef::new(name)
        .termination_grace(GRACE)
        .annotation(SIDECARS, "proxy")
        .annotation(&ready_key("proxy"), &format!("tcp://:{PORT}"))
        .container(ContainerDef::new("app", script("app", &rec("app.start"))).mount(dir, "/shared"))
        .container(
            ContainerDef::new(
                "proxy",
                script(
                    "proxy",
                    &format!("{} nc -ll -p {PORT} -e true &", rec("proxy.listen")),
                ),
            )
            .image(proxy_image)
            .mount(dir, "/shared"),
        )
}

/// The app's first command came after its proxy listened (the containers'
/// own records).
async fn app_started_after_its_proxy(env: &Env, pod: &PodHandle) -> Result<()> {
    let app_start = recorded(&env.shared, "app.start").await?;
    let proxy_listen = recorded(&env.shared, "proxy.listen").await?;
    ensure!(
        app_start + CLOCK_SLACK >= proxy_listen,
        "the app started at {app_start:.2}, before its proxy listened at {proxy_listen:.2}\n{}",
        env.diag(pod)
    );
    Ok(())
}
