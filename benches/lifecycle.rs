//! Lifecycle latencies through the shim, over many pods, measured from what
//! the containers themselves record (one clock for every container and the
//! host: /proc/uptime in 10 ms steps, or busybox sh's `$EPOCHREALTIME` in
//! microseconds where 10 ms steps would blur the figure):
//!
//! * ready → start: from the moment a sidecar opens its port to the moment
//!   the normal container's first command runs;
//! * exit → stop: from the last normal container's exit (Job pod; it runs
//!   1.5 s or more, past the shim's 1 s settle time after kubelet's last
//!   start; the pods started together exit 0.2 s apart) to the
//!   moment the sidecar's SIGTERM trap runs, once with the shim learning exits
//!   from the runtime's events (where the runtime has them: containerd 1.7
//!   and later) and once with a second shim that polls (`exit_events =
//!   false`), side by side;
//! * idle polling: with `--idle-pods` Job pods running (their main
//!   containers, which the shim waits on, sleeping), how many ContainerStatus
//!   calls per second containerd serves for those containers, counted in
//!   containerd's own trace log, for each of the two shims.
//!
//! Starts its own private containerd (`SIDECAR_SHIM_CONTAINERD` picks the
//! version; its log at trace level) and the shims (test support), drives
//! pods with the kubelet simulator. Run by `hack/bench`, or:
//! `cargo bench --bench lifecycle -- [--pods 20] [--parallel 4] [--idle-pods 50]`

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::kubelet::{ContainerDef, Kubelet, KubeletConfig, PodDef, RestartPolicy};
use support::*;

/// Wait until the file at `path` holds a time `parse` reads (seconds).
async fn wait_time(path: &Path, parse: fn(&str) -> Option<f64>) -> anyhow::Result<f64> {
    wait_for_value(
        Duration::from_secs(60),
        &format!("{}", path.display()),
        || {
            let p = path.to_path_buf();
            async move { Ok(std::fs::read_to_string(&p).ok().and_then(|t| parse(&t))) }
        },
    )
    .await
}

/// A time a container wrote with `echo $EPOCHREALTIME`, once the whole
/// line is there.
fn epoch_realtime(text: &str) -> Option<f64> {
    text.strip_suffix('\n')?.trim().parse().ok()
}

/// One pod: [sidecar, app]; the sidecar opens its port ~0.3 s after start.
async fn startup(kubelet: &Kubelet, dir: &Path, i: usize) -> anyhow::Result<f64> {
    let shared = dir.join(format!("start-{i}"));
    std::fs::create_dir_all(&shared)?;
    let pod = PodDef::new(&format!("start-{i}"))
        .annotation("sidecar-shim.io/sidecars", "proxy")
        .annotation("sidecar-shim.io/ready.proxy", "tcp://:8080")
        .container(
            ContainerDef::new(
                "proxy",
                sh("trap 'exit 0' TERM; sleep 0.3; cat /proc/uptime > /shared/ready; nc -ll -p 8080 -e true & wait"),
            )
            .mount(&shared, "/shared"),
        )
        .container(
            ContainerDef::new(
                "app",
                sh("trap 'exit 0' TERM; cat /proc/uptime > /shared/start; sleep 1000 & wait"),
            )
            .mount(&shared, "/shared"),
        );
    let handle = kubelet.run_pod(pod).await?;
    let start = wait_time(&shared.join("start"), kubelet::parse_uptime).await?;
    let ready = wait_time(&shared.join("ready"), kubelet::parse_uptime).await?;
    handle.delete(Some(Duration::from_secs(2))).await?;
    Ok(start - ready)
}

/// Baseline, straight to containerd: from kubelet sending StartContainer to
/// the container's first command. This is the runtime's own share of "ready
/// → start", which no proxy can remove.
async fn runtime_start(kubelet: &Kubelet, dir: &Path, i: usize) -> anyhow::Result<f64> {
    let shared = dir.join(format!("base-{i}"));
    std::fs::create_dir_all(&shared)?;
    let pod = PodDef::new(&format!("base-{i}")).container(
        ContainerDef::new(
            "app",
            sh("trap 'exit 0' TERM; cat /proc/uptime > /shared/start; sleep 1000 & wait"),
        )
        .mount(&shared, "/shared"),
    );
    let handle = kubelet.run_pod(pod).await?;
    let start = wait_time(&shared.join("start"), kubelet::parse_uptime).await?;
    let sent = handle
        .first_call("StartContainer", Some("app"))
        .ok_or_else(|| anyhow::anyhow!("no StartContainer recorded"))?
        .start;
    handle.delete(Some(Duration::from_secs(2))).await?;
    Ok(start - kubelet::uptime_at(sent))
}

