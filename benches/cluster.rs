//! Sidecars through the shim against Kubernetes' native sidecars, on a real
//! one-node cluster (`hack/cluster`, kubelet v1.28.7 with the
//! `SidecarContainers` gate on, through this build's shim): the same
//! kubelet runs both kinds of pod, side by side, one of each at a time per
//! round (`--parallel` rounds at once). Pods are
//! `hack/cluster-manifests/bench.yaml`'s, renamed per round.
//!
//! * sidecar ready -> app's first command: the proxy records when it first
//!   connects to its own port (a loop of `wget` right after it starts
//!   httpd), the app when its first command runs (`/proc/uptime`). Through
//!   the shim the app's start is held until a TCP connect succeeds (checked
//!   every 10 ms); native: kubelet starts the app once the sidecar's
//!   `startupProbe` (tcpSocket, `periodSeconds: 1`, the least there is)
//!   succeeds.
//! * last main container exit -> Job Complete: containerd's `finished_at` of
//!   `main` (asked straight) to the moment a `kubectl get jobs --watch` sees
//!   the Complete condition.
//! * pod deletion -> pod gone: `kubectl delete` sent to the watch's DELETED
//!   event; every container exits at once on SIGTERM.
//! * pods started per minute: `load.yaml`'s 50 annotated and 50 plain pods
//!   (`--load N` each) applied at once, until all run, through the shim and,
//!   on a second cluster, with kubelet straight at containerd, one after the
//!   other; kubelet's GOAWAY `too_many_pings` and failed CRI calls are
//!   counted in both (issue 9).
//!
//! Run by `hack/bench --cluster`, or:
//! `cargo bench --bench cluster -- [--pods 20] [--parallel 4] [--load 50]`

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use support::cluster::{
    condition_true, container_status, manifest_doc, pod_uid, uptime_now, uptime_of, Cluster, Mode,
};

const TIMEOUT: Duration = Duration::from_secs(180);

/// The start pods' proxy opens its port this long after it starts...
const LISTEN_AFTER: &str = "sleep 0.3\n";

/// ...replaced per round by 1 to 2 s (spread evenly: the golden-ratio
/// sequence): long enough that kubelet has sent the app's StartContainer
/// before the proxy is ready (so that what is timed is the shim's hold, not
/// kubelet's pace), and at every phase of the native startupProbe's 1 s
/// period, as a sidecar's readiness would be.
fn listen_after(round: usize) -> f64 {
    1.0 + (round as f64 * 0.618_034).fract()
}

struct Args {
    pods: usize,
    parallel: usize,
    load: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        pods: 20,
        parallel: 4,
        load: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        match a.as_str() {
            "--pods" => args.pods = num("--pods")?,
            "--parallel" => args.parallel = num("--parallel")?,
            "--load" => args.load = num("--load")?,
            // cargo bench passes --bench.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(
        args.pods > 0 && args.parallel > 0,
        "--pods and --parallel must be positive"
    );
    Ok(args)
}

/// Receipt times of watch events (`/proc/uptime` when read).
#[derive(Default)]
struct Seen {
    /// Job name -> when first seen Complete.
    complete: HashMap<String, f64>,
    /// Pod name -> when its DELETED event came.
    deleted: HashMap<String, f64>,
    /// Job name -> when its pod was first seen Succeeded.
    succeeded: HashMap<String, f64>,
}

/// `kubectl get KIND --watch --output-watch-events -o json`, read by a
/// thread that notes when each event arrives.
struct Watch {
    child: Child,
}

