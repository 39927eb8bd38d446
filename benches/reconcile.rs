//! Start-up with many managed pods on the node: how long the shim takes,
//! after a `kill -9`, to read its state directory and reconcile it with the
//! runtime, and to answer the first call it intercepts.
//!
//! Creates `--pods` pods (default 250) through the shim with direct CRI calls,
//! each with a sidecar `proxy` and one normal container, in three kinds:
//! * done (2/5): Job pods (`restart-policy: Never`) whose `main` exited 0 and
//!   whose proxy the shim then stopped: their exited containers cost the
//!   reconcile a ContainerStatus each;
//! * running (2/5): proxy first, the app's start held until the proxy runs;
//! * deferred (1/5, created last): the app listed before a proxy that never
//!   becomes ready (`tcp://:9999`, nothing listens; `ready-timeout: 110s`),
//!   so the shim answered the app's StartContainer and owes its start: the
//!   app is CREATED in containerd and must read RUNNING through the shim.
//!
//! Then `--rounds` times (default 5): kill the shim with SIGKILL, spawn a
//! new one on the same socket and state directory, and measure from the
//! spawn to the `reconciled with the runtime` log line (its `took_ms`; the
//! wall time by the line's timestamp, from the spawn and from the new shim's
//! first log line), and to the answer of the first intercepted call: a
//! ContainerStatus of the newest deferred app, sent over a fresh connection
//! as soon as the socket accepts, which must read RUNNING while containerd
//! (asked directly) says CREATED. Prints each round (with the new shim's
//! VmRSS), the medians and maxima, and the state directory's size.
//!
//! Rounds must end within the deferred pods' ready-timeout (110 s after the
//! first of them was created); the pods are then removed. The private
//! containerd's pod network is a /24: at most about 250 pods.
//!
//! Run by `hack/bench`, or:
//! `cargo bench --bench reconcile -- [--pods 250] [--rounds 5] [--parallel 10]`

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerState, CreateContainerRequest, RemovePodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use support::state_of as state;
use support::*;
use tonic::transport::Channel;

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";
const READY_PROXY: &str = "sidecar-shim.io/ready.proxy";
const READY_TIMEOUT: &str = "sidecar-shim.io/ready-timeout";
/// The longest ready-timeout the shim takes: the rounds run within it.
const DEFERRAL: Duration = Duration::from_secs(110);
const GRACE_SECS: u64 = 10;
const TIMEOUT: Duration = Duration::from_secs(120);
const RECONCILED: &str = "reconciled with the runtime";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Done,
    Running,
    Deferred,
}

/// A pod as it was created: sandbox id, and the normal container's id.
struct Pod {
    kind: Kind,
    sandbox: String,
    app: String,
}