/// One Job pod: the main exits after `exit_after` seconds; the sidecar
/// records SIGTERM.
/// Both record the time with busybox sh's `$EPOCHREALTIME` (the kernel's
/// clock in microseconds, the same inside every container and on the host;
/// a shell variable, so nothing is forked for it): the main as its last
/// command, the sidecar first thing in its SIGTERM trap (so the figure is a
/// little longer than the real one, never shorter).
async fn job(kubelet: &Kubelet, dir: &Path, i: usize, exit_after: f64) -> anyhow::Result<f64> {
    let shared = dir.join(format!("job-{i}"));
    std::fs::create_dir_all(&shared)?;
    let pod = PodDef::job(&format!("job-{i}"))
        .restart_policy(RestartPolicy::Never)
        .annotation("sidecar-shim.io/sidecars", "proxy")
        .container(
            ContainerDef::new(
                "proxy",
                // `wait` returns on the signal at once (a foreground sleep
                // would hold the trap back until it ends).
                sh("trap 'echo $EPOCHREALTIME > /shared/term; exit 0' TERM; sleep 1000 & wait"),
            )
            .mount(&shared, "/shared"),
        )
        .container(
            ContainerDef::new(
                "main",
                sh(&format!(
                    "sleep {exit_after}; echo $EPOCHREALTIME > /shared/exit"
                )),
            )
            .mount(&shared, "/shared"),
        );
    let handle = kubelet.run_pod(pod).await?;
    let term = wait_time(&shared.join("term"), epoch_realtime).await?;
    let exit = wait_time(&shared.join("exit"), epoch_realtime).await?;
    handle.delete(Some(Duration::from_secs(2))).await.ok();
    Ok(term - exit)
}

/// A container that sleeps and ends on SIGTERM (its shell is PID 1 of its
/// own PID namespace: without a trap it would ignore the signal).
const SLEEPER: &str = "trap 'exit 0' TERM; sleep 1000 & wait";

