//! A pod whose annotated sidecar kubelet starts before the app (as it does
//! for native sidecars, init containers with `restartPolicy: Always`)
//! behaves consistently through the shim.
//!
//! kubelet starts a native sidecar before any regular container; the closest
//! the kubelet simulator (`tests/support/kubelet.rs`, regular containers
//! only) comes to that is a sidecar listed first, which it creates and starts
//! before the app. With a TCP readiness check on a port the sidecar opens
//! about 1 s after it starts:
//! * through the real shim binary in front of a private containerd: the app
//!   starts only after the port opened, nothing is created twice, and on
//!   deletion the sidecar gets its SIGTERM only after the app exited;
//! * the same pod against containerd directly: the app starts before the
//!   port opens (starting the sidecar first does not make it ready first),
//!   and both get SIGTERM together. That is the difference the shim makes.
//!
//! Order and timing come from containerd (`started_at`, `created_at`,
//! `finished_at`, read from containerd directly, never through the shim) and
//! from what the containers recorded (`/proc/uptime` into a bind-mounted
//! host directory: one clock for every container and the host).

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::{ContainerState, ContainerStatus};
use support::kubelet::*;
use support::state_of as state;
use support::*;

/// Generous: a loaded 2-core machine runs several tests at once.
const TIMEOUT: Duration = Duration::from_secs(60);
/// terminationGracePeriodSeconds of the pod.
const GRACE: Duration = Duration::from_secs(10);
/// The port the sidecar opens (every pod has its own network namespace).
const PORT: u16 = 8080;
/// Slack when comparing a container's `/proc/uptime` reading (10 ms steps)
/// with a containerd wall-clock time converted to uptime.
const CLOCK_SLACK: f64 = 0.02;

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const READY_PROXY: &str = "sidecar-shim.io/ready.proxy";

/// A container command: SIGTERM is trapped (recorded in /shared/NAME.term;
/// then, after `linger`, /shared/NAME.exit and exit 0), `body` runs (it must
/// end with `;` or `&`), then the shell idles until SIGTERM.
fn script(name: &str, linger: &str, body: &str) -> Vec<String> {
    sh(&format!(
        "trap 'cat /proc/uptime >> /shared/{name}.term; sleep {linger}; \
         cat /proc/uptime >> /shared/{name}.exit; exit 0' TERM; {body} \
         while :; do sleep 0.1; done"
    ))
}

/// Shell: append the uptime to /shared/FILE.
fn rec(file: &str) -> String {
    format!("cat /proc/uptime >> /shared/{file};")
}

/// The pod: sidecar `proxy` listed first (kubelet creates and starts it
/// before the app), ready when port 8080 accepts, which it does about 1 s
/// after it starts; the app records when it starts. On SIGTERM the app takes
/// 1 s to exit, the proxy exits at once.
fn pod(name: &str, dir: &Path) -> PodDef {
    PodDef::new(name)
        .termination_grace(GRACE)
        .annotation(SIDECARS, "proxy")
        .annotation(READY_PROXY, &format!("tcp://:{PORT}"))
        .container(
            ContainerDef::new(
                "proxy",
                script(
                    "proxy",
                    "0",
                    &format!(
                        "{} sleep 1; {} nc -ll -p {PORT} -e true &",
                        rec("proxy.start"),
                        rec("proxy.listen")
                    ),
                ),
            )
            .mount(dir, "/shared"),
        )
        .container(
            ContainerDef::new("app", script("app", "1", &rec("app.start"))).mount(dir, "/shared"),
        )
}