impl Watch {
    fn start(cluster: &Cluster, kind: &'static str, seen: Arc<Mutex<Seen>>) -> Result<Self> {
        let mut child = Command::new(cluster.dir().join("bin/kubectl"))
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args([
                "get",
                kind,
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("kubectl get --watch")?;
        let out = child.stdout.take().context("kubectl's stdout")?;
        std::thread::spawn(move || {
            let stream =
                serde_json::Deserializer::from_reader(BufReader::new(out)).into_iter::<Value>();
            for event in stream.flatten() {
                let at = uptime_now();
                let name = event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let mut seen = seen.lock().unwrap();
                if kind == "jobs" && condition_true(&event["object"], "Complete") {
                    seen.complete.entry(name).or_insert(at);
                } else if kind == "pods" && event["type"] == "DELETED" {
                    seen.deleted.entry(name).or_insert(at);
                } else if kind == "pods" && event["object"]["status"]["phase"] == "Succeeded" {
                    if let Some(job) = event["object"]["metadata"]["labels"]["job-name"].as_str() {
                        seen.succeeded.entry(job.to_owned()).or_insert(at);
                    }
                }
            }
        });
        Ok(Watch { child })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// bench.yaml's document `name`, renamed `name-ROUND`.
fn doc(bench: &str, name: &str, round: usize) -> Result<String> {
    Ok(manifest_doc(bench, name)?.replace(
        &format!("  name: {name}\n"),
        &format!("  name: {name}-{round}\n"),
    ))
}

fn poll<T>(cluster: &Cluster, what: &str, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    cluster.wait_for(TIMEOUT, what, f)
}

/// The pod `name`'s uid once it has one.
fn uid_of(cluster: &Cluster, name: &str) -> Result<String> {
    poll(cluster, &format!("pod {name}"), || {
        Ok(cluster.pod(name).ok().map(|p| pod_uid(&p).to_owned()))
    })
}

/// Seconds from the sidecar's readiness to the app's first command and to
/// containerd's started_at of the app, and from the app's created_at to its
/// first command.
type StartTimes = (f64, f64, f64);

/// Sidecar listening -> app's first command and -> containerd's started_at
/// of the app, for the pods `names`; and how
/// many of the apps containerd created only after the proxy listened
/// (kubelet was late: nothing was held).
fn startup(cluster: &Cluster, names: &[String]) -> Result<(Vec<StartTimes>, usize)> {
    let mut out = Vec::new();
    let mut late = 0;
    for name in names {
        let uid = uid_of(cluster, name)?;
        let (listen, start) = poll(cluster, &format!("{name}: the app's first command"), || {
            let r = cluster.records(&uid);
            Ok(r.first("proxy", "ready").zip(r.first("app", "start")))
        })?;
        // containerd notes started_at once its start call returns, which
        // can be after the app's first command.
        let app = poll(
            cluster,
            &format!("{name}: containerd's started_at of the app"),
            || {
                let rt = cluster.runtime_pod(&uid)?;
                let app = rt.one("app")?.clone();
                Ok(app.started.is_some().then_some(app))
            },
        )?;
        if app.created.is_some_and(|c| uptime_of(c) > listen + 0.01) {
            late += 1;
        }
        let started = uptime_of(app.started.context("the app has no started_at")?);
        let created = uptime_of(app.created.context("the app has no created_at")?);
        // The first command, containerd's started_at (the task runs), and
        // from containerd's created_at to the first command.
        out.push((start - listen, started - listen, start - created));
    }
    Ok((out, late))
}

/// The Job's pod's `main`: containerd's finished_at -> Complete seen; and
/// its parts: -> the proxy's finished_at, -> the pod seen Succeeded, ->
/// Complete.
fn job_done(cluster: &Cluster, seen: &Mutex<Seen>, job: &str) -> Result<(f64, [f64; 3])> {
    let complete = poll(cluster, &format!("Job {job} Complete"), || {
        Ok(seen.lock().unwrap().complete.get(job).copied())
    })?;
    let succeeded = seen
        .lock()
        .unwrap()
        .succeeded
        .get(job)
        .copied()
        .unwrap_or(complete);
    let pods = cluster.pods(&format!("job-name={job}"))?;
    let pod = pods
        .first()
        .with_context(|| format!("Job {job} has no pod"))?;
    let rt = cluster.runtime_pod(pod_uid(pod))?;
    let main = uptime_of(
        rt.one("main")?
            .finished
            .context("main has no finished_at")?,
    );
    let proxy = uptime_of(
        rt.one("proxy")?
            .finished
            .context("the proxy has no finished_at")?,
    );
    Ok((
        complete - main,
        [proxy - main, succeeded - proxy, complete - succeeded],
    ))
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank.
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Applies `yaml`, waits until `total` pods run all their containers; returns
/// the seconds from apply to that.
fn throughput(cluster: &Cluster, yaml: &str, total: usize) -> Result<f64> {
    let t0 = Instant::now();
    cluster.apply(yaml)?;
    cluster.wait_for(
        Duration::from_secs(600),
        &format!("{total} pods running"),
        || {
            let pods = cluster.kubectl_json(&["get", "pods"])?;
            let running = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    ["app", "proxy"].iter().all(|c| {
                        container_status(p, c).is_some_and(|s| s["state"]["running"].is_object())
                    })
                })
                .count();
            Ok((running >= total).then_some(()))
        },
    )?;
    let took = t0.elapsed().as_secs_f64();
    cluster.kubectl(&["delete", "deployments", "--all", "--wait=false"])?;
    cluster.wait_for(Duration::from_secs(600), "every pod gone", || {
        Ok(cluster
            .kubectl(&["get", "pods", "-o", "name"])?
            .trim()
            .is_empty()
            .then_some(()))
    })?;
    Ok(took)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let bench =
        std::fs::read_to_string(support::repo_root().join("hack/cluster-manifests/bench.yaml"))?;
    let load =
        std::fs::read_to_string(support::repo_root().join("hack/cluster-manifests/load.yaml"))?;
    ensure!(
        load.matches("  replicas: 50\n").count() == 2,
        "load.yaml: want two `replicas: 50`"
    );
    let load = load.replace("  replicas: 50\n", &format!("  replicas: {}\n", args.load));

    eprintln!("bringing up two clusters (through the shim, and kubelet straight at containerd)");
    let (shim, direct) = Cluster::up_pair()?;
    ensure!(shim.mode() == Mode::Shim && direct.mode() == Mode::Direct);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let _jobs = Watch::start(&shim, "jobs", seen.clone())?;
    let _pods = Watch::start(&shim, "pods", seen.clone())?;

    let kinds = ["shim", "native"];
    let mut ready: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut job: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut gone: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut created_late: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ready_started: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut create_to_first: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut job_parts: BTreeMap<&str, Vec<[f64; 3]>> = BTreeMap::new();
    let rounds: Vec<usize> = (0..args.pods).collect();
    for chunk in rounds.chunks(args.parallel) {
        eprintln!(
            "rounds {}-{} of {}",
            chunk[0] + 1,
            chunk[chunk.len() - 1] + 1,
            args.pods
        );
        // One of each kind per round, all applied at once.
        let mut yaml = String::new();
        for &i in chunk {
            for kind in kinds {
                for what in ["start", "job", "delete"] {
                    let mut d = doc(&bench, &format!("{kind}-{what}"), i)?;
                    if what == "start" {
                        ensure!(
                            d.contains(LISTEN_AFTER),
                            "bench.yaml: {kind}-start has no `{LISTEN_AFTER}`"
                        );
                        d = d.replace(LISTEN_AFTER, &format!("sleep {:.2}\n", listen_after(i)));
                    }
                    yaml.push_str(&format!("---\n{d}"));
                }
            }
        }
        shim.apply(&yaml)?;
        for kind in kinds {
            let names: Vec<String> = chunk.iter().map(|i| format!("{kind}-start-{i}")).collect();
            let (times, late) = startup(&shim, &names)?;
            for (first, started, from_create) in times {
                ready.entry(kind).or_default().push(first);
                ready_started.entry(kind).or_default().push(started);
                create_to_first.entry(kind).or_default().push(from_create);
            }
            *created_late.entry(kind).or_default() += late;
            for &i in chunk {
                let (total, parts) = job_done(&shim, &seen, &format!("{kind}-job-{i}"))?;
                job.entry(kind).or_default().push(total);
                job_parts.entry(kind).or_default().push(parts);
            }
        }
        // Deletion: every pod's app and proxy running, then one kubectl
        // delete for all of them.
        let mut names = Vec::new();
        for &i in chunk {
            for kind in kinds {
                let name = format!("{kind}-delete-{i}");
                let uid = uid_of(&shim, &name)?;
                poll(&shim, &format!("{name} running"), || {
                    let r = shim.records(&uid);
                    Ok(
                        (r.count("app", "start") > 0 && r.count("proxy", "listen") > 0)
                            .then_some(()),
                    )
                })?;
                names.push(name);
            }
        }
        let t0 = uptime_now();
        let mut cmd = vec!["delete", "pod", "--wait=false"];
        cmd.extend(names.iter().map(String::as_str));
        shim.kubectl(&cmd)?;
        for name in &names {
            let at = poll(&shim, &format!("{name} gone"), || {
                Ok(seen.lock().unwrap().deleted.get(name).copied())
            })?;
            let kind = if name.starts_with("shim") {
                "shim"
            } else {
                "native"
            };
            gone.entry(kind).or_default().push(at - t0);
        }
        // Clean up the round (not timed).
        shim.kubectl(&["delete", "pods,jobs", "--all", "--wait=false"])?;
        shim.wait_for(TIMEOUT, "the round's pods gone", || {
            Ok(shim
                .kubectl(&["get", "pods", "-o", "name"])?
                .trim()
                .is_empty()
                .then_some(()))
        })?;
    }

    eprintln!(
        "pods started per minute: {} annotated and {} plain pods at once",
        args.load, args.load
    );
    let total = 2 * args.load;
    let offsets = (shim.kubelet_log_len(), direct.kubelet_log_len());
    let through = throughput(&shim, &load, total)?;
    let without = throughput(&direct, &load, total)?;

    println!();
    println!(
        "{} pods of each kind, {} rounds at once, one cluster (kubelet v1.28.7 -> sidecar-shim -> containerd {})",
        args.pods,
        args.parallel,
        runtime_version(&shim)
    );
    println!();
    println!("| | shim p50 | shim p95 | native p50 | native p95 | native/shim (p50) |");
    println!("|---|---|---|---|---|---|");
    let row = |what: &str, m: &BTreeMap<&str, Vec<f64>>, scale: f64, unit: &str| {
        let (s, n) = (&m["shim"], &m["native"]);
        println!(
            "| {what} | {:.0} {unit} | {:.0} {unit} | {:.0} {unit} | {:.0} {unit} | {:.2} |",
            quantile(s, 0.5) * scale,
            quantile(s, 0.95) * scale,
            quantile(n, 0.5) * scale,
            quantile(n, 0.95) * scale,
            quantile(n, 0.5) / quantile(s, 0.5)
        );
    };
    row("sidecar ready -> app's first command", &ready, 1000.0, "ms");
    row(
        "last main container exit -> Job Complete",
        &job,
        1000.0,
        "ms",
    );
    // containerd's finished_at of both: the sidecar's SIGTERM came before
    // its own exit, so this bounds exit -> SIGTERM from above.
    let sidecar_exited: BTreeMap<&str, Vec<f64>> = kinds
        .iter()
        .map(|&k| (k, job_parts[k].iter().map(|p| p[0]).collect()))
        .collect();
    row(
        "last main container exit -> sidecar exited (containerd's finished_at)",
        &sidecar_exited,
        1000.0,
        "ms",
    );
    row("pod deletion -> pod gone", &gone, 1000.0, "ms");
    println!();
    println!(
        "sidecar ready -> app: the proxy opens its port 1-2 s after it starts; apps containerd \
         created only after that (nothing held): {} through the shim, {} native. Of it, ready -> \
         containerd's started_at of the app, p50/p95: {:.0}/{:.0} ms through the shim, \
         {:.0}/{:.0} ms native.",
        created_late.get("shim").copied().unwrap_or(0),
        created_late.get("native").copied().unwrap_or(0),
        quantile(&ready_started["shim"], 0.5) * 1000.0,
        quantile(&ready_started["shim"], 0.95) * 1000.0,
        quantile(&ready_started["native"], 0.5) * 1000.0,
        quantile(&ready_started["native"], 0.95) * 1000.0,
    );
    println!(
        "The runtime's own start-up meanwhile, native apps (created and started by kubelet at \
         once, nothing held): containerd's created_at -> first command p50/p95 {:.0}/{:.0} ms.",
        quantile(&create_to_first["native"], 0.5) * 1000.0,
        quantile(&create_to_first["native"], 0.95) * 1000.0,
    );
    for kind in kinds {
        let parts = &job_parts[kind];
        let median =
            |k: usize| quantile(&parts.iter().map(|p| p[k]).collect::<Vec<_>>(), 0.5) * 1000.0;
        println!(
            "last main exit -> Job Complete, {kind}, medians: -> the sidecar exited {:.0} ms, -> \
             the pod seen Succeeded {:.0} ms more, -> Complete seen {:.0} ms more",
            median(0),
            median(1),
            median(2)
        );
    }
    println!();
    println!(
        "| {total} pods at once ({} annotated, {} plain) | through the shim | without the shim |",
        args.load, args.load
    );
    println!("|---|---|---|");
    println!("| apply -> all running | {through:.1} s | {without:.1} s |");
    println!(
        "| pods started per minute | {:.0} | {:.0} |",
        total as f64 * 60.0 / through,
        total as f64 * 60.0 / without
    );
    println!(
        "| GOAWAY too_many_pings in kubelet's log | {} | {} |",
        shim.too_many_pings(),
        direct.too_many_pings()
    );
    let (se, de) = (
        shim.kubelet_cri_errors_since(offsets.0),
        direct.kubelet_cri_errors_since(offsets.1),
    );
    println!(
        "| failed CRI calls in kubelet's log (these pods, started and deleted) | {} | {} |",
        se.values().sum::<usize>(),
        de.values().sum::<usize>()
    );
    println!();
    for (label, errors) in [("through the shim", &se), ("without the shim", &de)] {
        println!("failed CRI calls {label} (these pods), by kind:");
        if errors.is_empty() {
            println!("  none");
        }
        for (k, n) in errors {
            println!("  {n:5} {k}");
        }
    }
    let only: Vec<&String> = se.keys().filter(|k| !de.contains_key(*k)).collect();
    println!(
        "kinds only through the shim: {}",
        if only.is_empty() {
            "none".to_owned()
        } else {
            format!("{only:?}")
        }
    );
    Ok(())
}

fn runtime_version(cluster: &Cluster) -> String {
    cluster
        .kubectl(&[
            "get",
            "node",
            "-o",
            "jsonpath={.items[0].status.nodeInfo.containerRuntimeVersion}",
        ])
        .map(|v| v.trim().trim_start_matches("containerd://").to_owned())
        .unwrap_or_else(|_| "?".into())
}