/// `n` Job pods whose main sleeps: the containers the shim waits on.
/// Returns their handles and the main containers' ids.
async fn idle_pods(
    kubelet: &Kubelet,
    containerd: &PrivateContainerd,
    prefix: &str,
    n: usize,
) -> anyhow::Result<(Vec<kubelet::PodHandle>, Vec<String>)> {
    let mut handles = Vec::new();
    for i in 0..n {
        let pod = PodDef::job(&format!("{prefix}-{i}"))
            .restart_policy(RestartPolicy::Never)
            .annotation("sidecar-shim.io/sidecars", "proxy")
            .container(ContainerDef::new("proxy", sh(SLEEPER)))
            .container(ContainerDef::new("main", sh(SLEEPER)));
        handles.push(kubelet.run_pod(pod).await?);
    }
    let mut mains = Vec::new();
    for h in &handles {
        let id = wait_for_value(Duration::from_secs(60), "main created", || {
            let ids = h.container_ids("main");
            async move { Ok(ids.first().cloned()) }
        })
        .await?;
        wait_for(Duration::from_secs(60), "main running", || {
            let id = id.clone();
            async move {
                containerd
                    .container_status(&id)
                    .await
                    .is_ok_and(|s| s.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
            }
        })
        .await?;
        mains.push(id);
    }
    Ok((handles, mains))
}

/// ContainerStatus calls per second containerd served for `ids` over
/// `window`, from its trace log.
async fn status_calls_per_second(
    containerd: &PrivateContainerd,
    ids: &[String],
    window: Duration,
) -> anyhow::Result<f64> {
    let log = containerd.log_path();
    let from = std::fs::metadata(&log)?.len() as usize;
    tokio::time::sleep(window).await;
    let text = std::fs::read(&log)?;
    let text = String::from_utf8_lossy(&text[from.min(text.len())..]);
    // One line for the call, one for its answer ("... returns status").
    let calls = text
        .lines()
        .filter(|l| {
            l.contains("ContainerStatus for")
                && !l.contains(" returns ")
                && ids.iter().any(|id| l.contains(id.as_str()))
        })
        .count();
    Ok(calls as f64 / window.as_secs_f64())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let mut pods = 20usize;
    let mut parallel = 4usize;
    let mut idle = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pods" => pods = args.next().expect("--pods N").parse()?,
            "--parallel" => parallel = args.next().expect("--parallel N").parse()?,
            "--idle-pods" => idle = args.next().expect("--idle-pods N").parse()?,
            _ => {}
        }
    }
    // containerd logs each CRI call at trace level: the idle count reads it.
    std::env::set_var("CONTAINERD_LOG_LEVEL", "trace");
    if std::env::var_os(SHIM_LOG_ENV).is_none() {
        std::env::set_var(SHIM_LOG_ENV, "info");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let containerd = PrivateContainerd::start().await?;
        println!("containerd {}", containerd.version());
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let polling_config = containerd.dir().join("polling.toml");
        std::fs::write(&polling_config, "[lifecycle]\nexit_events = false\n")?;
        let polling_listen = containerd.dir().join("polling.sock");
        let polling = ShimProcess::start(
            &polling_listen,
            containerd.socket(),
            &["--config", polling_config.to_str().expect("utf-8 path")],
        )
        .await?;
        // No periodic resync (kubelet's: every minute): during the idle
        // window the only ContainerStatus calls are then the shim's own.
        let config = KubeletConfig {
            initial_backoff: Duration::from_secs(1),
            resync_period: Duration::from_secs(3600),
            pid_namespace_per_container: true,
            ..KubeletConfig::default()
        };
        let kubelet = Arc::new(Kubelet::with_config(&listen, &containerd.pod_log_root(), config.clone()));
        let via_polling = Arc::new(Kubelet::with_config(&polling_listen, &containerd.pod_log_root(), config.clone()));
        let direct = Arc::new(Kubelet::with_config(containerd.socket(), &containerd.pod_log_root(), config.clone()));
        let dir = containerd.dir().join("bench");
        for (name, which) in [
            ("sidecar ready -> app start", 0),
            ("  baseline, no shim: StartContainer -> first command", 2),
            ("last normal exit -> sidecar SIGTERM (exit events)", 1),
            ("last normal exit -> sidecar SIGTERM (polling, exit_events = false)", 3),
        ] {
            let mut samples = Vec::new();
            for chunk in (0..pods).collect::<Vec<_>>().chunks(parallel) {
                let mut tasks = Vec::new();
                for &i in chunk {
                    let k = match which {
                        2 => direct.clone(),
                        3 => via_polling.clone(),
                        _ => kubelet.clone(),
                    };
                    let d = dir.clone();
                    // The Job pods of a chunk start together: their mains
                    // exit 0.2 s apart, so that each exit is timed on its
                    // own rather than in a burst of simultaneous ones.
                    let exit_after = 1.5 + 0.2 * (i % parallel) as f64;
                    tasks.push(tokio::spawn(async move {
                        match which {
                            0 => startup(&k, &d, i).await,
                            1 => job(&k, &d, i, exit_after).await,
                            3 => job(&k, &d, 1000 + i, exit_after).await,
                            _ => runtime_start(&k, &d, i).await,
                        }
                    }));
                }
                for t in tasks {
                    samples.push(t.await??);
                }
            }
            let ms: Vec<f64> = samples.iter().map(|s| s * 1000.0).collect();
            let (mut a, mut b, mut c) = (ms.clone(), ms.clone(), ms.clone());
            println!(
                "{name:<70} pods {:>3}  p50 {:>6.1} ms  p95 {:>6.1} ms  max {:>6.1} ms  (clock: {})",
                ms.len(),
                pct(&mut a, 0.5),
                pct(&mut b, 0.95),
                pct(&mut c, 1.0),
                if matches!(which, 1 | 3) {
                    "$EPOCHREALTIME, 1 us"
                } else {
                    "/proc/uptime, 10 ms steps"
                }
            );
        }
        if idle > 0 {
            let window = Duration::from_secs(5);
            for (name, k, prefix) in [
                ("exit events", &kubelet, "idle-events"),
                ("polling, exit_events = false", &via_polling, "idle-polling"),
            ] {
                let (handles, mains) = idle_pods(k, &containerd, prefix, idle).await?;
                // The simulator reads the statuses of containers it just
                // started once its next relists (every second) see them
                // running; the window opens after those.
                tokio::time::sleep(3 * config.relist_period).await;
                let rate = status_calls_per_second(&containerd, &mains, window).await?;
                println!(
                    "idle, {idle} Job pods running, {name}: {rate:.1} ContainerStatus calls/s to containerd for the containers the shim waits on"
                );
                let mut deletions = tokio::task::JoinSet::new();
                for h in handles {
                    deletions.spawn(async move { h.delete(Some(Duration::from_secs(2))).await.ok() });
                }
                while deletions.join_next().await.is_some() {}
            }
        }
        drop(shim);
        drop(polling);
        anyhow::Ok(())
    })
}
