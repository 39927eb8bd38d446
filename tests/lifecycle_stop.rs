//! How sidecars stop, end to end: the shim binary in front of a private
//! containerd, driven by the kubelet simulator (`tests/support/kubelet.rs`).
//!
//! * Job completion: once the normal containers of a Job pod are done, the
//!   shim stops the sidecars and reports them exited 0, so the pod completes.
//! * Shutdown: on pod deletion a sidecar gets its SIGTERM (and runs its exec
//!   preStop hook) only after the apps exited, also when an app has to be
//!   SIGKILLed at the end of its grace period.
//! * A sidecar stopped alone (a failed liveness probe) is not held for the
//!   apps: it stops within the evidence window, kubelet restarts it, and the
//!   apps are not touched.
//!
//! Order and timing come from containerd itself (ContainerStatus asked
//! directly, bypassing the shim: `finished_at`, `exit_code`) and from what
//! the containers recorded (`cat /proc/uptime` into a bind-mounted host
//! directory when they get SIGTERM: one clock for everything), never from the
//! simulator's or the shim's bookkeeping; from the simulator only when it
//! sent a call (what kubelet asked for, and when). The pod phase is the one
//! the simulator computed from what it read through the shim: what kubelet
//! would conclude.

mod support;

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use k8s_cri::v1::{ContainerState, ContainerStatus, ContainerStatusRequest};
use support::kubelet::*;
use support::state_of as state;
use support::*;

/// Generous: a loaded 2-core machine runs several tests at once.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Clock comparisons between containerd's timestamps (wall clock, converted
/// to uptime at microsecond precision) and what containers read in
/// /proc/uptime (rounded down to 10 ms) allow this much measurement error,
/// in seconds. (containerd records `finished_at` when it reaps the process,
/// before it reports the container exited, so a shim that waits for that
/// report can only act after it.)
const CLOCK_SLACK: f64 = 0.015;
/// The shim's `failed_exit_window` (README, "Configuration"), in seconds: a
/// failed normal container of a Job pod without the restart-policy
/// annotation counts as terminal only this long after its exit. With the
/// annotation, and after an exit 0, the shim stops the sidecars as soon as
/// it sees the exit; "promptly" here means well before this window, the
/// longest a correct shim waits and what a shim taking a Job's main
/// container for possibly retried would wait.
const FAILED_EXIT_WINDOW: f64 = 30.0;

/// The annotations a user puts on a pod (README, "Annotations").
const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";
const READY_PREFIX: &str = "sidecar-shim.io/ready.";

/// A private containerd, the shim in front of it, and a kubelet simulator
/// talking to the shim with a short crash-loop backoff. (Fields drop in this
/// order: the simulator, then the shim, then containerd.)
struct Env {
    kubelet: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
}

