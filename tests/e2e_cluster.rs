//! End to end on a real one-node Kubernetes (`hack/cluster`: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
//! v1.28.7 on loopback; kubelet's runtime endpoint is this build's shim in
//! front of a private containerd), with the manifests of
//! `hack/cluster-manifests/`, checked the way a user checks:
//!
//! * the API server: pod phase, container states, exit codes and restart
//!   counts, Job conditions, Deployment status;
//! * containerd, asked over the CRI straight (never through the shim):
//!   which containers exist for a pod, their states, exit codes and
//!   `started_at` / `finished_at`;
//! * what the containers record themselves: each appends `UPTIME EVENT`
//!   lines (`/proc/uptime`, one clock for every container and this machine)
//!   to a hostPath directory per pod, which outlives the pod.
//!
//! Each scenario that shows a problem the shim solves also runs with
//! kubelet straight at containerd (`hack/cluster up --direct`), side by
//! side, and there must show the problem: that is the proof each test can
//! fail. The direct runs are not timed against fixed sleeps: every wait
//! polls a condition until a deadline generous for a loaded 2-core machine.
//!
//! Each test brings up its own cluster (or a pair: shim and direct) in a
//! temporary directory and takes it down when it ends; the heavy ones run
//! alone (`.config/nextest.toml`).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use support::cluster::{
    condition_true, container_status, init_container_status, manifest_doc, pod_name, pod_uid,
    uptime_now, uptime_of, Cluster, Mode, Records,
};

/// Generous for a loaded 2-core machine: from `kubectl apply` to pods
/// running (a quiet machine needs 1-3 s).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the direct baseline of the Job test is watched after its main
/// container ended, at least (see [`job_completes_and_fails_with_its_sidecar`]).
const BASELINE_WINDOW: Duration = Duration::from_secs(10);

fn manifest(name: &str) -> String {
    format!("hack/cluster-manifests/{name}")
}

fn manifest_text(name: &str) -> Result<String> {
    let path = support::repo_root().join(manifest(name));
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `state.terminated.exitCode` of a container status, if it terminated.
fn exit_code(status: &Value) -> Option<i64> {
    status["state"]["terminated"]["exitCode"].as_i64()
}

fn running(status: &Value) -> bool {
    status["state"]["running"].is_object()
}

fn label(cluster: &Cluster) -> &'static str {
    match cluster.mode() {
        Mode::Shim => "through the shim",
        Mode::Direct => "without the shim",
    }
}

/// `Ok` if `ok`, else a failure with the cluster's diagnostics.
fn check(cluster: &Cluster, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(cluster.fail(&format!("{}: {}", label(cluster), msg())))
    }
}

/// The pod `name`, once `ready` says so of it and its records.
fn wait_pod(
    cluster: &Cluster,
    name: &str,
    what: &str,
    mut ready: impl FnMut(&Value, &Records) -> Result<bool>,
) -> Result<(Value, Records)> {
    cluster.wait_for(START_TIMEOUT, &format!("pod {name}: {what}"), || {
        let pod = cluster.pod(name)?;
        let records = cluster.records(pod_uid(&pod));
        Ok(ready(&pod, &records)?.then_some((pod, records)))
    })
}

/// A container's status or a failure naming it.
fn status_of<'a>(cluster: &Cluster, pod: &'a Value, name: &str) -> Result<&'a Value> {
    container_status(pod, name)
        .ok_or_else(|| cluster.fail(&format!("pod {}: no status for {name}", pod_name(pod))))
}

/// The uptime (the records' clock) of a containerd timestamp.
fn up(ns: Option<i64>) -> Option<f64> {
    ns.map(uptime_of)
}

// ---------------------------------------------------------------------------
// Startup

/// The app reaches its sidecar on its first connection, whether it is listed
/// before the sidecar (the shim defers its start) or after it (the shim
/// holds its start); without the shim both first connections are refused.
#[test]
fn startup_the_app_reaches_its_sidecar_on_the_first_try() -> Result<()> {
    let (shim, direct) = Cluster::up_pair()?;
    for cluster in [&shim, &direct] {
        cluster.apply_file(&manifest("app-first.yaml"))?;
        cluster.apply_file(&manifest("sidecar-first.yaml"))?;
    }

    for name in ["app-first", "sidecar-first"] {
        let (pod, records) = wait_pod(&shim, name, "app connected and running", |pod, r| {
            if r.count("app", "refused") > 0 {
                return Err(shim.fail(&format!(
                    "through the shim, pod {name}: the app's connection was refused:\n{r}"
                )));
            }
            let app = container_status(pod, "app");
            Ok(r.count("app", "connected") > 0 && app.is_some_and(running))
        })?;
        for c in ["app", "proxy"] {
            let status = status_of(&shim, &pod, c)?;
            check(
                &shim,
                running(status) && status["restartCount"] == 0,
                || {
                    format!(
                        "pod {name}: {c} {} restartCount {}",
                        status["state"], status["restartCount"]
                    )
                },
            )?;
        }
        check(
            &shim,
            records.events("app") == ["start", "connected"],
            || {
                format!(
                    "pod {name}: the app's records are not one start and a connection:\n{records}"
                )
            },
        )?;
        check(&shim, records.count("proxy", "start") == 1, || {
            format!("pod {name}: the proxy started more than once:\n{records}")
        })?;
        // containerd: one container of each, the app started after the proxy
        // began to listen (its record is written just before httpd binds).
        // containerd notes started_at once its start call returns, which
        // can be just after the app's first command.
        let rt = shim.wait_for(START_TIMEOUT, "containerd's started_at of the app", || {
            let rt = shim.runtime_pod(pod_uid(&pod))?;
            Ok(rt.one("app")?.started.is_some().then_some(rt))
        })?;
        let app = rt.one("app")?;
        rt.one("proxy")?;
        let listen = records.at("proxy", "listen")?;
        let app_started = up(app.started).context("containerd: the app has no started_at")?;
        let app_first = records.at("app", "start")?;
        check(&shim, app_started >= listen && app_first >= listen, || {
            format!(
                "pod {name}: the app started before the proxy listened (containerd started_at \
                 {app_started:.3}, first command {app_first:.2}, proxy listen {listen:.2})"
            )
        })?;
        eprintln!(
            "through the shim, {name}: proxy's listen record (just before httpd binds) -> app's \
             first command {:.0} ms (containerd started_at {:.0} ms after it); first connection \
             succeeded, restartCount 0",
            (app_first - listen) * 1000.0,
            (app_started - listen) * 1000.0
        );
    }

    // Without the shim: the app's first connection is refused, and kubelet
    // restarts it (restartPolicy Always).
    for name in ["app-first", "sidecar-first"] {
        let (pod, records) = wait_pod(
            &direct,
            name,
            "the app's first connection attempt",
            |pod, r| {
                let restarted = container_status(pod, "app")
                    .is_some_and(|s| s["restartCount"].as_i64().unwrap_or(0) >= 1);
                Ok(!r.events("app").iter().all(|e| *e == "start") && restarted)
            },
        )?;
        let first = records
            .of("app")
            .iter()
            .find(|r| r.event != "start")
            .map(|r| r.event.clone());
        check(&direct, first.as_deref() == Some("refused"), || {
            format!("pod {name}: the app's first connection was not refused:\n{records}")
        })?;
        let restarts = &status_of(&direct, &pod, "app")?["restartCount"];
        eprintln!(
            "without the shim, {name}: the app's first connection was refused; restartCount {restarts}"
        );
    }
    Ok(())
}

/// How long the slow registry holds each blob download.
const SLOW_PULL: Duration = Duration::from_secs(10);