async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: &k8s_cri::v1::PodSandboxConfig,
    container: k8s_cri::v1::ContainerConfig,
) -> Result<String> {
    Ok(rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(container),
            sandbox_config: Some(config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id)
}

async fn start(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<()> {
    rt.start_container(StartContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .context("StartContainer")?;
    Ok(())
}

/// Create pod `i` of `kind` through the shim, in kubelet's order (spec
/// order, each container created and started before the next).
async fn make_pod(
    i: usize,
    kind: Kind,
    mut shim: RuntimeServiceClient<Channel>,
    direct: RuntimeServiceClient<Channel>,
    log_root: &Path,
) -> Result<Pod> {
    let mut config = pod_sandbox_config(&format!("reconcile-{i}"), log_root);
    let a = &mut config.annotations;
    a.insert(SIDECARS.into(), "proxy".into());
    if kind == Kind::Done {
        a.insert(RESTART_POLICY.into(), "Never".into());
    }
    if kind == Kind::Deferred {
        a.insert(READY_PROXY.into(), "tcp://:9999".into());
        a.insert(READY_TIMEOUT.into(), format!("{}s", DEFERRAL.as_secs()));
    }
    let sandbox = run_pod(&mut shim, &config).await?;
    let proxy = kubelet_container_config(
        &config,
        "proxy",
        sh("trap 'exit 143' TERM; sleep 3600 & wait"),
        GRACE_SECS,
    );
    let app_cmd = match kind {
        Kind::Done => vec!["true".to_string()],
        _ => sh("trap 'exit 0' TERM; sleep 3600 & wait"),
    };
    let app = kubelet_container_config(&config, "app", app_cmd, GRACE_SECS);
    let app = if kind == Kind::Deferred {
        // The app first: its start is answered at once and deferred.
        let app = create(&mut shim, &sandbox, &config, app).await?;
        start(&mut shim, &app).await?;
        let proxy = create(&mut shim, &sandbox, &config, proxy).await?;
        start(&mut shim, &proxy).await?;
        app
    } else {
        let proxy_id = create(&mut shim, &sandbox, &config, proxy).await?;
        start(&mut shim, &proxy_id).await?;
        let app = create(&mut shim, &sandbox, &config, app).await?;
        start(&mut shim, &app).await?;
        if kind == Kind::Done {
            // Job completion: the shim stops the proxy.
            wait_for(TIMEOUT, "the shim to stop a done pod's proxy", || {
                let (direct, proxy_id) = (direct.clone(), proxy_id.clone());
                async move {
                    container_status(&direct, &proxy_id)
                        .await
                        .is_ok_and(|s| state(&s) == ContainerState::ContainerExited)
                }
            })
            .await?;
        }
        app
    };
    Ok(Pod { kind, sandbox, app })
}

/// Total size in bytes and number of files under `dir`.
fn dir_size(dir: &Path) -> Result<(u64, usize)> {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (b, f) = dir_size(&entry.path())?;
            bytes += b;
            files += f;
        } else {
            bytes += meta.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

/// The time at the start of a log line (`2026-01-02T03:04:05.123456Z`, UTC,
/// as tracing's text format writes it).
fn log_time(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
    // days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + min * 60 + sec).ok()?;
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// The `key=value` field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

struct Round {
    took_ms: u64,
    /// Spawn → the `reconciled` line, by its timestamp.
    reconciled_ms: f64,
    /// The new shim's first log line → the `reconciled` line.
    from_start_ms: f64,
    /// Spawn → the first intercepted call answered (at the client).
    first_call_ms: f64,
    /// The new shim's VmRSS once it answered, KiB.
    rss_kib: u64,
    report: String,
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    support::proc_status_kib(pid, "VmRSS:")
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// Kill the shim, start a new one, measure.
async fn round(
    shim: &mut Option<ShimProcess>,
    listen: &Path,
    containerd: &PrivateContainerd,
    probe_app: &str,
) -> Result<Round> {
    let mut old = shim.take().context("no shim")?;
    old.kill9().await?;
    drop(old);
    let log_path = listen.with_extension("log");
    let log_before = std::fs::read_to_string(&log_path)?.len();
    let direct = containerd.cri().0;

    let (spawned, spawned_at) = (Instant::now(), SystemTime::now());
    // The first intercepted call: as soon as the socket accepts, over a
    // fresh connection each try (a channel whose connect failed is not
    // reused).
    let first_call = {
        let (listen, app) = (listen.to_path_buf(), probe_app.to_string());
        tokio::spawn(async move {
            let deadline = Instant::now() + TIMEOUT;
            loop {
                let (rt, _) = cri_client(&listen);
                if let Ok(s) = container_status(&rt, &app).await {
                    return Ok::<_, anyhow::Error>((spawned.elapsed(), s));
                }
                if Instant::now() > deadline {
                    bail!("no answer through the new shim within {TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    *shim = Some(ShimProcess::start(listen, containerd.socket(), &[]).await?);
    // What the new shim logged, up to its reconcile line.
    let lines = wait_for_value(TIMEOUT, "the new shim's reconcile line", || {
        let log_path = log_path.clone();
        async move {
            let log = std::fs::read_to_string(&log_path)?;
            let new = log.get(log_before..).unwrap_or_default();
            Ok(new.contains(RECONCILED).then(|| new.to_string()))
        }
    })
    .await?;
    let line = lines
        .lines()
        .find(|l| l.contains(RECONCILED))
        .context("no reconcile line")?;
    let first_line = lines
        .lines()
        .find_map(log_time)
        .context("no timestamped line")?;
    let reconciled_at = log_time(line).with_context(|| format!("no time in {line:?}"))?;
    let (first, seen) = first_call.await??;
    let truth = container_status(&direct, probe_app).await?;
    ensure!(
        state(&seen) == ContainerState::ContainerRunning
            && state(&truth) == ContainerState::ContainerCreated,
        "deferred app {probe_app}: the new shim answered {:?} ({}), containerd says {:?}; \
         want RUNNING through the shim while CREATED in containerd",
        state(&seen),
        seen.reason,
        state(&truth)
    );
    let took_ms = field(line, "took_ms")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no took_ms in {line:?}"))?;
    let report = ["kept", "rebuilt", "vanished", "changed"]
        .iter()
        .map(|k| format!("{k}={}", field(line, k).unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(" ");
    let rss_kib = rss_kib(shim.as_ref().context("no shim")?.pid())?;
    Ok(Round {
        rss_kib,
        took_ms,
        reconciled_ms: ms_between(spawned_at, reconciled_at),
        from_start_ms: ms_between(first_line, reconciled_at),
        first_call_ms: first.as_secs_f64() * 1e3,
        report,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

fn main() -> Result<()> {
    let mut pods = 250usize;
    let mut rounds = 5usize;
    let mut parallel = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--pods" => pods = value("--pods")?,
            "--rounds" => rounds = value("--rounds")?,
            "--parallel" => parallel = value("--parallel")?.max(1),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--pods N, --rounds N, --parallel N)"),
        }
    }
    ensure!(
        pods >= 5 && rounds >= 1,
        "--pods at least 5, --rounds at least 1"
    );
    // The level a node runs at: debug would log every call.
    if std::env::var_os(SHIM_LOG_ENV).is_none() {
        std::env::set_var(SHIM_LOG_ENV, "info");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(pods, rounds, parallel))
}

async fn run(pods: usize, rounds: usize, parallel: usize) -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let mut shim = Some(ShimProcess::start(&listen, containerd.socket(), &[]).await?);
    let (through_shim, _) = shim.as_ref().expect("started").cri();
    let (direct, _) = containerd.cri();
    let log_root = containerd.pod_log_root();

    // Deferred pods last: the rounds must come within their ready-timeout.
    let deferred = pods / 5;
    let done = (pods - deferred) / 2;
    let kinds: Vec<Kind> = (0..pods)
        .map(|i| match i {
            i if i < done => Kind::Done,
            i if i < pods - deferred => Kind::Running,
            _ => Kind::Deferred,
        })
        .collect();
    let created = Instant::now();
    let mut made: Vec<Pod> = Vec::new();
    let mut first_deferred = None;
    for chunk in (0..pods).collect::<Vec<_>>().chunks(parallel) {
        if first_deferred.is_none() && chunk.iter().any(|&i| kinds[i] == Kind::Deferred) {
            first_deferred = Some(Instant::now());
        }
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let (s, d, l) = (through_shim.clone(), direct.clone(), log_root.clone());
            let kind = kinds[i];
            set.spawn(async move {
                make_pod(i, kind, s, d, &l)
                    .await
                    .with_context(|| format!("pod {i} ({kind:?})"))
            });
        }
        while let Some(pod) = set.join_next().await {
            made.push(pod??);
        }
    }
    let first_deferred = first_deferred.unwrap_or_else(Instant::now);
    let state_dir = ShimProcess::default_state_dir(&listen);
    let (bytes, files) = dir_size(&state_dir)?;
    println!(
        "{pods} pods ({done} done Job pods, {} running, {deferred} deferred) created through the shim in {:.1?}; \
         state directory: {files} files, {bytes} bytes ({:.1} KiB, {:.0} bytes per pod)",
        pods - done - deferred,
        created.elapsed(),
        bytes as f64 / 1024.0,
        bytes as f64 / pods as f64,
    );
    // The newest deferred app: the furthest from its ready-timeout.
    let probe_app = made
        .iter()
        .rev()
        .find(|p| p.kind == Kind::Deferred)
        .map(|p| p.app.clone())
        .context("no deferred pod (use at least 5 pods)")?;

    let (mut took, mut reconciled, mut from_start, mut first) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 1..=rounds {
        if first_deferred.elapsed() + Duration::from_secs(5) > DEFERRAL {
            println!(
                "round {r}: stopping, the deferred pods' ready-timeout ({DEFERRAL:?}) is near"
            );
            break;
        }
        let m = round(&mut shim, &listen, &containerd, &probe_app).await?;
        println!(
            "round {r}: took_ms {:>4}; spawn -> reconciled {:>6.1} ms (first log line -> reconciled {:>6.1} ms); \
             spawn -> first intercepted call answered {:>6.1} ms; {}; VmRSS {} KiB",
            m.took_ms, m.reconciled_ms, m.from_start_ms, m.first_call_ms, m.report, m.rss_kib
        );
        took.push(m.took_ms as f64);
        reconciled.push(m.reconciled_ms);
        from_start.push(m.from_start_ms);
        first.push(m.first_call_ms);
    }
    ensure!(!took.is_empty(), "no round ran");
    println!(
        "reconcile with {pods} pods, {} rounds (median / max): took_ms {:.0} / {:.0}; \
         spawn -> reconciled {:.1} / {:.1} ms; first log line -> reconciled {:.1} / {:.1} ms; \
         spawn -> first intercepted call answered {:.1} / {:.1} ms",
        took.len(),
        median(took.clone()),
        max(&took),
        median(reconciled.clone()),
        max(&reconciled),
        median(from_start.clone()),
        max(&from_start),
        median(first.clone()),
        max(&first),
    );

    // Remove the pods straight at containerd (no grace to wait for).
    let removed = Instant::now();
    for chunk in made.chunks(parallel.max(10)) {
        let mut set = tokio::task::JoinSet::new();
        for p in chunk {
            let (mut d, id) = (direct.clone(), p.sandbox.clone());
            set.spawn(async move {
                d.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await?;
                d.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    eprintln!("pods removed in {:.1?}", removed.elapsed());
    drop(shim);
    Ok(())
}