/// A fresh directory under the test's temporary directory, mounted at
/// /shared in the containers.
fn shared_dir(containerd: &PrivateContainerd, name: &str) -> Result<PathBuf> {
    let dir = containerd.dir().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
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

/// Wait until containerd itself runs some attempt of `name`; returns its id
/// and containerd's status.
async fn wait_really_running(
    containerd: &PrivateContainerd,
    pod: &PodHandle,
    name: &str,
) -> Result<(String, ContainerStatus)> {
    wait_for_value(
        TIMEOUT,
        &format!("containerd to run {name}"),
        || async move {
            for id in pod.container_ids(name) {
                let s = container_status(&containerd.cri().0, &id).await?;
                if state(&s) == ContainerState::ContainerRunning {
                    return Ok(Some((id, s)));
                }
            }
            Ok(None)
        },
    )
    .await
    .with_context(|| pod.summary())
}

/// What containerd and the containers say about one run of the pod.
struct Run {
    /// Uptimes: the proxy started (containerd), opened its port (recorded),
    /// the app was created and started (containerd) and recorded its start.
    proxy_started: f64,
    listen_at: f64,
    app_created: f64,
    app_started: f64,
    app_at: f64,
}

/// Run the pod with `kubelet` (through the shim or not) until containerd
/// runs both containers and the port is open.
async fn run(
    kubelet: &Kubelet,
    containerd: &PrivateContainerd,
    dir: &Path,
    name: &str,
) -> Result<(PodHandle, Run)> {
    let pod = kubelet.run_pod(pod(name, dir)).await?;
    let (_, app) = wait_really_running(containerd, &pod, "app").await?;
    let (_, proxy) = wait_really_running(containerd, &pod, "proxy").await?;
    let listen_at = recorded(dir, "proxy.listen").await?;
    let app_at = recorded(dir, "app.start").await?;
    let r = Run {
        proxy_started: uptime_of_nanos(proxy.started_at),
        listen_at,
        app_created: uptime_of_nanos(app.created_at),
        app_started: uptime_of_nanos(app.started_at),
        app_at,
    };
    eprintln!(
        "{name}: uptime: proxy started {:.3}, app created {:.3}, port opened {:.2}, \
         app started {:.3} (recorded {:.2})",
        r.proxy_started, r.app_created, r.listen_at, r.app_started, r.app_at
    );
    Ok((pod, r))
}

/// Delete the pod the way kubelet does while watching the app in containerd
/// directly; returns the uptime at which containerd says the app exited.
async fn delete_watching_app(containerd: &PrivateContainerd, pod: &PodHandle) -> Result<f64> {
    let app_id = pod.container_ids("app").pop().context("no app")?;
    let finished = Arc::new(Mutex::new(None::<i64>));
    let watch = {
        let finished = finished.clone();
        let rt = containerd.cri().0;
        tokio::spawn(async move {
            loop {
                if let Ok(s) = container_status(&rt, &app_id).await {
                    if s.finished_at > 0 {
                        *finished.lock().unwrap() = Some(s.finished_at);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let timings = pod.delete(None).await;
    watch.abort();
    let timings = timings?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    let at = finished
        .lock()
        .unwrap()
        .context("containerd never showed the app exited")?;
    Ok(uptime_of_nanos(at))
}

/// Through the shim: the sidecar kubelet starts first is also ready first,
/// the app starts once, after the port opened, and on deletion the sidecar's
/// SIGTERM comes after the app exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_started_first_is_ready_before_the_app_and_stopped_after_it() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let kubelet = Kubelet::new(shim.listen(), &containerd.pod_log_root());
    let dir = shared_dir(&containerd, "shim")?;
    let diag = |pod: &PodHandle| format!("{}\nshim log:\n{}", pod.summary(), shim.log());

    let (pod, r) = run(&kubelet, &containerd, &dir, "first-shim").await?;
    // kubelet's order: the proxy was running before the app was created.
    ensure!(
        r.proxy_started < r.app_created,
        "proxy started {:.3}, app created {:.3}\n{}",
        r.proxy_started,
        r.app_created,
        diag(&pod)
    );
    // The app starts only once the port is open.
    ensure!(
        r.app_at >= r.listen_at && r.app_started >= r.listen_at - CLOCK_SLACK,
        "app started at {:.2} (containerd {:.3}), port opened at {:.2}\n{}",
        r.app_at,
        r.app_started,
        r.listen_at,
        diag(&pod)
    );
    // Held, not failed: kubelet's one StartContainer of the app succeeded.
    pod.wait_answered("StartContainer", Some("app"), TIMEOUT)
        .await?;
    let starts = pod.calls_of("StartContainer", Some("app"));
    ensure!(
        starts.len() == 1 && starts[0].ok(),
        "app's StartContainer calls: {starts:?}\n{}",
        diag(&pod)
    );
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    // Nothing created or started twice.
    ensure!(
        pod.duplicates().is_empty()
            && pod.container_ids("app").len() == 1
            && pod.container_ids("proxy").len() == 1
            && pod.calls_of("CreateContainer", Some("app")).len() == 1
            && pod.calls_of("CreateContainer", Some("proxy")).len() == 1,
        "{}",
        diag(&pod)
    );
    assert_eq!(recorded_all(&dir, "app.start").len(), 1);
    assert_eq!(recorded_all(&dir, "proxy.start").len(), 1);

    // Deletion: kubelet stops both at once; the app takes 1 s to exit, and
    // only then does the proxy get its SIGTERM.
    let app_done = delete_watching_app(&containerd, &pod).await?;
    let app_term = recorded(&dir, "app.term").await?;
    let app_exit = recorded(&dir, "app.exit").await?;
    let proxy_term = recorded(&dir, "proxy.term").await?;
    eprintln!(
        "uptime: app SIGTERM {app_term:.2}, app about to exit {app_exit:.2}, \
         app exited {app_done:.3} (containerd), proxy SIGTERM {proxy_term:.2}"
    );
    ensure!(
        proxy_term >= app_exit && proxy_term >= app_done - CLOCK_SLACK,
        "proxy SIGTERM at {proxy_term:.2}, app exited at {app_done:.3} (recorded {app_exit:.2})\n{}",
        diag(&pod)
    );
    ensure!(pod.duplicates().is_empty(), "{}", diag(&pod));
    Ok(())
}

/// The same pod against containerd directly: kubelet still starts the
/// sidecar first, but nothing waits for its port, so the app starts before
/// the port opens; on deletion both get SIGTERM at once, the proxy before
/// the app exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_shim_the_app_starts_before_the_port_opens() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let dir = shared_dir(&containerd, "direct")?;

    let (pod, r) = run(&kubelet, &containerd, &dir, "first-direct").await?;
    ensure!(
        r.proxy_started < r.app_created,
        "proxy started {:.3}, app created {:.3}\n{}",
        r.proxy_started,
        r.app_created,
        pod.summary()
    );
    ensure!(
        r.app_at < r.listen_at && r.app_started < r.listen_at,
        "without the shim the app started at {:.2} (containerd {:.3}), not before the port \
         opened at {:.2}\n{}",
        r.app_at,
        r.app_started,
        r.listen_at,
        pod.summary()
    );
    ensure!(pod.duplicates().is_empty(), "{}", pod.summary());

    let app_done = delete_watching_app(&containerd, &pod).await?;
    let app_term = recorded(&dir, "app.term").await?;
    let proxy_term = recorded(&dir, "proxy.term").await?;
    eprintln!(
        "uptime: app SIGTERM {app_term:.2}, proxy SIGTERM {proxy_term:.2}, app exited \
         {app_done:.3} (containerd)"
    );
    ensure!(
        proxy_term < app_done,
        "without the shim the proxy got SIGTERM at {proxy_term:.2}, after the app exited at \
         {app_done:.3}\n{}",
        pod.summary()
    );
    Ok(())
}