impl Env {
    async fn start() -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let kubelet = Kubelet::with_config(&listen, &containerd.pod_log_root(), fast_backoff());
        Ok(Env {
            kubelet,
            shim,
            containerd,
        })
    }

    /// A host directory for one pod's containers to share (mounted at
    /// /shared).
    fn shared(&self, pod: &str) -> Result<PathBuf> {
        let dir = self.containerd.dir().join(format!("shared-{pod}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// containerd's own view of a container, bypassing the shim.
    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }

    /// containerd's view of the one attempt of `name` the simulator created.
    async fn only(&self, pod: &PodHandle, name: &str) -> Result<ContainerStatus> {
        let ids = pod.container_ids(name);
        if ids.len() != 1 {
            bail!("{name}: attempts {ids:?}, want exactly one");
        }
        self.truth(&ids[0]).await
    }

    /// Watch containers in containerd (directly) until each has exited and
    /// keep its final status: a pod deletion removes the sandbox, and with it
    /// containerd's record, right after the containers stop.
    fn watch_exits(
        &self,
        ids: Vec<String>,
    ) -> tokio::task::JoinHandle<Result<Vec<ContainerStatus>>> {
        let (rt, _) = self.containerd.cri();
        tokio::spawn(async move {
            let mut done: Vec<Option<ContainerStatus>> = vec![None; ids.len()];
            let deadline = Instant::now() + TIMEOUT;
            while done.iter().any(Option::is_none) {
                for (i, id) in ids.iter().enumerate() {
                    if done[i].is_some() {
                        continue;
                    }
                    let status = rt
                        .clone()
                        .container_status(ContainerStatusRequest {
                            container_id: id.clone(),
                            verbose: false,
                        })
                        .await
                        .with_context(|| format!("container {id} gone before its exit was seen"))?
                        .into_inner()
                        .status
                        .context("ContainerStatus without status")?;
                    if state(&status) == ContainerState::ContainerExited {
                        done[i] = Some(status);
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

    /// Delete the pod the way kubelet does (the simulator's `delete`) while
    /// watching its containers in containerd; returns the simulator's stop
    /// timings and containerd's final status of the latest attempt of each
    /// container, in spec order.
    async fn delete(
        &self,
        pod: &PodHandle,
        grace: Duration,
    ) -> Result<(Vec<StopTiming>, Vec<ContainerStatus>)> {
        let ids = pod
            .def()
            .containers
            .iter()
            .map(|c| pod.container_ids(&c.name).pop().context("no attempt"))
            .collect::<Result<Vec<_>>>()?;
        let watch = self.watch_exits(ids);
        let timings = pod.delete(Some(grace)).await?;
        let statuses = watch.await??;
        Ok((timings, statuses))
    }

    /// The shim's decisions (its info and warning lines about the lifecycle).
    fn decisions(&self) -> String {
        self.shim
            .log()
            .lines()
            .filter(|l| {
                (l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
                    && l.contains("lifecycle")
            })
            .map(|l| format!("  {l}\n"))
            .collect()
    }

    /// Everything that explains a failure: per pod the simulator's summary
    /// and containerd's view of every attempt; then the shim's decisions.
    async fn explain(&self, pods: &[&PodHandle]) -> String {
        let mut s = String::new();
        for pod in pods {
            let _ = writeln!(s, "--- simulator ---\n{}", pod.summary());
            let _ = writeln!(s, "--- containerd, pod {} ---", pod.name());
            for def in &pod.def().containers {
                for id in pod.container_ids(&def.name) {
                    match self.truth(&id).await {
                        Ok(c) => {
                            let _ = writeln!(
                                s,
                                "  {} {id}: {:?} exit {} {}, finished at uptime {:.3}",
                                def.name,
                                state(&c),
                                c.exit_code,
                                c.reason,
                                if c.finished_at > 0 {
                                    uptime_of(c.finished_at)
                                } else {
                                    0.0
                                }
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(s, "  {} {id}: {e:#}", def.name);
                        }
                    }
                }
            }
        }
        let _ = write!(s, "--- shim decisions ---\n{}", self.decisions());
        s
    }

    /// Run a scenario; on failure, add [`Env::explain`] for its pods.
    async fn check(&self, pods: &[&PodHandle], scenario: impl Future<Output = Result<()>>) {
        if let Err(e) = scenario.await {
            panic!("{e:#}\n{}", self.explain(pods).await);
        }
    }
}

/// kubelet's defaults, but a crash-loop backoff of 1 s.
fn fast_backoff() -> KubeletConfig {
    KubeletConfig {
        initial_backoff: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Seconds since boot now (CLOCK_BOOTTIME: the clock /proc/uptime shows,
/// there rounded down to 10 ms).
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

/// A CRI timestamp (wall-clock nanoseconds since the epoch) as uptime.
fn uptime_of(nanos: i64) -> f64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    boottime_now() - (wall - nanos) as f64 / 1e9
}

/// An instant of this process as uptime (the monotonic clock and
/// CLOCK_BOOTTIME run at the same rate; nothing is suspended here).
fn up(at: Instant) -> f64 {
    let now = Instant::now();
    let base = boottime_now();
    if at <= now {
        base - (now - at).as_secs_f64()
    } else {
        base + (at - now).as_secs_f64()
    }
}

/// The uptime a container recorded in `dir/file`, if it did.
fn recorded(dir: &Path, file: &str) -> Option<f64> {
    parse_uptime(&std::fs::read_to_string(dir.join(file)).ok()?)
}

fn must_have_recorded(dir: &Path, file: &str) -> Result<f64> {
    recorded(dir, file).with_context(|| format!("no time recorded in {file}"))
}

/// Wait for a container to create `dir/file`.
async fn wait_file(dir: &Path, file: &str) -> Result<()> {
    let path = dir.join(file);
    wait_for(TIMEOUT, &format!("{file} to appear"), || {
        let path = path.clone();
        async move { path.exists() }
    })
    .await
}

/// A shell that records the uptime in /shared/NAME.term on SIGTERM and exits
/// with `code`. It waits in `wait`, which a trapped signal interrupts at
/// once (a foreground `sleep` would delay the trap until it ends), and
/// touches /shared/NAME.ready once the trap is set. `before` runs first (in
/// the background if it does not end).
fn until_term(name: &str, code: i32, before: &str) -> Vec<String> {
    sh(&format!(
        "trap 'cat /proc/uptime > /shared/{name}.term; exit {code}' TERM; {before} \
         touch /shared/{name}.ready; while :; do sleep 3600 & wait $!; done"
    ))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------
// d. Job completion

/// A Job pod (restart policy Never) with a sidecar listed first that exits
/// 143 on SIGTERM and a main container that runs for a second and exits
/// `main_exit`.
fn job_pod(job: &str, shared: &Path, main_exit: i32, annotate_policy: bool) -> PodDef {
    let mut def = PodDef::job(job)
        .annotation(SIDECARS, "proxy")
        .container(ContainerDef::new("proxy", until_term("proxy", 143, "")).mount(shared, "/shared"))
        .container(
            ContainerDef::new(
                "main",
                sh(&format!(
                    "while [ ! -e /shared/proxy.ready ]; do sleep 0.05; done; sleep 1; exit {main_exit}"
                )),
            )
            .mount(shared, "/shared"),
        );
    if annotate_policy {
        def = def.annotation(RESTART_POLICY, "Never");
    }
    def
}

/// After a Job pod completed: the shim stopped the sidecar after main's last
/// attempt exited, promptly; containerd saw it exit 143 and kubelet read
/// exit 0, Completed. Returns (main's exit in uptime, the sidecar's SIGTERM).
async fn check_sidecar_completed(env: &Env, pod: &PodHandle, shared: &Path) -> Result<(f64, f64)> {
    let main_id = pod.container_ids("main").pop().context("no main")?;
    let main = env.truth(&main_id).await?;
    let proxy = env.only(pod, "proxy").await?;
    if state(&main) != ContainerState::ContainerExited
        || state(&proxy) != ContainerState::ContainerExited
    {
        bail!(
            "containerd: main {:?}, proxy {:?}",
            state(&main),
            state(&proxy)
        );
    }
    if proxy.exit_code != 143 {
        bail!(
            "containerd: proxy exited {} ({}), want 143 from its SIGTERM trap",
            proxy.exit_code,
            proxy.reason
        );
    }
    let read = pod.synced("proxy").context("kubelet never read proxy")?;
    if (read.exit_code, read.reason.as_str()) != (0, "Completed") {
        bail!(
            "kubelet read proxy as exit {} reason {:?}, want 0 Completed",
            read.exit_code,
            read.reason
        );
    }
    let main_done = uptime_of(main.finished_at);
    let term = must_have_recorded(shared, "proxy.term")?;
    eprintln!(
        "{}: main exited {} at {main_done:.3}, proxy SIGTERM at {term:.3} (+{:.3} s)",
        pod.name(),
        main.exit_code,
        term - main_done
    );
    if term < main_done - CLOCK_SLACK {
        bail!("proxy got SIGTERM at {term:.3}, before main exited at {main_done:.3}");
    }
    if term - main_done >= FAILED_EXIT_WINDOW / 2.0 {
        bail!(
            "proxy got SIGTERM {:.3} s after main exited (the shim waits up to {FAILED_EXIT_WINDOW} s \
             only for a failed main without the restart-policy annotation)",
            term - main_done
        );
    }
    Ok((main_done, term))
}

/// (d) Restart policy Never, main exits 0: the sidecar (exit 143 on SIGTERM)
/// is stopped after main exited and reported exit 0, so the pod Succeeds.
/// The same with the Job labels only (no restart-policy annotation). Next to
/// them, the same pod straight on containerd (no shim) stays Running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_pod_succeeds_once_main_exits_0() {
    let env = Env::start().await.expect("environment");
    let shared = env.shared("never").unwrap();
    let shared_jd = env.shared("job-default").unwrap();
    let shared_direct = env.shared("direct").unwrap();
    let pod = env
        .kubelet
        .run_pod(job_pod("never", &shared, 0, true))
        .await
        .expect("run pod");
    let pod_jd = env
        .kubelet
        .run_pod(job_pod("job-default", &shared_jd, 0, false))
        .await
        .expect("run pod");
    let direct_kubelet = Kubelet::with_config(
        env.containerd.socket(),
        &env.containerd.pod_log_root(),
        fast_backoff(),
    );
    let direct = direct_kubelet
        .run_pod(job_pod("direct", &shared_direct, 0, true))
        .await
        .expect("run pod");
    let began = Instant::now();
    env.check(&[&pod, &pod_jd, &direct], async {
        pod.wait_phase(Phase::Succeeded, TIMEOUT).await?;
        pod_jd.wait_phase(Phase::Succeeded, TIMEOUT).await?;
        eprintln!("both Job pods Succeeded after {:?}", began.elapsed());
        for (p, dir) in [(&pod, &shared), (&pod_jd, &shared_jd)] {
            check_sidecar_completed(&env, p, dir).await?;
            let main = env.only(p, "main").await?;
            if main.exit_code != 0 {
                bail!("{}: main exited {}", p.name(), main.exit_code);
            }
            if !p.duplicates().is_empty() {
                bail!("{}: duplicates {:?}", p.name(), p.duplicates());
            }
        }

        // Without the shim: main exited 0 and kubelet read it, yet the pod
        // stays Running with its sidecar, for as long as we look (3 s after
        // main's exit, longer than the shim took).
        let main_id = direct.container_ids("main").pop().context("no main")?;
        let main = {
            let id = main_id.clone();
            let env = &env;
            wait_for_value(TIMEOUT, "direct main exited", || {
                let id = id.clone();
                async move {
                    let c = env.truth(&id).await?;
                    Ok((state(&c) == ContainerState::ContainerExited).then_some(c))
                }
            })
            .await?
        };
        wait_for(TIMEOUT, "the simulator to read direct main exited", || {
            let direct = &direct;
            async move {
                direct
                    .synced("main")
                    .is_some_and(|s| s.state == ContainerState::ContainerExited as i32)
            }
        })
        .await?;
        let until = uptime_of(main.finished_at) + 3.0;
        while up(Instant::now()) < until {
            if direct.phase() != Phase::Running {
                bail!("direct pod phase {:?}", direct.phase());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let proxy = env.only(&direct, "proxy").await?;
        if state(&proxy) != ContainerState::ContainerRunning
            || recorded(&shared_direct, "proxy.term").is_some()
        {
            bail!("direct proxy {:?}", state(&proxy));
        }
        direct.delete(Some(Duration::ZERO)).await?;
        pod.delete(None).await?;
        pod_jd.delete(None).await?;
        Ok(())
    })
    .await;
}

/// Other clients subscribed to containerd's `GetContainerEvents` directly
/// (three here): containerd 1.7 hands each event to one subscriber only, so
/// most exits never reach the shim's subscription. The Job pod still
/// completes, its sidecar stopped after main exited: on 1.7 the shim also
/// reads the exits it waits for every second. (On 1.6, which has no events,
/// and 2.3, which sends every subscriber every event, nothing is taken.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes_while_other_clients_take_containerds_events() {
    let env = Env::start().await.expect("environment");
    let mut takers = Vec::new();
    for _ in 0..3 {
        let (mut rt, _) = env.containerd.cri();
        takers.push(tokio::spawn(async move {
            let Ok(answer) = rt
                .get_container_events(k8s_cri::v1::GetEventsRequest {})
                .await
            else {
                return 0;
            };
            let mut stream = answer.into_inner();
            let mut taken = 0;
            while let Ok(Some(_)) = stream.message().await {
                taken += 1;
            }
            taken
        }));
    }
    let shared = env.shared("taken").unwrap();
    let pod = env
        .kubelet
        .run_pod(job_pod("taken", &shared, 0, true))
        .await
        .expect("run pod");
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Succeeded, TIMEOUT).await?;
        let main_id = pod.container_ids("main").pop().context("no main")?;
        let main = env.truth(&main_id).await?;
        let proxy = env.only(&pod, "proxy").await?;
        if (main.exit_code, proxy.exit_code) != (0, 143) {
            bail!(
                "containerd: main exited {}, proxy {} (want 0 and 143 from its SIGTERM trap)",
                main.exit_code,
                proxy.exit_code
            );
        }
        let term = must_have_recorded(&shared, "proxy.term")?;
        let main_done = uptime_of(main.finished_at);
        if term < main_done - CLOCK_SLACK {
            bail!("proxy got SIGTERM at {term:.3}, before main exited at {main_done:.3}");
        }
        eprintln!(
            "with three other subscribers on containerd: main exited at {main_done:.3}, proxy \
             SIGTERM +{:.3} s",
            term - main_done
        );
        pod.delete(None).await?;
        Ok(())
    })
    .await;
    for taker in takers {
        taker.abort();
    }
}

/// (d) Restart policy Never, main exits 1: the sidecar is still stopped and
/// reported exit 0, but the failed main makes the pod Failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_pod_fails_when_main_fails() {
    let env = Env::start().await.expect("environment");
    let shared = env.shared("fails").unwrap();
    let pod = env
        .kubelet
        .run_pod(job_pod("fails", &shared, 1, true))
        .await
        .expect("run pod");
    let began = Instant::now();
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Failed, TIMEOUT).await?;
        eprintln!("Failed after {:?}", began.elapsed());
        check_sidecar_completed(&env, &pod, &shared).await?;
        let main = env.only(&pod, "main").await?;
        if main.exit_code != 1 {
            bail!("main exited {}", main.exit_code);
        }
        if pod.synced("main").map(|s| s.exit_code) != Some(1) {
            bail!("kubelet read main as {:?}", pod.synced("main"));
        }
        pod.delete(None).await?;
        Ok(())
    })
    .await;
}

/// (d) Restart policy OnFailure: main fails once (exit 1) and succeeds on
/// the retry. The sidecar runs on through the retry (one attempt, SIGTERM
/// only after the retry exited), then is stopped: the pod Succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_job_keeps_its_sidecar_until_the_retry_succeeds() {
    let env = Env::start().await.expect("environment");
    let shared = env.shared("retry").unwrap();
    let main = "while [ ! -e /shared/proxy.ready ]; do sleep 0.05; done; sleep 1; \
                if [ -e /shared/failed-once ]; then exit 0; fi; \
                touch /shared/failed-once; exit 1";
    let pod = env
        .kubelet
        .run_pod(
            PodDef::job("retry")
                .restart_policy(RestartPolicy::OnFailure)
                .annotation(SIDECARS, "proxy")
                .annotation(RESTART_POLICY, "OnFailure")
                .container(
                    ContainerDef::new("proxy", until_term("proxy", 143, ""))
                        .mount(&shared, "/shared"),
                )
                .container(ContainerDef::new("main", sh(main)).mount(&shared, "/shared")),
        )
        .await
        .expect("run pod");
    let began = Instant::now();
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Succeeded, TIMEOUT).await?;
        eprintln!("Succeeded after {:?}", began.elapsed());
        let ids = pod.container_ids("main");
        if ids.len() != 2 {
            bail!("main attempts {ids:?}, want 2");
        }
        let first = env.truth(&ids[0]).await?;
        let retry = env.truth(&ids[1]).await?;
        if (first.exit_code, retry.exit_code) != (1, 0) {
            bail!(
                "main exits {} then {}, want 1 then 0",
                first.exit_code,
                retry.exit_code
            );
        }
        let (_, term) = check_sidecar_completed(&env, &pod, &shared).await?;
        // One sidecar attempt, which was running all along: it got its only
        // SIGTERM after the retry had started and ended.
        let retry_started = uptime_of(retry.started_at);
        let first_done = uptime_of(first.finished_at);
        eprintln!(
            "first attempt exited at {first_done:.3}, retry ran {retry_started:.3}..{:.3}, proxy SIGTERM at {term:.3}",
            uptime_of(retry.finished_at)
        );
        if term < retry_started {
            bail!("proxy got SIGTERM at {term:.3}, before the retry started at {retry_started:.3}");
        }
        pod.delete(None).await?;
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// e, f. Shutdown

/// (e) Deletion with grace 10 s. The app needs 3 s after SIGTERM and then
/// sends a last message through the sidecar. The sidecar's SIGTERM comes
/// only after the app exited, and the message arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_holds_the_sidecar_until_the_app_has_exited() {
    const GRACE: Duration = Duration::from_secs(10);
    let env = Env::start().await.expect("environment");
    let shared = env.shared("web").unwrap();
    // The sidecar relays one line per connection into /shared/received
    // (the shim's readiness check connects and sends nothing).
    let proxy = until_term(
        "proxy",
        0,
        "nc -ll -p 8080 -e sh -c 'read line && echo \"$line\" >> /shared/received' &",
    );
    // The app says hello at start (its sidecar is ready by then) and bye
    // when it is told to stop, 3 s later.
    let app = sh("trap 'cat /proc/uptime > /shared/app.term; sleep 3; \
                  echo bye | nc -w 5 127.0.0.1 8080 && cat /proc/uptime > /shared/app.sent; \
                  exit 0' TERM; \
                  echo hello | nc -w 5 127.0.0.1 8080; \
                  touch /shared/app.ready; while :; do sleep 3600 & wait $!; done");
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("web")
                .termination_grace(GRACE)
                .annotation(SIDECARS, "proxy")
                .annotation(&format!("{READY_PREFIX}proxy"), "tcp://:8080")
                .container(ContainerDef::new("proxy", proxy).mount(&shared, "/shared"))
                .container(ContainerDef::new("app", app).mount(&shared, "/shared")),
        )
        .await
        .expect("run pod");
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Running, TIMEOUT).await?;
        wait_file(&shared, "app.ready").await?;
        let received = std::fs::read_to_string(shared.join("received")).unwrap_or_default();
        if received != "hello\n" {
            bail!("the sidecar relayed {received:?} at start");
        }

        let began = Instant::now();
        let (timings, exits) = env.delete(&pod, GRACE).await?;
        let took = began.elapsed();
        let [proxy, app] = &exits[..] else {
            bail!("statuses {exits:?}");
        };
        let app_term = must_have_recorded(&shared, "app.term")?;
        let app_sent = must_have_recorded(&shared, "app.sent")?;
        let app_done = uptime_of(app.finished_at);
        let proxy_term = must_have_recorded(&shared, "proxy.term")?;
        let proxy_asked = timings
            .iter()
            .find(|t| t.container == "proxy")
            .map(|t| up(t.sent))
            .context("the simulator did not stop proxy")?;
        eprintln!(
            "delete took {took:?}; uptime: proxy StopContainer sent {proxy_asked:.3}, app SIGTERM {app_term:.3}, \
             app sent bye {app_sent:.3}, app exited {app_done:.3}, proxy SIGTERM {proxy_term:.3} (+{:.3} s)",
            proxy_term - app_done
        );
        // kubelet asked for both stops at once...
        if proxy_asked > app_term + 1.0 {
            bail!("kubelet stopped proxy at {proxy_asked:.3}, not with the app ({app_term:.3})");
        }
        // ... the app took its 3 s and exited 0 ...
        if app_sent < app_term + 3.0 - CLOCK_SLACK || app_done < app_sent - CLOCK_SLACK {
            bail!("app: SIGTERM {app_term:.3}, sent {app_sent:.3}, exited {app_done:.3}");
        }
        if (state(app), app.exit_code) != (ContainerState::ContainerExited, 0) {
            bail!("app {:?} exit {}", state(app), app.exit_code);
        }
        // ... and only then did the sidecar get its SIGTERM.
        if proxy_term < app_done - CLOCK_SLACK {
            bail!("proxy got SIGTERM at {proxy_term:.3}, before the app exited at {app_done:.3}");
        }
        // ... promptly: before the grace period ran out, which a shim that
        // missed the app's exit would wait for (and 1 s more).
        if proxy_term >= proxy_asked + secs(GRACE) {
            bail!(
                "proxy got SIGTERM {:.3} s after the app exited, {:.3} s after its stop: at the \
                 end of its grace period",
                proxy_term - app_done,
                proxy_term - proxy_asked
            );
        }
        if (state(proxy), proxy.exit_code) != (ContainerState::ContainerExited, 0) {
            bail!("proxy {:?} exit {}", state(proxy), proxy.exit_code);
        }
        let received = std::fs::read_to_string(shared.join("received"))?;
        if received != "hello\nbye\n" {
            bail!("the sidecar relayed {received:?}, want hello and bye");
        }
        if took >= GRACE {
            bail!("delete took {took:?}, the whole grace period");
        }
        Ok(())
    })
    .await;
}