/// The app is listed first and its proxy's image comes from a registry on
/// loopback that holds each blob 10 s (a first pull of a mesh proxy's image
/// on a real node), while another pod's image, from a second such
/// registry, is being pulled. kubelet pulls one image at a time (its
/// default, `serializeImagePulls`): it creates and starts the app, asks
/// ImageStatus for the proxy's image, then waits its turn for the other
/// pod's pull to end before it even sends PullImage, and pulls for 10 s more
/// before it creates the proxy. The shim must not take the deferred app for
/// an init container in all that time: kubelet's ImageStatus, which carries
/// the pod's annotations, says it went on to the next container. The app
/// starts once the proxy listens and connects on its first try.
#[test]
fn startup_the_app_waits_out_a_slow_pull_of_its_sidecars_image() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let registry = rt.block_on(support::registry::SlowRegistry::start(SLOW_PULL))?;
    let other_registry = rt.block_on(support::registry::SlowRegistry::start(SLOW_PULL))?;
    let cluster = Cluster::up(Mode::Shim)?;
    cluster.apply(&format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: first-pull
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {}
      imagePullPolicy: IfNotPresent
      command: [sh, -c, 'while :; do sleep 1; done']
",
        other_registry.image("e2e")
    ))?;
    // kubelet has taken the other pod's pull (its "Pulling" event).
    cluster.wait_for(START_TIMEOUT, "first-pull's image to be pulled", || {
        let events = cluster.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=first-pull,reason=Pulling",
            "-o",
            "name",
        ])?;
        Ok((!events.trim().is_empty()).then_some(()))
    })?;
    let text = manifest_text("app-first.yaml")?.replace("name: app-first", "name: slow-pull");
    let (head, proxy) = text
        .split_once("    - name: proxy")
        .context("app-first.yaml has no proxy container")?;
    let proxy = proxy
        .replacen(
            "image: localhost/sidecar-shim/busybox:test",
            &format!("image: {}", registry.image("e2e")),
            1,
        )
        .replacen("imagePullPolicy: Never", "imagePullPolicy: IfNotPresent", 1);
    cluster.apply(&format!("{head}    - name: proxy{proxy}"))?;
    let (pod, records) =
        wait_pod(
            &cluster,
            "slow-pull",
            "app connected and running",
            |pod, r| {
                if r.count("app", "refused") > 0 {
                    return Err(cluster.fail(&format!(
                        "through the shim: the app's connection was refused:\n{r}"
                    )));
                }
                Ok(r.count("app", "connected") > 0
                    && container_status(pod, "app").is_some_and(running))
            },
        )?;
    let app_status = status_of(&cluster, &pod, "app")?;
    check(&cluster, app_status["restartCount"] == 0, || {
        format!("the app restarted: {app_status}")
    })?;
    check(
        &cluster,
        records.events("app") == ["start", "connected"],
        || format!("the app's records are not one start and a connection:\n{records}"),
    )?;
    let rt_pod = cluster.runtime_pod(pod_uid(&pod))?;
    let created = |c: &support::cluster::RuntimeContainer, what: &str| {
        up(c.created).with_context(|| format!("containerd: {what} has no created_at"))
    };
    let app_created = created(rt_pod.one("app")?, "the app")?;
    let proxy_created = created(rt_pod.one("proxy")?, "the proxy")?;
    let first = cluster.pod("first-pull")?;
    let other_created = created(
        cluster.runtime_pod(pod_uid(&first))?.one("main")?,
        "first-pull's main",
    )?;
    // Before the other pod's image was in, the app waited with nothing
    // but an ImageStatus of the pod reaching the runtime; and the proxy's
    // own pull came after it, one at a time.
    let queued = other_created - app_created;
    let own_pull = proxy_created - other_created;
    check(
        &cluster,
        queued >= 3.0 && own_pull >= SLOW_PULL.as_secs_f64() && registry.blobs_served() >= 1,
        || {
            format!(
                "kubelet did not queue the proxy's slow pull behind the other pod's: the app was \
                 created {queued:.1} s before the other pod's container, the proxy {own_pull:.1} s \
                 after it ({} blobs served)",
                registry.blobs_served()
            )
        },
    )?;
    let listen = records.at("proxy", "listen")?;
    let app_first = records.at("app", "start")?;
    check(&cluster, app_first >= listen, || {
        format!(
            "the app's first command at {app_first:.2}, before the proxy listened at {listen:.2}:\n{records}"
        )
    })?;
    eprintln!(
        "through the shim: the app waited {queued:.1} s for kubelet's pull queue and {own_pull:.1} s \
         for the proxy's own pull ({} blobs held {SLOW_PULL:?} each); its first command came \
         {:.0} ms after the proxy listened; restartCount 0",
        registry.blobs_served(),
        (app_first - listen) * 1000.0
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Jobs

/// The demo Job (`sidecar-demo.yaml`) completes and a Job whose main
/// container fails (`job-fails.yaml`) fails, each with its sidecar stopped;
/// without the shim neither Job finishes: the sidecar runs on.
#[test]
fn job_completes_and_fails_with_its_sidecar() -> Result<()> {
    let (shim, direct) = Cluster::up_pair()?;
    for cluster in [&shim, &direct] {
        cluster.apply_file(&manifest("sidecar-demo.yaml"))?;
        cluster.apply_file(&manifest("job-fails.yaml"))?;
    }

    // Through the shim: the demo Job completes.
    let complete_seen = shim.wait_for(START_TIMEOUT, "Job sidecar-demo Complete", || {
        let job = shim.kubectl_json(&["get", "job", "sidecar-demo"])?;
        if condition_true(&job, "Failed") {
            return Err(shim.fail(&format!(
                "through the shim: Job sidecar-demo Failed: {}",
                job["status"]["conditions"]
            )));
        }
        Ok(condition_true(&job, "Complete").then(uptime_now))
    })?;
    let pod = the_job_pod(&shim, "sidecar-demo")?;
    let name = pod_name(&pod).to_owned();
    check(&shim, pod["status"]["phase"] == "Succeeded", || {
        format!(
            "pod {name}: phase {} (want Succeeded)",
            pod["status"]["phase"]
        )
    })?;
    for c in ["proxy", "app"] {
        let status = status_of(&shim, &pod, c)?;
        check(
            &shim,
            exit_code(status) == Some(0) && status["restartCount"] == 0,
            || {
                format!(
                "pod {name}: {c} {} restartCount {} (want terminated with exit code 0, never restarted)",
                status["state"], status["restartCount"]
            )
            },
        )?;
    }
    let message = status_of(&shim, &pod, "proxy")?["state"]["terminated"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    check(&shim, message.contains("sidecar-shim"), || {
        format!("the proxy's termination message does not say the shim stopped it: {message:?}")
    })?;
    let log = shim.kubectl(&["logs", &name, "-c", "app"])?;
    check(
        &shim,
        log.contains("app: reached the proxy on attempt 1\n"),
        || format!("the app did not reach the proxy on its first attempt; its log:\n{log}"),
    )?;
    let rt = shim.runtime_pod(pod_uid(&pod))?;
    let app_exit = up(rt.one("app")?.finished).context("containerd: the app has no finished_at")?;
    let proxy = rt.one("proxy")?;
    check(
        &shim,
        up(proxy.finished).is_some_and(|f| f >= app_exit),
        || format!("containerd: the proxy finished before the app: {rt:?}"),
    )?;
    let shim_took = complete_seen - app_exit;
    eprintln!(
        "through the shim: sidecar-demo Complete {shim_took:.1} s after the app exited \
         (containerd finished_at to the poll that saw it); the proxy exited {} (kubelet reads 0)",
        proxy.exit_code
    );

    // Through the shim: the failing Job fails, its proxy stopped after main.
    shim.wait_for(START_TIMEOUT, "Job sidecar-job-fails Failed", || {
        let job = shim.kubectl_json(&["get", "job", "sidecar-job-fails"])?;
        Ok(condition_true(&job, "Failed").then_some(()))
    })?;
    let pod = shim.wait_for(START_TIMEOUT, "the failed Job's pod Failed", || {
        let pod = the_job_pod(&shim, "sidecar-job-fails")?;
        Ok((pod["status"]["phase"] == "Failed").then_some(pod))
    })?;
    let main = status_of(&shim, &pod, "main")?;
    let proxy = status_of(&shim, &pod, "proxy")?;
    check(
        &shim,
        exit_code(main) == Some(3) && main["restartCount"] == 0,
        || {
            format!(
                "main {} restartCount {} (want exit code 3, once)",
                main["state"], main["restartCount"]
            )
        },
    )?;
    check(
        &shim,
        exit_code(proxy).is_some() && proxy["restartCount"] == 0,
        || {
            format!(
                "proxy {} (want terminated: stopped by the shim)",
                proxy["state"]
            )
        },
    )?;
    let records = shim.records(pod_uid(&pod));
    let main_exit = records.at("main", "exit")?;
    let proxy_term = records.first("proxy", "sigterm");
    check(&shim, proxy_term.is_some_and(|t| t >= main_exit), || {
        format!("the proxy did not get SIGTERM after main exited:\n{records}")
    })?;
    let rt = shim.runtime_pod(pod_uid(&pod))?;
    let (m, p) = (rt.one("main")?, rt.one("proxy")?);
    check(
        &shim,
        m.exit_code == 3 && p.state == "EXITED" && p.finished >= m.finished,
        || format!("containerd: want main exit 3, then the proxy exited: {rt:?}"),
    )?;
    eprintln!(
        "through the shim: sidecar-job-fails Failed; main exit 3, the proxy got SIGTERM {:.2} s \
         after main's exit and exited {} (kubelet reads {})",
        proxy_term.unwrap_or(0.0) - main_exit,
        p.exit_code,
        exit_code(proxy).unwrap_or(-1)
    );

    // Without the shim: both apps end as through the shim, and then nothing
    // happens: each Job's proxy runs on and its pod stays Running.
    let ends = direct.wait_for(START_TIMEOUT, "both Jobs' main containers to end", || {
        let demo = the_job_pod(&direct, "sidecar-demo")?;
        let fails = the_job_pod(&direct, "sidecar-job-fails")?;
        let ended = |pod: &Value, c: &str| container_status(pod, c).and_then(exit_code);
        Ok(match (ended(&demo, "app"), ended(&fails, "main")) {
            (Some(a), Some(m)) => Some((demo, fails, a, m)),
            _ => None,
        })
    })?;
    let (demo, fails, app_code, main_code) = ends;
    check(&direct, app_code == 0 && main_code == 3, || {
        format!(
            "the mains ended with {app_code} and {main_code} (want 0 and 3, as through the shim)"
        )
    })?;
    let last_end = [(&demo, "app"), (&fails, "main")]
        .iter()
        .map(|(pod, c)| {
            let rt = direct.runtime_pod(pod_uid(pod))?;
            up(rt.one(c)?.finished).context("containerd: no finished_at")
        })
        .collect::<Result<Vec<f64>>>()?
        .into_iter()
        .fold(0.0, f64::max);
    // Watch, not wait: every look must find both Jobs unfinished, their pods
    // Running and the proxies running, for three times as long as the shim's
    // Job took to complete after its app exited (at least BASELINE_WINDOW).
    let window = BASELINE_WINDOW.as_secs_f64().max(3.0 * shim_took);
    let mut looks = 0;
    loop {
        for (job, pod_name_prefix) in [("sidecar-demo", "demo"), ("sidecar-job-fails", "fails")] {
            let j = direct.kubectl_json(&["get", "job", job])?;
            let pod = the_job_pod(&direct, job)?;
            let proxy_running = container_status(&pod, "proxy").is_some_and(running);
            check(
                &direct,
                !condition_true(&j, "Complete")
                    && !condition_true(&j, "Failed")
                    && pod["status"]["phase"] == "Running"
                    && proxy_running,
                || {
                    format!(
                        "{pod_name_prefix}: {:.1} s after the mains ended: Job conditions {}, pod \
                         phase {}, proxy {} (want: unfinished, Running, proxy running)",
                        uptime_now() - last_end,
                        j["status"]["conditions"],
                        pod["status"]["phase"],
                        container_status(&pod, "proxy").map_or(Value::Null, |s| s["state"].clone())
                    )
                },
            )?;
        }
        looks += 1;
        if uptime_now() - last_end >= window {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "without the shim: {window:.1} s after the mains ended both Jobs are unfinished, their \
         pods Running with the proxy running ({looks} looks)"
    );
    Ok(())
}

/// The only pod of a Job (backoffLimit 0, restartPolicy Never).
fn the_job_pod(cluster: &Cluster, job: &str) -> Result<Value> {
    let pods = cluster.pods(&format!("job-name={job}"))?;
    match pods.as_slice() {
        [pod] => Ok(pod.clone()),
        [] => Err(anyhow::anyhow!("Job {job} has no pod yet")),
        more => Err(cluster.fail(&format!(
            "{}: Job {job} made {} pods: {:?}",
            label(cluster),
            more.len(),
            more.iter().map(pod_name).collect::<Vec<_>>()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Deletion

/// On pod deletion the app's last message, sent 3 s into its grace period,
/// reaches the proxy, and the proxy's exec preStop hook runs after the app
/// exited; without the shim the hook runs at once and the message is lost.
#[test]
fn deletion_the_sidecar_outlives_the_app() -> Result<()> {
    let (shim, direct) = Cluster::up_pair()?;
    let mut uids = Vec::new();
    for cluster in [&shim, &direct] {
        cluster.apply_file(&manifest("shutdown.yaml"))?;
    }
    for cluster in [&shim, &direct] {
        let (pod, _) = wait_pod(cluster, "shutdown", "both containers running", |pod, r| {
            let both = ["app", "proxy"]
                .iter()
                .all(|c| container_status(pod, c).is_some_and(running));
            // The app's SIGTERM trap is set before it records its start.
            Ok(both && r.count("app", "start") == 1 && r.count("proxy", "listen") == 1)
        })?;
        uids.push(pod_uid(&pod).to_owned());
    }
    for cluster in [&shim, &direct] {
        cluster.kubectl(&["delete", "pod", "shutdown", "--wait=false"])?;
    }
    // containerd's finish times are needed through the shim only (without
    // it kubelet may remove both containers before a poll sees them
    // finished, on a loaded machine); the pods must be gone on both.
    let shim_finished = watch_deletion(&shim, "shutdown", &uids[0])?;
    watch_deletion(&direct, "shutdown", &uids[1])?;

    // Through the shim.
    let records = shim.records(&uids[0]);
    let proxy_log = records.files.get("proxy.log").cloned().unwrap_or_default();
    check(&shim, records.count("app", "sent") == 1, || {
        format!("the app's last message was not sent:\n{records}")
    })?;
    check(&shim, proxy_log.contains("url:/last-message"), || {
        format!("the proxy's request log lacks the last message:\n{proxy_log}")
    })?;
    let app_exit = records.at("app", "exit")?;
    let prestop = records.at("proxy", "prestop")?;
    let term = records.at("proxy", "sigterm")?;
    let (app_finished, proxy_finished) =
        match (shim_finished.get("app"), shim_finished.get("proxy")) {
            (Some(a), Some(p)) => (*a, *p),
            _ => {
                return Err(shim.fail(&format!(
                    "through the shim: containerd never showed both containers finished: \
                 {shim_finished:?}"
                )))
            }
        };
    // Records are truncated to 10 ms, containerd's times are exact.
    check(
        &shim,
        prestop >= app_exit && term >= prestop && app_finished <= prestop + 0.01,
        || {
            format!(
                "want app exit <= proxy preStop <= proxy SIGTERM (containerd: app finished \
                 {app_finished:.3}, proxy finished {proxy_finished:.3}):\n{records}"
            )
        },
    )?;
    eprintln!(
        "through the shim: app SIGTERM -> last message sent {:.2} s later; proxy preStop {:.2} s \
         and SIGTERM {:.2} s after the app exited",
        records.first("app", "sent").unwrap_or(0.0)
            - records.first("app", "sigterm").unwrap_or(0.0),
        prestop - app_exit,
        term - app_exit
    );

    // Without the shim: the proxy is gone when the app sends.
    let records = direct.records(&uids[1]);
    let proxy_log = records.files.get("proxy.log").cloned().unwrap_or_default();
    check(&direct, records.count("app", "lost") == 1, || {
        format!("the app's last message was not lost:\n{records}")
    })?;
    check(&direct, !proxy_log.contains("url:/last-message"), || {
        format!("the proxy got the last message:\n{proxy_log}")
    })?;
    eprintln!(
        "without the shim: the proxy's preStop ran {:.2} s before the app exited; the last \
         message was lost",
        records.first("app", "exit").unwrap_or(0.0)
            - records.first("proxy", "prestop").unwrap_or(0.0)
    );
    Ok(())
}

/// kubelet v1.28 does not cancel a StartContainer when its pod is deleted
/// (observed here: the deletion waited for the held start to end, at the
/// ready-timeout). A pod deleted while the shim holds its app's start is
/// gone within its grace period (10 s), not after its ready-timeout
/// (100 s): the shim answers a held start after half the grace period, as
/// a deferral, and the deferred app is never started.
#[test]
fn deletion_during_a_held_start_ends_within_the_grace_period() -> Result<()> {
    const GRACE: f64 = 10.0;
    let cluster = Cluster::up(Mode::Shim)?;
    let log = cluster.log_path("sidecar-shim");
    cluster.apply_file(&manifest("held-app.yaml"))?;
    // The shim's log says when kubelet's StartContainer of the app arrived
    // (the API shows nothing of a start in flight).
    let (pod, _) = wait_pod(&cluster, "held-app", "the app's start held", |_, r| {
        let held = fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("start held pod=default/held-app container=app");
        Ok(held && r.count("proxy", "start") == 1)
    })?;
    let uid = pod_uid(&pod).to_owned();
    let deleted = uptime_now();
    cluster.kubectl(&["delete", "pod", "held-app", "--wait=false"])?;
    watch_deletion(&cluster, "held-app", &uid)?;
    let gone = uptime_now() - deleted;
    let records = cluster.records(&uid);
    check(&cluster, gone <= GRACE, || {
        format!(
            "pod gone {gone:.1} s after its deletion, beyond its grace period ({GRACE} s):\n{records}"
        )
    })?;
    check(&cluster, records.of("app").is_empty(), || {
        format!("the app ran although its sidecar never got ready:\n{records}")
    })?;
    check(&cluster, records.count("proxy", "sigterm") == 1, || {
        format!("the proxy got no SIGTERM:\n{records}")
    })?;
    eprintln!(
        "through the shim: pod deleted during a held start gone {gone:.1} s later (grace {GRACE} \
         s, ready-timeout 100 s)"
    );
    Ok(())
}

/// kubelet v1.28.7 kills a deferred app whose TCP liveness probe fails
/// (nothing listens while its start is deferred) and makes a new attempt.
/// Once the probe passes, that attempt is not killed any more, and it
/// starts as soon as the proxy is ready, not at its ready-timeout. (Before,
/// the kill marked the pod as shutting down for good in the shim, and the
/// attempt waited out its ready-timeout: 81 s down, measured.)
#[test]
fn deferred_app_killed_by_its_probe_starts_once_its_sidecar_is_ready() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    cluster.apply_file(&manifest("probed-app.yaml"))?;
    let (pod, _) = wait_pod(
        &cluster,
        "probed-app",
        "the app killed by its probe",
        |pod, _| {
            Ok(container_status(pod, "app")
                .is_some_and(|s| s["restartCount"].as_i64().unwrap_or(0) >= 1))
        },
    )?;
    let uid = pod_uid(&pod).to_owned();
    touch_in(&cluster, "probed-app", "proxy", "/tmp/up")?;
    // Once the probe passes, kubelet kills no more: the attempt then waiting
    // in containerd (its hold over, deferred) is the one to start.
    let mut last: (i64, Instant) = (-1, Instant::now());
    let attempt = cluster.wait_for(
        START_TIMEOUT,
        "an attempt of the app no longer killed",
        || {
            let pod = cluster.pod("probed-app")?;
            let restarts = container_status(&pod, "app")
                .and_then(|s| s["restartCount"].as_i64())
                .unwrap_or(-1);
            if restarts != last.0 {
                last = (restarts, Instant::now());
            }
            if last.1.elapsed() < Duration::from_secs(12) {
                return Ok(None);
            }
            let rt = cluster.runtime_pod(&uid)?;
            // (Killed attempts stay CREATED too: they never ran.)
            let latest = rt.named("app").into_iter().max_by_key(|c| c.attempt);
            let waiting = latest.filter(|c| {
                c.state == "CREATED" && up(c.created).is_some_and(|t| uptime_now() - t >= 3.0)
            });
            Ok(waiting.map(|c| c.attempt))
        },
    )?;
    touch_in(&cluster, "probed-app", "proxy", "/tmp/go")?;
    let (_, records) = wait_pod(&cluster, "probed-app", "the app connected", |_, r| {
        Ok(r.count("app", "connected") > 0)
    })?;
    let listen = records.at("proxy", "listen")?;
    let app_first = records.at("app", "start")?;
    let rt = cluster.runtime_pod(&uid)?;
    let ran: Vec<u32> = rt
        .named("app")
        .into_iter()
        .filter(|c| c.started.is_some())
        .map(|c| c.attempt)
        .collect();
    check(
        &cluster,
        ran == [attempt] && app_first - listen <= 5.0,
        || {
            format!(
                "want attempt {attempt} (waiting once the probe passed) to start once the proxy \
                 listened; attempts started: {ran:?}, the app's first command {:.1} s after \
                 the proxy listened:\n{records}",
                app_first - listen
            )
        },
    )?;
    eprintln!(
        "through the shim: attempt {attempt} of the app, deferred after its predecessors were killed \
         by the liveness probe, started {:.2} s after the proxy listened",
        app_first - listen
    );
    Ok(())
}

/// Waits until the deleted pod is gone from the API; meanwhile reads
/// containerd (straight) for when `app` and `proxy` finished.
fn watch_deletion(cluster: &Cluster, name: &str, uid: &str) -> Result<BTreeMap<String, f64>> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut finished: BTreeMap<String, f64> = BTreeMap::new();
    let mut last_api = Instant::now() - Duration::from_secs(1);
    loop {
        let rt = cluster.runtime_pod(uid)?;
        for c in &rt.containers {
            if let Some(f) = up(c.finished) {
                finished.insert(c.name.clone(), f);
            }
        }
        if last_api.elapsed() >= Duration::from_millis(500) {
            last_api = Instant::now();
            let out = cluster.kubectl(&[
                "get",
                "pods",
                "--field-selector",
                &format!("metadata.name={name}"),
                "-o",
                "name",
            ])?;
            if out.trim().is_empty() {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(cluster.fail(&format!(
                "{}: pod {name} not gone after deletion",
                label(cluster)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The containers stay in containerd for a while after the pod is gone.
    let rt = cluster.runtime_pod(uid)?;
    for c in &rt.containers {
        if let Some(f) = up(c.finished) {
            finished.insert(c.name.clone(), f);
        }
    }
    Ok(finished)
}

// ---------------------------------------------------------------------------
// Pods without annotations

/// What a user sees of a pod: phase, and per container (init containers
/// first) its state, exit code, reason, last exit, restart count and
/// readiness.
fn summary(pod: &Value) -> Value {
    let containers = |key: &str| -> Vec<Value> {
        pod["status"][key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let state = c["state"]
                    .as_object()
                    .and_then(|o| o.keys().next().cloned());
                json!({
                    "name": c["name"],
                    "state": state,
                    "exitCode": c["state"]["terminated"]["exitCode"],
                    "reason": c["state"]["terminated"]["reason"],
                    "lastExitCode": c["lastState"]["terminated"]["exitCode"],
                    "restartCount": c["restartCount"],
                    "ready": c["ready"],
                })
            })
            .collect()
    };
    json!({
        "phase": pod["status"]["phase"],
        "init": containers("initContainerStatuses"),
        "containers": containers("containerStatuses"),
    })
}

/// Every pod's summary and every Job's true conditions, by name.
fn plain_view(cluster: &Cluster) -> Result<BTreeMap<String, Value>> {
    let mut view = BTreeMap::new();
    let pods = cluster.kubectl_json(&["get", "pods"])?;
    for pod in pods["items"].as_array().into_iter().flatten() {
        // Job pods' names end in a random suffix: name them by their Job.
        let name = match pod["metadata"]["labels"]["job-name"].as_str() {
            Some(job) => format!("pod of job {job}"),
            None => pod_name(pod).to_owned(),
        };
        if !name.starts_with("plain-") && !name.starts_with("pod of job plain-") {
            continue;
        }
        view.insert(name, summary(pod));
    }
    let jobs = cluster.kubectl_json(&["get", "jobs"])?;
    for job in jobs["items"].as_array().into_iter().flatten() {
        let mut conditions: Vec<&str> = job["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["status"] == "True")
            .filter_map(|c| c["type"].as_str())
            .collect();
        conditions.sort();
        view.insert(
            format!("job {}", job["metadata"]["name"].as_str().unwrap_or("?")),
            json!(conditions),
        );
    }
    Ok(view)
}

/// Settled: no container waiting and nothing changed for `STABLE`.
fn settled(view: &BTreeMap<String, Value>) -> bool {
    view.values().all(|v| {
        let waiting = |key: &str| {
            v[key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["state"] == "waiting" || c["state"].is_null())
        };
        v.get("phase").is_none()
            || (v["phase"] != "Pending" && !waiting("containers") && !waiting("init"))
    })
}

/// Pods without annotations (`plain.yaml`: exits 0 and 3 under Never, a
/// failure retried under OnFailure, a restart under Always, init
/// containers, exec hooks and probes, two Jobs) end the same through the
/// shim as straight at containerd.
#[test]
fn plain_pods_behave_as_without_the_shim() -> Result<()> {
    const STABLE: Duration = Duration::from_secs(5);
    let (shim, direct) = Cluster::up_pair()?;
    // An annotated pod beside them (left out of the comparison), so that the
    // shim intercepts the calls it claims only while it manages a pod.
    for cluster in [&shim, &direct] {
        cluster.apply_file(&manifest("sidecar-first.yaml"))?;
        cluster.apply_file(&manifest("plain.yaml"))?;
    }
    let expected = manifest_text("plain.yaml")?.matches("\nkind: ").count();
    // Both settled and alike, each unchanged for STABLE; a difference that
    // lasts is reported with both views.
    let mut last: Option<(BTreeMap<String, Value>, BTreeMap<String, Value>)> = None;
    let mut since = Instant::now();
    let result = shim.wait_for(
        Duration::from_secs(180),
        "plain pods settled and alike",
        || {
            let views = (plain_view(&shim)?, plain_view(&direct)?);
            if last.as_ref() != Some(&views) {
                last = Some(views.clone());
                since = Instant::now();
                return Ok(None);
            }
            let (s, d) = &views;
            let complete = s.len() == d.len() && s.len() >= expected + 2;
            Ok(
                (complete && settled(s) && settled(d) && s == d && since.elapsed() >= STABLE)
                    .then_some(views),
            )
        },
    );
    let (views, err) = match result {
        Ok(v) => (v, None),
        Err(e) => (last.clone().unwrap_or_default(), Some(e)),
    };
    let (s, d) = &views;
    let mut table = String::new();
    for name in s
        .keys()
        .chain(d.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (a, b) = (s.get(name), d.get(name));
        let show = |v: Option<&Value>| v.map_or("-".into(), |v| v.to_string());
        if a == b {
            table.push_str(&format!("same {name}: {}\n", show(a)));
        } else {
            table.push_str(&format!(
                "DIFF {name}\n    shim:   {}\n    direct: {}\n",
                show(a),
                show(b)
            ));
        }
    }
    if let Some(e) = err {
        return Err(e.context(format!("the last views:\n{table}")));
    }
    eprintln!("plain pods, through the shim and without it:\n{table}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Native sidecars

/// A native sidecar (init container, `restartPolicy: Always`) next to an
/// annotated sidecar, on kubelet v1.28.7, which does not mark init
/// containers over the CRI (`native-mixed.yaml`). Without a startupProbe
/// kubelet counts the native sidecar as started and goes on: the shim,
/// taking it for an app listed before `mesh`, starts it once `mesh` is
/// ready. With one, kubelet waits for it and creates nothing else, and the
/// shim starts it as an init container, 1 s late, before `mesh` is even
/// created. Either way the app reaches both sidecars on its first try,
/// nothing restarts or is created twice, and a deletion stops `mesh` only
/// after the app exited, within the grace period.
#[test]
fn native_sidecar_next_to_an_annotated_one() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    cluster.apply_file(&manifest("native-mixed.yaml"))?;
    let mut uids = Vec::new();
    for name in ["native-plain", "native-probed"] {
        let (pod, records) = wait_pod(&cluster, name, "the app reached its sidecars", |pod, r| {
            // Only a startupProbe makes kubelet wait for the native
            // sidecar to serve (with the shim or without it).
            let native_refused = match name {
                "native-probed" => r.count("app", "native-refused"),
                _ => 0,
            };
            if r.count("app", "refused") + native_refused > 0 {
                return Err(cluster.fail(&format!("pod {name}: the app was refused:\n{r}")));
            }
            let tried = r.count("app", "native-ok") + r.count("app", "native-refused");
            Ok(tried > 0 && container_status(pod, "app").is_some_and(running))
        })?;
        let native = init_container_status(&pod, "native").context("no status for native")?;
        let restarts: Vec<i64> = [
            Some(native),
            container_status(&pod, "mesh"),
            container_status(&pod, "app"),
        ]
        .iter()
        .map(|s| s.map_or(-1, |s| s["restartCount"].as_i64().unwrap_or(-1)))
        .collect();
        check(&cluster, restarts == [0, 0, 0], || {
            format!("pod {name}: restart counts (native, mesh, app) {restarts:?}")
        })?;
        let rt = cluster.runtime_pod(pod_uid(&pod))?;
        for c in ["native", "mesh", "app"] {
            check(&cluster, rt.named(c).len() == 1, || {
                format!(
                    "pod {name}: {} containers named {c} in containerd",
                    rt.named(c).len()
                )
            })?;
        }
        let first = |c: &str| records.at(c, "start");
        let (native_first, mesh_first, app_first) =
            (first("native")?, first("mesh")?, first("app")?);
        let listen = records.at("mesh", "listen")?;
        check(&cluster, app_first >= listen, || {
            format!("pod {name}: the app started before mesh listened:\n{records}")
        })?;
        let native_created = up(rt.one("native")?.created).context("native has no created_at")?;
        if name == "native-probed" {
            check(&cluster, native_first < mesh_first, || {
                format!("pod {name}: the native sidecar did not start before mesh:\n{records}")
            })?;
        } else {
            check(&cluster, native_first >= listen, || {
                format!("pod {name}: the native sidecar started before mesh listened:\n{records}")
            })?;
        }
        eprintln!(
            "through the shim, {name}: native sidecar's first command {:.2} s after containerd \
             created it, mesh listened {:.2} s after that, the app started {:.2} s after mesh listened",
            native_first - native_created,
            listen - native_first,
            app_first - listen
        );
        uids.push(pod_uid(&pod).to_owned());
    }
    for (name, uid) in ["native-plain", "native-probed"].into_iter().zip(&uids) {
        let deleted = uptime_now();
        cluster.kubectl(&["delete", "pod", name, "--wait=false"])?;
        let finished = watch_deletion(&cluster, name, uid)?;
        let gone = uptime_now() - deleted;
        let records = cluster.records(uid);
        let mesh_term = records.at("mesh", "sigterm")?;
        // containerd's finish time is exact, the record truncated to 10 ms.
        let app_finished = finished.get("app").copied().unwrap_or(f64::MAX);
        check(
            &cluster,
            app_finished <= mesh_term + 0.01 && gone <= 5.0,
            || {
                format!(
                "pod {name}: gone {gone:.1} s after its deletion (grace 5 s); want mesh's SIGTERM \
                 after the app finished ({app_finished:.3}):\n{records}"
            )
            },
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Init containers

/// Init containers run first, in order, once each, and the app still
/// reaches its sidecar first time; how much later each step starts than
/// without the shim is printed (the shim's 1 s init-container window:
/// kubelet 1.28 does not mark init containers in the CRI).
#[test]
fn init_containers_run_first_and_in_order() -> Result<()> {
    let (shim, direct) = Cluster::up_pair()?;
    for cluster in [&shim, &direct] {
        cluster.apply_file(&manifest("init-containers.yaml"))?;
    }
    let mut steps = Vec::new();
    for cluster in [&shim, &direct] {
        let (pod, records) = wait_pod(cluster, "init-order", "the app started", |pod, r| {
            Ok(r.count("app", "start") > 0 && container_status(pod, "app").is_some_and(running))
        })?;
        let order = [
            ("init-a", "start"),
            ("init-a", "end"),
            ("init-b", "start"),
            ("init-b", "end"),
            ("proxy", "start"),
            ("proxy", "listen"),
            ("app", "start"),
        ];
        let mut times = Vec::new();
        for (c, e) in order {
            check(cluster, records.count(c, e) == 1, || {
                format!(
                    "{c} recorded {e} {} times (want once):\n{records}",
                    records.count(c, e)
                )
            })?;
            times.push(records.first(c, e).unwrap_or(0.0));
        }
        check(cluster, times.windows(2).all(|w| w[0] <= w[1]), || {
            format!("not in order init-a, init-b, proxy, app:\n{records}")
        })?;
        for c in ["init-a", "init-b"] {
            let s = init_container_status(&pod, c)
                .ok_or_else(|| cluster.fail(&format!("no status for init container {c}")))?;
            check(
                cluster,
                exit_code(s) == Some(0) && s["restartCount"] == 0,
                || {
                    format!(
                        "init container {c}: {} restartCount {}",
                        s["state"], s["restartCount"]
                    )
                },
            )?;
        }
        let rt = cluster.runtime_pod(pod_uid(&pod))?;
        let sandbox = up(rt.sandbox_created).context("containerd: no sandbox created_at")?;
        if cluster.mode() == Mode::Shim {
            check(
                cluster,
                records.events("app") == ["start", "connected"],
                || format!("the app did not connect on its first try:\n{records}"),
            )?;
            for c in ["init-a", "init-b", "proxy", "app"] {
                rt.one(c)?;
            }
        }
        steps.push([
            times[0] - sandbox,
            times[2] - times[1],
            times[4] - times[3],
            times[6] - times[5],
        ]);
        let annotations = cluster.runtime_annotations(&rt.one("init-a")?.id)?;
        eprintln!(
            "{}: kubelet's CRI annotations of init-a: {:?}",
            label(cluster),
            annotations.keys().collect::<Vec<_>>()
        );
    }
    let names = [
        "sandbox created -> init-a's first command",
        "init-a's end -> init-b's first command",
        "init-b's end -> proxy's first command",
        "proxy listening -> app's first command",
    ];
    let mut table = String::from("step | without the shim | through the shim | later by\n");
    for (i, name) in names.iter().enumerate() {
        table.push_str(&format!(
            "{name} | {:.2} s | {:.2} s | {:+.2} s\n",
            steps[1][i],
            steps[0][i],
            steps[0][i] - steps[1][i]
        ));
    }
    eprintln!("init containers, measured from the containers' records and containerd:\n{table}");
    // The shim's cost per init container is its 1 s init window plus the
    // time kubelet takes to see the container exit (PLEG relists every 1 s).
    // Beyond 1 + 1 s and as much again for a loaded machine it has changed.
    for i in 0..2 {
        check(&shim, steps[0][i] - steps[1][i] <= 4.0, || {
            format!(
                "{} is {:.2} s later than without the shim:\n{table}",
                names[i],
                steps[0][i] - steps[1][i]
            )
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Restarts of the shim, kubelet and containerd

/// Container name -> (API containerID, restartCount).
type ApiContainers = BTreeMap<String, (String, i64)>;

/// The pods of a restart test and what they are before the restart.
struct Before {
    /// Pod name -> (uid, its containers).
    pods: BTreeMap<String, (String, ApiContainers)>,
    /// Pod name -> containerd's container ids.
    runtime: BTreeMap<String, Vec<String>>,
}

const RESTART_PODS: [&str; 4] = ["sidecar-first", "app-first", "deferred-app", "plain-hooks"];

/// Starts the restart tests' pods and waits until the two annotated ones run
/// with their apps connected, `plain-hooks` runs, and `deferred-app`'s app
/// reads as running to kubelet while containerd has it created only.
fn restart_setup(cluster: &Cluster) -> Result<Before> {
    cluster.apply_file(&manifest("sidecar-first.yaml"))?;
    cluster.apply_file(&manifest("app-first.yaml"))?;
    cluster.apply_file(&manifest("deferred-app.yaml"))?;
    cluster.apply(&manifest_doc(&manifest_text("plain.yaml")?, "plain-hooks")?)?;
    for name in ["sidecar-first", "app-first"] {
        wait_pod(cluster, name, "app connected and running", |pod, r| {
            Ok(
                r.count("app", "connected") > 0
                    && container_status(pod, "app").is_some_and(running),
            )
        })?;
    }
    wait_pod(cluster, "plain-hooks", "running and ready", |pod, _| {
        Ok(["a", "b"]
            .iter()
            .all(|c| container_status(pod, c).is_some_and(|s| s["ready"] == true)))
    })?;
    let (pod, _) = wait_pod(cluster, "deferred-app", "app deferred", |pod, r| {
        let uid = pod_uid(pod);
        let api_running = ["app", "proxy"]
            .iter()
            .all(|c| container_status(pod, c).is_some_and(running));
        if !api_running || r.count("proxy", "start") == 0 {
            return Ok(false);
        }
        let rt = cluster.runtime_pod(uid)?;
        let app = rt.one("app")?;
        Ok(app.state == "CREATED" && rt.one("proxy")?.state == "RUNNING")
    })?;
    ensure!(
        cluster.records(pod_uid(&pod)).of("app").is_empty(),
        "the deferred app ran"
    );
    snapshot(cluster)
}

fn snapshot(cluster: &Cluster) -> Result<Before> {
    let mut before = Before {
        pods: BTreeMap::new(),
        runtime: BTreeMap::new(),
    };
    for name in RESTART_PODS {
        let pod = cluster.pod(name)?;
        let uid = pod_uid(&pod).to_owned();
        let mut containers = BTreeMap::new();
        for c in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            containers.insert(
                c["name"].as_str().unwrap_or("?").to_owned(),
                (
                    c["containerID"].as_str().unwrap_or("").to_owned(),
                    c["restartCount"].as_i64().unwrap_or(-1),
                ),
            );
        }
        let mut ids: Vec<String> = cluster
            .runtime_pod(&uid)?
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        before.runtime.insert(name.to_owned(), ids);
        before.pods.insert(name.to_owned(), (uid, containers));
    }
    Ok(before)
}

/// Lets `deferred-app`'s proxy get ready.
fn let_deferred_proxy_get_ready(cluster: &Cluster) -> Result<()> {
    touch_in(cluster, "deferred-app", "proxy", "/tmp/go")
}

/// Creates `file` in a container of a pod (`kubectl exec ... touch`: through
/// kubelet and the runtime, retried until both serve).
fn touch_in(cluster: &Cluster, pod: &str, container: &str, file: &str) -> Result<()> {
    cluster.wait_for(
        START_TIMEOUT,
        &format!("kubectl exec into {pod}'s {container}"),
        || {
            Ok(cluster
                .kubectl(&["exec", pod, "-c", container, "--", "touch", file])
                .ok())
        },
    )?;
    Ok(())
}

/// After the restart: the deferred app starts once its proxy is let get
/// ready and reaches it first time; a pod created after the restart runs
/// (kubelet syncs pods again); and every pod has the same containers as
/// before, in the API and in containerd, none restarted, each started once
/// by its own records.
fn restart_check(cluster: &Cluster, before: &Before, what: &str) -> Result<()> {
    // Let the deferred app's proxy get ready (kubectl exec: through kubelet
    // and the runtime, both of which must be back).
    let_deferred_proxy_get_ready(cluster)?;
    wait_pod(cluster, "deferred-app", "the app connected", |_, r| {
        if r.count("app", "refused") > 0 {
            return Err(cluster.fail(&format!(
                "after {what}: the deferred app's connection was refused:\n{r}"
            )));
        }
        Ok(r.count("app", "connected") > 0)
    })?;
    let canary = manifest_doc(&manifest_text("plain.yaml")?, "plain-hooks")?
        .replace("name: plain-hooks", "name: canary");
    cluster.apply(&canary)?;
    wait_pod(
        cluster,
        "canary",
        "running (kubelet syncs pods)",
        |pod, _| {
            Ok(["a", "b"]
                .iter()
                .all(|c| container_status(pod, c).is_some_and(running)))
        },
    )?;
    let after = snapshot(cluster)?;
    let mut wrong = Vec::new();
    for name in RESTART_PODS {
        let (uid, was) = &before.pods[name];
        let (_, is) = &after.pods[name];
        if was != is {
            wrong.push(format!("{name}: API containers were {was:?}, are {is:?}"));
        }
        if before.runtime[name] != after.runtime[name] {
            wrong.push(format!(
                "{name}: containerd's containers were {:?}, are {:?}",
                before.runtime[name], after.runtime[name]
            ));
        }
        if is.values().any(|(_, n)| *n != 0) {
            wrong.push(format!("{name}: restarted: {is:?}"));
        }
        let pod = cluster.pod(name)?;
        for c in is.keys() {
            if !container_status(&pod, c).is_some_and(running) {
                wrong.push(format!("{name}/{c} not running"));
            }
        }
        let records = cluster.records(uid);
        for c in records.containers.keys() {
            if records.count(c, "start") != 1 {
                wrong.push(format!(
                    "{name}/{c} started {} times:\n{records}",
                    records.count(c, "start")
                ));
            }
        }
    }
    if !wrong.is_empty() {
        return Err(cluster.fail(&format!("after {what}:\n{}", wrong.join("\n"))));
    }
    eprintln!(
        "after {what}: {} pods, the same {} containers in the API and in containerd, none \
         restarted; the deferred app started and reached its proxy first time",
        RESTART_PODS.len(),
        after.runtime.values().map(Vec::len).sum::<usize>()
    );
    Ok(())
}

/// The shim killed with SIGKILL while an app's start is deferred, and
/// started again: the new shim keeps the promise (the app reads as running,
/// starts once its sidecar is ready), and nothing is created again.
#[test]
fn shim_killed_while_an_app_start_is_deferred() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    let before = restart_setup(&cluster)?;
    let took = cluster.restart("sidecar-shim", "KILL")?;
    eprintln!("sidecar-shim killed (SIGKILL) and serving again in {took:.1?}");
    restart_check(&cluster, &before, "the shim's SIGKILL and restart")
}

/// kubelet killed and started again while pods run (one app deferred):
/// kubelet reads every container as before and re-creates none.
#[test]
fn kubelet_restarted_while_pods_run() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    let before = restart_setup(&cluster)?;
    let took = cluster.restart("kubelet", "KILL")?;
    eprintln!("kubelet killed (SIGKILL) and serving again in {took:.1?}");
    restart_check(&cluster, &before, "kubelet's SIGKILL and restart")
}

/// containerd killed and started again while pods run (one app deferred):
/// containers run on, the shim starts the deferred app on the new
/// containerd, and nothing is created again.
#[test]
fn containerd_restarted_while_pods_run() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    let before = restart_setup(&cluster)?;
    let took = cluster.restart("containerd", "KILL")?;
    eprintln!("containerd killed (SIGKILL) and serving again in {took:.1?}");
    restart_check(&cluster, &before, "containerd's SIGKILL and restart")
}

/// kubelet with the `EventedPLEG` gate (alpha in 1.28) on containerd 2.3:
/// it takes container statuses from `GetContainerEvents` instead of asking
/// ContainerStatus, so the events the shim hands it must carry the same
/// rewrites as its status answers. A deferred app must read as running in
/// them: containerd's own events say CREATED for as long as the start is
/// deferred, and kubelet re-creates a container it sees created (the
/// duplicate the shim exists to prevent).
///
/// kubelet 1.28's evented PLEG also re-creates containers on its own, in
/// pods without any annotation and without the shim (kubernetes#121349,
/// fixed after 1.28): a container it reads as created between its create
/// and start calls is started again. That is counted, side by side with a
/// cluster whose kubelet talks to containerd directly, not asserted.
#[test]
fn evented_pleg_kubelet_keeps_a_deferred_app() -> Result<()> {
    let args = [
        "--runtime",
        "2.3",
        "--kubelet-feature-gates",
        "EventedPLEG=true",
    ];
    let direct = std::thread::spawn(move || Cluster::up_with(Mode::Direct, &args));
    let shim = Cluster::up_with(Mode::Shim, &args)?;
    let direct = direct
        .join()
        .map_err(|_| anyhow::anyhow!("bringing up the direct cluster panicked"))??;
    let plain = manifest_doc(&manifest_text("plain.yaml")?, "plain-hooks")?;
    for cluster in [&shim, &direct] {
        cluster.apply(&plain)?;
    }
    shim.apply_file(&manifest("deferred-app.yaml"))?;
    // Deferred: kubelet reads both containers as running (from the events
    // the shim hands it), containerd has the app created only.
    let (pod, _) = wait_pod(&shim, "deferred-app", "app deferred", |pod, r| {
        let api_running = ["app", "proxy"]
            .iter()
            .all(|c| container_status(pod, c).is_some_and(running));
        if !api_running || r.count("proxy", "start") == 0 {
            return Ok(false);
        }
        // kubelet's own evented-PLEG race may create the proxy more than
        // once (see above): the app is what this test is about.
        let rt = shim.runtime_pod(pod_uid(pod))?;
        Ok(rt.one("app")?.state == "CREATED"
            && rt.named("proxy").iter().any(|p| p.state == "RUNNING"))
    })?;
    let uid = pod_uid(&pod).to_owned();
    let app_id = shim.runtime_pod(&uid)?.one("app")?.id.clone();
    // Hold the deferral while kubelet goes on receiving events (the other
    // pods' starts and its own resyncs), then let the proxy get ready.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(5) {
        let rt = shim.runtime_pod(&uid)?;
        let apps = rt.named("app");
        check(&shim, apps.len() == 1 && apps[0].id == app_id, || {
            format!("while deferred, containerd's app containers: {apps:?}")
        })?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let_deferred_proxy_get_ready(&shim)?;
    let (pod, records) = wait_pod(&shim, "deferred-app", "the app connected", |_, r| {
        Ok(r.count("app", "connected") > 0)
    })?;
    let rt = shim.runtime_pod(&uid)?;
    let app = rt.one("app")?;
    check(&shim, app.id == app_id && app.state == "RUNNING", || {
        format!("the deferred app was {app_id}, containerd now has {app:?}")
    })?;
    let status = status_of(&shim, &pod, "app")?;
    check(
        &shim,
        status["restartCount"] == 0 && running(status),
        || format!("the deferred app in the API: {status}"),
    )?;
    check(
        &shim,
        records.events("app") == ["start", "connected"],
        || format!("the deferred app's records:\n{records}"),
    )?;
    // The same gate's own re-creations: in a plain pod (two containers that
    // run on), with and without the shim, and of the deferred app's proxy.
    let proxies = shim.runtime_pod(&uid)?.named("proxy").len();
    let mut recreated = Vec::new();
    for cluster in [&shim, &direct] {
        let pod = cluster.pod("plain-hooks")?;
        let n = pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["restartCount"].as_i64().unwrap_or(0))
            .sum::<i64>();
        recreated.push(n);
    }
    eprintln!(
        "EventedPLEG on containerd 2.3: the deferred app was held 5 s and started once, same \
         container, restartCount 0; restarts in plain-hooks (kubelet's own evented-PLEG \
         race): {} through the shim, {} directly; deferred-app's proxy containers: {proxies}",
        recreated[0], recreated[1]
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// A Deployment

/// A 10-replica Deployment through the shim rolled out to a new version and
/// rolled back: every pod's app reached its sidecar first time, none
/// restarted, every pod the rollouts deleted stopped its proxy after its
/// app, and the Deployment ends on its first template, 10 replicas ready.
#[test]
fn deployment_rolls_out_and_back() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    let rollout = |what: &str| -> Result<Duration> {
        let started = Instant::now();
        cluster
            .kubectl(&["rollout", "status", "deployment/web", "--timeout=300s"])
            .map_err(|e| cluster.fail(&format!("{what}: {e:#}")))?;
        Ok(started.elapsed())
    };
    cluster.apply_file(&manifest("deployment.yaml"))?;
    let first = rollout("the first rollout")?;
    let hash = |cluster: &Cluster| -> Result<Vec<String>> {
        let mut hashes: Vec<String> = cluster
            .pods("app=web")?
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                p["metadata"]["labels"]["pod-template-hash"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect();
        hashes.dedup();
        Ok(hashes)
    };
    let v1 = hash(&cluster)?;
    cluster.kubectl(&["set", "env", "deployment/web", "-c", "app", "VERSION=2"])?;
    let second = rollout("the rollout to VERSION=2")?;
    cluster.kubectl(&["rollout", "undo", "deployment/web"])?;
    let third = rollout("the rollback")?;
    // The replaced pods are gone (their records complete) once only the
    // Deployment's 10 are left.
    let pods = cluster.wait_for(START_TIMEOUT, "only 10 pods left, all running", || {
        let pods = cluster.pods("app=web")?;
        let all_running = pods.iter().all(|p| {
            ["app", "proxy"]
                .iter()
                .all(|c| container_status(p, c).is_some_and(running))
        });
        Ok((pods.len() == 10 && all_running).then_some(pods))
    })?;
    let deploy = cluster.kubectl_json(&["get", "deployment", "web"])?;
    let st = &deploy["status"];
    check(
        &cluster,
        [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        ]
        .iter()
        .all(|k| st[k] == 10),
        || format!("Deployment status {st}"),
    )?;
    check(&cluster, hash(&cluster)? == v1, || {
        format!("after the rollback the pods' template hash is not the first one ({v1:?})")
    })?;
    for pod in &pods {
        for c in ["app", "proxy"] {
            let s = status_of(&cluster, pod, c)?;
            check(&cluster, s["restartCount"] == 0, || {
                format!("{}/{c} restartCount {}", pod_name(pod), s["restartCount"])
            })?;
        }
    }
    // Every pod ever made, from its records.
    let all = cluster.all_records();
    let mut wrong = Vec::new();
    let (mut v1_pods, mut v2_pods, mut stopped) = (0, 0, 0);
    for (uid, r) in &all {
        if r.of("app").is_empty() {
            continue;
        }
        if r.events("app").get(..2) != Some(&["start", "connected"][..])
            || r.count("app", "start") != 1
        {
            wrong.push(format!(
                "pod {uid}: the app did not start once and connect first time:\n{r}"
            ));
        }
        match r.of("app")[0].detail.as_str() {
            "1" => v1_pods += 1,
            "2" => v2_pods += 1,
            other => wrong.push(format!("pod {uid}: VERSION {other:?}")),
        }
        if let Some(exit) = r.first("app", "exit") {
            stopped += 1;
            if !r.first("proxy", "sigterm").is_some_and(|t| t >= exit) {
                wrong.push(format!(
                    "pod {uid}: the proxy did not get SIGTERM after the app exited:\n{r}"
                ));
            }
        }
    }
    if !wrong.is_empty() {
        return Err(cluster.fail(&wrong.join("\n")));
    }
    check(
        &cluster,
        v1_pods >= 20 && v2_pods >= 10 && stopped >= 20,
        || {
            format!("{v1_pods} pods of VERSION 1, {v2_pods} of VERSION 2, {stopped} stopped (want at least 20, 10, 20)")
        },
    )?;
    eprintln!(
        "deployment web: rollout {first:.1?}, to VERSION=2 {second:.1?}, rollback {third:.1?}; \
         {} pods ({v1_pods} of VERSION 1, {v2_pods} of VERSION 2), every app connected first \
         time, none restarted, {stopped} stopped with the proxy after the app",
        v1_pods + v2_pods
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Many pods (issue 9)

/// How many pods of each kind `many_pods_without_failed_cri_calls` starts
/// (default 20; the issue-9 proof used 50, see the README).
const LOAD_ENV: &str = "SIDECAR_SHIM_E2E_LOAD";

/// `load.yaml`'s two Deployments (annotated and plain pods, 20 replicas each
/// unless `SIDECAR_SHIM_E2E_LOAD` says otherwise) and ten copies of the demo
/// Job started and deleted through the shim and, side by side, with kubelet
/// straight at containerd: every Deployment pod runs with no restart, and
/// through the shim every Job completes with no restart and exit code 0
/// for both containers; through the shim kubelet's log has no GOAWAY
/// `too_many_pings` and no kind of failed CRI call that the direct run does
/// not have too (issue 9).
///
/// With the frame relay (before issue 9's per-hop HTTP/2 endpoints) ten
/// demo Jobs alone failed every time: kubelet's CRI connection through the
/// shim got GOAWAY ENHANCE_YOUR_CALM "too_many_pings" from containerd, held
/// StartContainer calls on it failed with UNAVAILABLE (exit 128,
/// StartError) and apps were restarted (19 failed starts and 155 GOAWAYs
/// for 10 Jobs, one Job Failed); straight at containerd there was no GOAWAY
/// and no failed start.
#[test]
fn many_pods_without_failed_cri_calls() -> Result<()> {
    let per_kind: usize = match std::env::var(LOAD_ENV) {
        Ok(v) => v.parse().with_context(|| format!("{LOAD_ENV}={v}"))?,
        Err(_) => 20,
    };
    let yaml = manifest_text("load.yaml")?;
    ensure!(
        yaml.matches("  replicas: 50\n").count() == 2,
        "load.yaml: want two `replicas: 50`"
    );
    let yaml = yaml.replace("  replicas: 50\n", &format!("  replicas: {per_kind}\n"));
    let total = 2 * per_kind;
    const JOBS: usize = 10;
    let demo = manifest_text("sidecar-demo.yaml")?;
    let one = "  name: sidecar-demo\n";
    ensure!(
        demo.contains(one),
        "sidecar-demo.yaml has no `{}`",
        one.trim_end()
    );
    let jobs: String = (1..=JOBS)
        .map(|i| {
            format!(
                "---\n{}",
                demo.replace(one, &format!("  name: sidecar-demo-{i}\n"))
            )
        })
        .collect();
    let (shim, direct) = Cluster::up_pair()?;
    let started = Instant::now();
    for cluster in [&shim, &direct] {
        cluster.apply(&yaml)?;
        cluster.apply(&jobs)?;
    }
    let mut took = Vec::new();
    let mut direct_restarts = 0;
    for cluster in [&shim, &direct] {
        cluster.wait_for(
            Duration::from_secs(300),
            &format!("{total} pods running"),
            || {
                let pods = cluster.pods("app in (load-annotated, load-plain)")?;
                let restarted: Vec<String> = pods
                    .iter()
                    .flat_map(|p| {
                        p["status"]["containerStatuses"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|c| c["restartCount"] != 0)
                            .map(move |c| {
                                format!("{}/{}: {}", pod_name(p), c["name"], c["lastState"])
                            })
                    })
                    .collect();
                // Without the shim an annotated app may start before its
                // proxy listens and be restarted: that is the problem the
                // shim solves, counted, not an error.
                if cluster.mode() == Mode::Shim && !restarted.is_empty() {
                    return Err(cluster.fail(&format!(
                        "{}: restarted:\n{}",
                        label(cluster),
                        restarted.join("\n")
                    )));
                }
                let running = pods
                    .iter()
                    .filter(|p| {
                        ["app", "proxy"]
                            .iter()
                            .all(|c| container_status(p, c).is_some_and(running))
                    })
                    .count();
                direct_restarts = restarted.len();
                Ok((running == total).then_some(()))
            },
        )?;
        took.push(started.elapsed());
    }
    shim.wait_for(START_TIMEOUT, "all ten Jobs Complete", || {
        let jobs = shim.kubectl_json(&["get", "jobs"])?;
        let jobs = jobs["items"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = jobs.iter().find(|j| condition_true(j, "Failed")) {
            return Err(shim.fail(&format!(
                "Job {} Failed: {}",
                failed["metadata"]["name"], failed["status"]["conditions"]
            )));
        }
        let complete = jobs
            .iter()
            .filter(|j| condition_true(j, "Complete"))
            .count();
        Ok((jobs.len() == JOBS && complete == JOBS).then_some(()))
    })?;
    let mut wrong = Vec::new();
    for pod in shim.pods("job-name")? {
        for c in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if c["restartCount"] != 0 || exit_code(c) != Some(0) {
                wrong.push(format!(
                    "{}/{}: restartCount {}, {}",
                    pod_name(&pod),
                    c["name"],
                    c["restartCount"],
                    c["state"]
                ));
            }
        }
    }
    check(&shim, wrong.is_empty(), || {
        format!(
            "Job containers restarted or not at exit 0:\n{}",
            wrong.join("\n")
        )
    })?;
    let deleting = Instant::now();
    for cluster in [&shim, &direct] {
        cluster.kubectl(&["delete", "deployments,jobs", "--all", "--wait=false"])?;
    }
    for cluster in [&shim, &direct] {
        cluster.wait_for(Duration::from_secs(300), "every pod gone", || {
            Ok(cluster
                .kubectl(&["get", "pods", "-o", "name"])?
                .trim()
                .is_empty()
                .then_some(()))
        })?;
    }
    let deleted = deleting.elapsed();
    let (s, d) = (shim.kubelet_cri_errors(), direct.kubelet_cri_errors());
    let show = |m: &BTreeMap<String, usize>| -> String {
        if m.is_empty() {
            return "  none\n".into();
        }
        m.iter().map(|(k, n)| format!("  {n:5} {k}\n")).collect()
    };
    // kubelet removes a deleted pod's exited containers from two places
    // (its pod container deletor, on each ContainerDied, and its container
    // GC, every minute); when both pick the same container at once,
    // containerd fails one of the two calls ("already in removing state",
    // or "not found" when the other finished first). Timing decides which
    // cluster hits it (about one container in a few hundred, seen through
    // the shim in 2 of 4 CI runs), so it is no difference the shim makes.
    // What the shim could do wrong, sending a removal again, shows in
    // containerd's own log: every container is sent RemoveContainer as
    // often through the shim as without it (once, or twice in that race).
    let removal_race = |k: &String| {
        k.contains("\"RemoveContainer from runtime service failed\"")
            && (k.contains("in removing state") || k.contains("not found"))
    };
    // containerd's StopContainer sends SIGKILL when the stop's timeout runs
    // out; a container that exits at that very moment takes its task's
    // shim with it, and the kill fails "ttrpc: closed". kubelet's timeouts
    // through the shim are shorter for sidecars (what is left of the grace
    // period when their turn comes, see the README), so under this load a
    // slow exit meets the SIGKILL there more often. It is that race when
    // containerd's own log shows the task gone within a second of the kill;
    // any other such failure counts against the shim.
    let kills = shim.kill_races();
    let kill_race = |k: &String| {
        k.contains("\"StopContainer from runtime service failed\"")
            && k.contains("failed to kill container")
            && k.contains("ttrpc: closed")
            && kills.iter().all(|(_, raced)| *raced)
    };
    // kubelet reads a container it has just removed once or twice more and
    // hears NotFound, with or without the shim (a Job that completes, only
    // through the shim here, gets its containers removed while kubelet
    // still reads them). It is that when every such container was removed
    // by kubelet and read at most 3 times.
    let reads = shim.reads_after_removal();
    let read_race = |k: &String| {
        k.contains("\"ContainerStatus from runtime service failed\"")
            && k.contains("code = NotFound")
            && reads.iter().all(|(_, n, removed)| *removed && *n <= 3)
    };
    let only_shim: Vec<&String> = s
        .keys()
        .filter(|k| !d.contains_key(*k) && !removal_race(k) && !kill_race(k) && !read_race(k))
        .collect();
    let removals = (shim.runtime_removals(), direct.runtime_removals());
    let raced = s
        .iter()
        .filter(|(k, _)| removal_race(k))
        .map(|(_, n)| n)
        .sum::<usize>();
    let resent = removals.0.keys().any(|&calls| calls > 2);
    let resends = fs::read_to_string(shim.log_path("sidecar-shim"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("sending the call again"))
        .count();
    let pings = (shim.too_many_pings(), direct.too_many_pings());
    let report = format!(
        "{total} pods ({per_kind} annotated, {per_kind} plain) and {JOBS} demo Jobs: the \
         {total} running through the shim after {:.1?} with no restart, without it after \
         {:.1?} with {direct_restarts} containers restarted (started side by side); the Jobs \
         Complete through the shim; all deleted {deleted:.1?} later\n\
         GOAWAY too_many_pings in kubelet's log: through the shim {}, without {}\n\
         failed CRI calls in kubelet's log through the shim:\n{}without the shim:\n{}\
         RemoveContainer calls per container in containerd's log (calls: containers): \
         through the shim {:?}, without {:?}; kubelet's removal race failed {raced} of them \
         through the shim; the shim's log has {resends} calls sent again\n\
         StopContainer failing on a SIGKILL that met the container's exit (containerd's log): \
         {kills:?}\n\
         NotFound reads of containers: {} containers, read at most {} times each, {} of them \
         not removed by kubelet\n",
        took[0],
        took[1],
        pings.0,
        pings.1,
        show(&s),
        show(&d),
        removals.0,
        removals.1,
        reads.len(),
        reads.iter().map(|(_, n, _)| *n).max().unwrap_or(0),
        reads.iter().filter(|(_, _, removed)| !removed).count(),
    );
    if pings.0 > 0 || !only_shim.is_empty() || resent || (raced > 0 && resends > 0) {
        return Err(shim.fail(&format!("{report}only through the shim: {only_shim:?}")));
    }
    eprintln!("{report}");
    Ok(())
}

/// A failed StopContainer is a kill race only when containerd's log shows
/// the task gone within a second of its SIGKILL.
#[test]
fn reads_after_removal_are_told_from_containerds_log() {
    let line = |id: &str, code: &str| {
        format!(
            "E1206 09:55:47.720934 2246 remote_runtime.go:432] \"ContainerStatus from runtime \
             service failed\" err=\"rpc error: code = {code} desc = x\" containerID=\"{id}\"\n"
        )
    };
    let kubelet = [
        line("aaa", "NotFound"),
        line("bbb", "NotFound"),
        line("ccc", "Unknown"),
    ]
    .concat();
    let containerd = [
        "time=\"2026-12-06T09:55:19.625645474Z\" level=info msg=\"RemoveContainer for \\\"aaa\\\"\"\n",
        "time=\"2026-12-06T09:55:19.636010230Z\" level=info msg=\"RemoveContainer for \\\"aaa\\\" returns successfully\"\n",
        "time=\"2026-12-06T09:55:19.625645474Z\" level=info msg=\"RemoveContainer for \\\"bbb\\\"\"\n",
    ]
    .concat();
    assert_eq!(
        support::cluster::reads_after_removal(&kubelet, &containerd),
        vec![("aaa".to_string(), 1, true), ("bbb".to_string(), 1, false)]
    );
}

#[test]
fn kill_races_are_told_from_containerds_log() {
    let kubelet = r#"E1206 06:39:27.000000   123 remote_runtime.go:366] "StopContainer from runtime service failed" err="rpc error: code = Unknown desc = failed to kill container \"aaa\": ttrpc: closed: unknown" containerID="aaa"
E1206 06:39:28.000000   123 remote_runtime.go:366] "StopContainer from runtime service failed" err="rpc error: code = Unknown desc = failed to kill container \"bbb\": ttrpc: closed: unknown" containerID="bbb"
"#;
    let containerd = r#"time="2026-12-06T06:39:26.500000000Z" level=info msg="Kill container \"aaa\""
time="2026-12-06T06:39:26.900000000Z" level=info msg="shim disconnected" id=aaa
time="2026-12-06T06:39:20.000000000Z" level=info msg="Kill container \"bbb\""
time="2026-12-06T06:39:27.900000000Z" level=info msg="shim disconnected" id=bbb
"#;
    assert_eq!(
        support::cluster::kill_races(kubelet, containerd),
        vec![("aaa".to_string(), true), ("bbb".to_string(), false)]
    );
}

/// The count of RemoveContainer calls in containerd's log takes the
/// requests, not their outcomes.
#[test]
fn containerd_log_removals_are_counted_per_request() {
    let log = r#"time="2026-12-06T02:24:08.113118104Z" level=info msg="RemoveContainer for \"f39c\""
time="2026-12-06T02:24:08.392330037Z" level=info msg="RemoveContainer for \"f39c\" returns successfully"
time="2026-12-06T02:24:08.438705298Z" level=info msg="RemoveContainer for \"4e55\""
time="2026-12-06T02:24:08.439705298Z" level=info msg="RemoveContainer for \"4e55\""
time="2026-12-06T02:24:08.500399682Z" level=error msg="RemoveContainer for \"4e55\" failed" error="already in removing state"
time="2026-12-06T02:24:08.500399682Z" level=info msg="StopContainer for \"77aa\""
"#;
    let histogram = support::cluster::removals(log);
    assert_eq!(histogram, BTreeMap::from([(1, 1), (2, 1)]));
}
