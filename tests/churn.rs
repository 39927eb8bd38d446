//! Churn: 500 Job pods with a sidecar go through the shim, one batch at a
//! time, each through its whole lifecycle, and the shim neither grows nor
//! keeps anything of them.
//!
//! Every pod is managed (`sidecar-shim.io/sidecars: proxy`,
//! `restart-policy: Never`) and driven with direct CRI calls through the
//! shim's socket, in kubelet's order: RunPodSandbox, the proxy created and
//! started, then `main`, whose StartContainer the shim holds until the proxy
//! is running; `main` exits 0 at once, so the shim stops the proxy (Job
//! completion), which is watched in containerd directly until it exited with
//! the 143 of its SIGTERM; kubelet reads that exit as 0 through the shim
//! (checked for every tenth pod); then StopPodSandbox and RemovePodSandbox
//! through the shim.
//!
//! Asserted from the sources of truth: the shim's RSS (`VmRSS` in
//! /proc/PID/status) after all pods is within 10% of what it was after the
//! first 50; the state directory's `pods/` is empty; containerd, asked
//! directly, has no sandbox and no container left; the shim still answers.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerState, ListContainersRequest, ListPodSandboxRequest, RemovePodSandboxRequest,
    StopPodSandboxRequest, VersionRequest,
};
use support::state_of as state;
use support::*;
use tonic::transport::Channel;

const PODS: usize = 500;
/// Pods in flight at once: what the 2-core machine takes alongside the
/// other tests.
const BATCH: usize = 25;
/// The RSS baseline is read once this many pods are done.
const BASELINE_PODS: usize = 50;
/// The bound: RSS after all pods within 10% of the baseline.
const RSS_GROWTH: f64 = 0.10;
/// One pod's whole life, generous for a loaded machine.
const POD_TIMEOUT: Duration = Duration::from_secs(90);
/// The proxy's exit is also read through the shim for every n-th pod.
const CHECK_THROUGH_SHIM_EVERY: usize = 10;

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";

/// A proxy that exits 143 on SIGTERM, as most do (a shell as PID 1 would
/// ignore the signal without its trap).
const PROXY: &str = "trap 'exit 143' TERM; sleep 3600 & wait";
/// kubelet's terminationGracePeriod annotation for the pods: a proxy still
/// running after it would be SIGKILLed (exit 137).
const GRACE_SECS: u64 = 20;

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// containerd's status of `id` once it reads as exited.
async fn exited(
    direct: &RuntimeServiceClient<Channel>,
    id: &str,
    what: &str,
) -> Result<k8s_cri::v1::ContainerStatus> {
    wait_for_value(POD_TIMEOUT, what, || async {
        let s = container_status(direct, id).await?;
        Ok((state(&s) == ContainerState::ContainerExited).then_some(s))
    })
    .await
}