/// (e) A sidecar's exec preStop hook runs only after the app exited (here
/// 2 s after its SIGTERM), and the sidecar's SIGTERM comes after the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_exec_pre_stop_runs_after_the_app_has_exited() {
    const GRACE: Duration = Duration::from_secs(10);
    let env = Env::start().await.expect("environment");
    let shared = env.shared("hooked").unwrap();
    let hook = PreStop::Exec(sh("cat /proc/uptime > /shared/proxy.prestop"));
    let app = sh(
        "trap 'cat /proc/uptime > /shared/app.term; sleep 2; exit 0' TERM; \
                  touch /shared/app.ready; while :; do sleep 3600 & wait $!; done",
    );
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("hooked")
                .termination_grace(GRACE)
                .annotation(SIDECARS, "proxy")
                .container(
                    ContainerDef::new("proxy", until_term("proxy", 0, ""))
                        .mount(&shared, "/shared")
                        .pre_stop(hook),
                )
                .container(ContainerDef::new("app", app).mount(&shared, "/shared")),
        )
        .await
        .expect("run pod");
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Running, TIMEOUT).await?;
        wait_file(&shared, "app.ready").await?;
        wait_file(&shared, "proxy.ready").await?;

        let began = Instant::now();
        let (timings, exits) = env.delete(&pod, GRACE).await?;
        let took = began.elapsed();
        let [proxy, app] = &exits[..] else {
            bail!("statuses {exits:?}");
        };
        let app_term = must_have_recorded(&shared, "app.term")?;
        let app_done = uptime_of(app.finished_at);
        let pre_stop = must_have_recorded(&shared, "proxy.prestop")?;
        let proxy_term = must_have_recorded(&shared, "proxy.term")?;
        let hook_asked = timings
            .iter()
            .find(|t| t.container == "proxy")
            .and_then(|t| t.pre_stop.as_ref())
            .map(|r| up(r.start))
            .context("the simulator ran no preStop hook for proxy")?;
        eprintln!(
            "delete took {took:?}; uptime: proxy preStop asked {hook_asked:.3}, app SIGTERM {app_term:.3}, \
             app exited {app_done:.3}, proxy preStop ran {pre_stop:.3} (+{:.3} s), proxy SIGTERM {proxy_term:.3}",
            pre_stop - app_done
        );
        if hook_asked > app_term + 1.0 {
            bail!("kubelet ran proxy's hook at {hook_asked:.3}, not with the app's stop ({app_term:.3})");
        }
        if app_done < app_term + 2.0 - CLOCK_SLACK {
            bail!("app exited at {app_done:.3}, its SIGTERM was at {app_term:.3}");
        }
        if pre_stop < app_done - CLOCK_SLACK {
            bail!("proxy's preStop ran at {pre_stop:.3}, before the app exited at {app_done:.3}");
        }
        // Promptly: before the grace period ran out, which a shim that
        // missed the app's exit would wait for (and 1 s more).
        if pre_stop >= hook_asked + secs(GRACE) {
            bail!(
                "proxy's preStop ran {:.3} s after the app exited, {:.3} s after kubelet asked: at \
                 the end of its grace period",
                pre_stop - app_done,
                pre_stop - hook_asked
            );
        }
        if proxy_term < pre_stop - CLOCK_SLACK {
            bail!("proxy got SIGTERM at {proxy_term:.3}, before its preStop at {pre_stop:.3}");
        }
        if (state(proxy), proxy.exit_code) != (ContainerState::ContainerExited, 0) {
            bail!("proxy {:?} exit {}", state(proxy), proxy.exit_code);
        }
        if took >= GRACE {
            bail!("delete took {took:?}, the whole grace period");
        }
        Ok(())
    })
    .await;
}

/// (f) An app that ignores SIGTERM, grace 4 s: containerd SIGKILLs it at
/// the end of its grace (137), and only then does the sidecar get SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_ignoring_sigterm_is_killed_before_the_sidecar_gets_sigterm() {
    const GRACE: Duration = Duration::from_secs(4);
    let env = Env::start().await.expect("environment");
    let shared = env.shared("stubborn").unwrap();
    let app = sh("trap '' TERM; touch /shared/app.ready; while :; do sleep 0.1; done");
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("stubborn")
                .termination_grace(GRACE)
                .annotation(SIDECARS, "proxy")
                .container(
                    ContainerDef::new("proxy", until_term("proxy", 0, ""))
                        .mount(&shared, "/shared"),
                )
                .container(ContainerDef::new("app", app).mount(&shared, "/shared")),
        )
        .await
        .expect("run pod");
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Running, TIMEOUT).await?;
        wait_file(&shared, "app.ready").await?;
        wait_file(&shared, "proxy.ready").await?;

        let began = Instant::now();
        let (timings, exits) = env.delete(&pod, GRACE).await?;
        let took = began.elapsed();
        let [proxy, app] = &exits[..] else {
            bail!("statuses {exits:?}");
        };
        let app_asked = timings
            .iter()
            .find(|t| t.container == "app")
            .map(|t| up(t.sent))
            .context("the simulator did not stop app")?;
        let app_done = uptime_of(app.finished_at);
        let proxy_term = must_have_recorded(&shared, "proxy.term")?;
        eprintln!(
            "delete took {took:?}; uptime: app StopContainer sent {app_asked:.3}, app killed {app_done:.3} \
             (exit {}), proxy SIGTERM {proxy_term:.3} ({:+.3} s)",
            app.exit_code,
            proxy_term - app_done
        );
        if (state(app), app.exit_code) != (ContainerState::ContainerExited, 137) {
            bail!("app {:?} exit {}, want SIGKILLed (137)", state(app), app.exit_code);
        }
        if app_done < app_asked + secs(GRACE) - 0.1 {
            bail!("app killed at {app_done:.3}, less than the grace after its stop ({app_asked:.3})");
        }
        if proxy_term < app_done - CLOCK_SLACK {
            bail!(
                "proxy got SIGTERM at {proxy_term:.3}, {:.3} s before the app was killed at {app_done:.3}",
                app_done - proxy_term
            );
        }
        // Once the grace ran out the shim waits 1 s (its grace slack) for
        // the SIGKILLed app's exit to show, then stops the sidecar anyway:
        // here that release and the exit come together, so no bound tells
        // them apart. The sidecar must not be held beyond it, though: not for
        // a grace period of its own after the kill.
        if proxy_term - app_done >= secs(GRACE) {
            bail!(
                "proxy got SIGTERM {:.3} s after the app was killed",
                proxy_term - app_done
            );
        }
        // It got a real SIGTERM and ended through its trap.
        if (state(proxy), proxy.exit_code) != (ContainerState::ContainerExited, 0) {
            bail!("proxy {:?} exit {}", state(proxy), proxy.exit_code);
        }
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// i. A sidecar stopped alone