/// One pod's whole lifecycle through the shim (`shim`), checked against
/// containerd (`direct`).
async fn one_pod(
    i: usize,
    mut shim: RuntimeServiceClient<Channel>,
    direct: RuntimeServiceClient<Channel>,
    log_root: &Path,
) -> Result<[Duration; 4]> {
    let t0 = Instant::now();
    let mut config = pod_sandbox_config(&format!("churn-{i}"), log_root);
    config
        .annotations
        .insert(SIDECARS.to_string(), "proxy".to_string());
    config
        .annotations
        .insert(RESTART_POLICY.to_string(), "Never".to_string());
    let pod = run_pod(&mut shim, &config).await?;
    let t1 = Instant::now();
    let proxy_config = kubelet_container_config(&config, "proxy", sh(PROXY), GRACE_SECS);
    let proxy = start_container(&mut shim, &pod, &config, &proxy_config)
        .await
        .context("proxy")?;
    let main_config = kubelet_container_config(&config, "main", vec!["true".into()], GRACE_SECS);
    let main = start_container(&mut shim, &pod, &config, &main_config)
        .await
        .context("main")?;
    let t2 = Instant::now();

    // Job completion: the shim stops the proxy once main has exited.
    let proxy_exit = exited(&direct, &proxy, "the proxy to exit in containerd").await?;
    let t3 = Instant::now();
    // The shim hears of main's exit from containerd's task events, before
    // containerd's CRI has deleted the task and written the exit down: the
    // proxy may be gone a moment before main reads as exited. The order is
    // judged from containerd's timestamps below.
    let main_exit = exited(&direct, &main, "containerd to record main's exit").await?;
    ensure!(
        main_exit.exit_code == 0,
        "main: exit {}, want exited 0",
        main_exit.exit_code
    );
    ensure!(
        proxy_exit.exit_code == 143,
        "proxy exited {} ({}), want 143: SIGTERM from the shim within grace",
        proxy_exit.exit_code,
        proxy_exit.reason
    );
    ensure!(
        proxy_exit.finished_at >= main_exit.finished_at,
        "the proxy exited before main"
    );
    if i % CHECK_THROUGH_SHIM_EVERY == 0 {
        let seen = container_status(&shim, &proxy)
            .await
            .context("through the shim")?;
        ensure!(
            state(&seen) == ContainerState::ContainerExited && seen.exit_code == 0,
            "kubelet reads the stopped proxy as {:?} exit {} ({}), want exited 0",
            state(&seen),
            seen.exit_code,
            seen.reason
        );
    }

    shim.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    shim.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("RemovePodSandbox")?;
    Ok([t1 - t0, t2 - t1, t3 - t2, t3.elapsed()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_500_job_pods_leaves_nothing_and_memory_flat() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let (through_shim, _) = shim.cri();
    let (direct, _) = containerd.cri();
    let log_root = containerd.pod_log_root();

    let started = Instant::now();
    let mut baseline = None;
    let mut phases = [Duration::ZERO; 4];
    for first in (0..PODS).step_by(BATCH) {
        let mut batch = tokio::task::JoinSet::new();
        for i in first..(first + BATCH).min(PODS) {
            let (shim_rt, direct_rt, log_root) =
                (through_shim.clone(), direct.clone(), log_root.clone());
            batch.spawn(async move {
                one_pod(i, shim_rt, direct_rt, &log_root)
                    .await
                    .with_context(|| format!("pod churn-{i}"))
            });
        }
        while let Some(done) = batch.join_next().await {
            match done? {
                Ok(t) => {
                    for (sum, t) in phases.iter_mut().zip(t) {
                        *sum += t;
                    }
                }
                Err(e) => anyhow::bail!(
                    "{e:#}\n--- last lines of the shim's log ---\n{}",
                    tail(shim.log_path(), 60)
                ),
            }
        }
        let done = (first + BATCH).min(PODS);
        if done == BASELINE_PODS {
            baseline = Some(memory(shim.pid())?);
        }
        if done % 100 == 0 {
            let avg = |d: Duration| (d / done as u32).as_millis();
            eprintln!(
                "{done} pods done after {:.1?}; per pod on average: sandbox {} ms, \
                 containers started {} ms, until the proxy's exit {} ms, stop and remove {} ms",
                started.elapsed(),
                avg(phases[0]),
                avg(phases[1]),
                avg(phases[2]),
                avg(phases[3]),
            );
        }
    }
    let (rss_first, hwm_first) = baseline.context("no baseline taken")?;
    let (rss_last, hwm_last) = memory(shim.pid())?;
    eprintln!(
        "shim memory: after {BASELINE_PODS} pods VmRSS {rss_first} KiB (VmHWM {hwm_first} KiB), \
         after {PODS} pods VmRSS {rss_last} KiB (VmHWM {hwm_last} KiB); \
         {PODS} pods in {:.1?}",
        started.elapsed()
    );

    // Nothing left in the shim's state directory ...
    let pods_dir = ShimProcess::default_state_dir(&listen).join("pods");
    let left: Vec<String> = std::fs::read_dir(&pods_dir)
        .with_context(|| format!("reading {}", pods_dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    ensure!(left.is_empty(), "left in {}: {left:?}", pods_dir.display());
    // ... nor in containerd ...
    let sandboxes = direct
        .clone()
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(
        sandboxes.is_empty(),
        "{} sandboxes left in containerd",
        sandboxes.len()
    );
    let containers = direct
        .clone()
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    ensure!(
        containers.is_empty(),
        "{} containers left in containerd",
        containers.len()
    );
    // ... and the shim still answers, forwarded and intercepted calls alike.
    through_shim
        .clone()
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .context("Version through the shim")?;
    let seen = through_shim
        .clone()
        .list_containers(ListContainersRequest { filter: None })
        .await
        .context("ListContainers through the shim")?
        .into_inner()
        .containers;
    ensure!(seen.is_empty(), "the shim lists {} containers", seen.len());

    // The bound comes last, so that a leak of pods shows first above.
    let limit = rss_first as f64 * (1.0 + RSS_GROWTH);
    ensure!(
        rss_last as f64 <= limit,
        "shim VmRSS grew from {rss_first} KiB after {BASELINE_PODS} pods to {rss_last} KiB \
         after {PODS} (limit {limit:.0} KiB)"
    );
    Ok(())
}