/// (i) kubelet stops just the sidecar (a failed liveness probe), restart
/// policy Always, grace 10 s: the stop is not held for the apps (the sidecar
/// exits within the ~2 s evidence window plus its own exit), kubelet starts a
/// new attempt, and the app is not touched: same container, still running
/// in containerd, never got SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_sidecar_stop_is_not_held_and_the_sidecar_restarts() {
    const STOP_TIMEOUT: Duration = Duration::from_secs(10);
    let env = Env::start().await.expect("environment");
    let shared = env.shared("live").unwrap();
    let pod = env
        .kubelet
        .run_pod(
            PodDef::new("live")
                .annotation(SIDECARS, "proxy")
                .annotation(RESTART_POLICY, "Always")
                .container(
                    ContainerDef::new("proxy", until_term("proxy", 0, ""))
                        .mount(&shared, "/shared"),
                )
                .container(
                    ContainerDef::new("app", until_term("app", 0, "")).mount(&shared, "/shared"),
                ),
        )
        .await
        .expect("run pod");
    env.check(&[&pod], async {
        pod.wait_phase(Phase::Running, TIMEOUT).await?;
        wait_file(&shared, "app.ready").await?;
        wait_file(&shared, "proxy.ready").await?;
        let app_before = env.only(&pod, "app").await?;
        let first_proxy = pod.container_ids("proxy").pop().context("no proxy")?;

        let sent = Instant::now();
        env.kubelet.stop_container(&pod, "proxy", STOP_TIMEOUT).await?;
        let returned = sent.elapsed();
        let old = env.truth(&first_proxy).await?;
        let proxy_term = must_have_recorded(&shared, "proxy.term")?;
        let asked = up(sent);
        eprintln!(
            "StopContainer(proxy, {STOP_TIMEOUT:?}) returned after {returned:?}; proxy SIGTERM {:.3} s and exit {:.3} s after it was sent",
            proxy_term - asked,
            uptime_of(old.finished_at) - asked
        );
        if (state(&old), old.exit_code) != (ContainerState::ContainerExited, 0) {
            bail!("old proxy {:?} exit {}", state(&old), old.exit_code);
        }
        // Held for the apps, it would have waited out its 10 s.
        if proxy_term - asked > 5.0 {
            bail!(
                "proxy got SIGTERM {:.3} s after kubelet's stop: held",
                proxy_term - asked
            );
        }

        // kubelet restarts it.
        wait_for(TIMEOUT, "a second proxy attempt", || {
            let pod = &pod;
            async move { pod.container_ids("proxy").len() == 2 }
        })
        .await?;
        let new_proxy = pod.container_ids("proxy").pop().context("no proxy")?;
        {
            let env = &env;
            let id = new_proxy.clone();
            wait_for(TIMEOUT, "the new proxy running in containerd", || {
                let id = id.clone();
                async move {
                    env.truth(&id)
                        .await
                        .is_ok_and(|c| state(&c) == ContainerState::ContainerRunning)
                }
            })
            .await?;
        }
        pod.wait_phase(Phase::Running, TIMEOUT).await?;

        // The app: the same container, still running, no SIGTERM.
        let app_ids = pod.container_ids("app");
        if app_ids != [app_before.id.clone()] {
            bail!("app attempts {app_ids:?}, want only {}", app_before.id);
        }
        let app = env.truth(&app_before.id).await?;
        if state(&app) != ContainerState::ContainerRunning || app.started_at != app_before.started_at
        {
            bail!("app {:?} started at {} (was {})", state(&app), app.started_at, app_before.started_at);
        }
        if let Some(t) = recorded(&shared, "app.term") {
            bail!("the app got SIGTERM at {t:.3}");
        }
        if !pod.calls_of("StopContainer", Some("app")).is_empty() {
            bail!("kubelet stopped the app");
        }
        if !pod.duplicates().is_empty() {
            bail!("duplicates {:?}", pod.duplicates());
        }
        pod.delete(None).await?;
        Ok(())
    })
    .await;
}
