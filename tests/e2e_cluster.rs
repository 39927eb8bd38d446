//! End to end on a real one-node Kubernetes (`hack/cluster`: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
//! v1.28.7 on loopback; kubelet's runtime endpoint is this build's shim in
//! front of a private containerd), checked the way a user checks: the Job's
//! and the pod's status from the API server, and `kubectl logs`.
//!
//! The manifest is the demo's, `hack/cluster-manifests/sidecar-demo.yaml`: a
//! Job whose pod lists an annotated `proxy` sidecar first (it opens
//! 127.0.0.1:8080 after 2 s) and an `app` that fetches from it, then exits 0.
//!
//! * Through the shim: the app reaches the proxy on its first attempt (its
//!   start was held until the port answered), the Job gets condition
//!   Complete, the pod Succeeded, and kubelet reports both containers
//!   terminated with exit code 0 (the proxy itself exits 143 on the SIGTERM
//!   the shim sent it), none restarted.
//! * The same manifest with kubelet straight at containerd: the app ends
//!   with exit 0, but the proxy runs on, the pod stays Running and the Job
//!   does not complete, for a while after the point where the shim's Job had
//!   long completed. This is what the first test would see if the shim did
//!   nothing: it shows that test can fail.
//! * Ten such Jobs at once through the shim: all complete, no container is
//!   restarted, and kubelet never gets GOAWAY "too_many_pings".
//!
//! Each test brings up a cluster of its own (about 4 s to node Ready on a
//! quiet machine) and takes it down when it ends.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value;

use support::cluster::{condition_true, container_status, pod_name, Cluster, Mode};

const MANIFEST: &str = "hack/cluster-manifests/sidecar-demo.yaml";
const JOB: &str = "sidecar-demo";
const SELECTOR: &str = "job-name=sidecar-demo";
/// From `kubectl apply` to the Job's end: scheduling, the 2 s the proxy
/// takes, the app's 1 s of work, the stop; generous for a loaded machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the baseline is watched after its app ended. Through the shim
/// the Job completes about 1-2 s after that point (the shim polls exits
/// every 100 ms, kubelet relists every 1 s).
const BASELINE_WINDOW: Duration = Duration::from_secs(10);

/// The Job's only pod (backoffLimit 0, restartPolicy Never), once there.
fn the_pod(cluster: &Cluster) -> Result<Option<Value>> {
    let pods = cluster.pods(SELECTOR)?;
    if pods.len() > 1 {
        let names: Vec<&str> = pods.iter().map(pod_name).collect();
        return Err(cluster.fail(&format!("the Job made {} pods: {names:?}", pods.len())));
    }
    Ok(pods.into_iter().next())
}

/// `state.terminated.exitCode` of a container status, if it terminated.
fn exit_code(status: &Value) -> Option<i64> {
    status["state"]["terminated"]["exitCode"].as_i64()
}

#[test]
fn annotated_job_completes_through_the_shim() -> Result<()> {
    let cluster = Cluster::up(Mode::Shim)?;
    let applied = Instant::now();
    cluster.apply_file(MANIFEST)?;

    cluster.wait_for(JOB_TIMEOUT, "Job sidecar-demo to be Complete", || {
        let job = cluster.kubectl_json(&["get", "job", JOB])?;
        if condition_true(&job, "Failed") {
            return Err(cluster.fail(&format!(
                "Job sidecar-demo Failed: {}",
                job["status"]["conditions"]
            )));
        }
        Ok(condition_true(&job, "Complete").then_some(()))
    })?;
    let completed = applied.elapsed();

    let pod = the_pod(&cluster)?.context("Job Complete but no pod")?;
    let name = pod_name(&pod).to_owned();
    let check = |ok: bool, what: &str| -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(cluster.fail(&format!("pod {name}: {what}")))
        }
    };
    check(
        pod["status"]["phase"] == "Succeeded",
        &format!("phase {} (want Succeeded)", pod["status"]["phase"]),
    )?;
    for container in ["proxy", "app"] {
        let status = container_status(&pod, container)
            .with_context(|| format!("pod {name} has no status for {container}"))?;
        check(
            exit_code(status) == Some(0),
            &format!(
                "{container} as kubelet reports it: {} (want terminated, exit code 0)",
                status["state"]
            ),
        )?;
        check(
            status["restartCount"] == 0,
            &format!("{container} restarted {} times", status["restartCount"]),
        )?;
    }
    let proxy = container_status(&pod, "proxy").context("no proxy status")?;
    let message = proxy["state"]["terminated"]["message"]
        .as_str()
        .unwrap_or("");
    check(
        message.contains("sidecar-shim"),
        &format!("the proxy's termination message does not say the shim stopped it: {message:?}"),
    )?;

    let log = cluster.kubectl(&["logs", &name, "-c", "app"])?;
    check(
        log.contains("app: reached the proxy on attempt 1\n"),
        &format!("the app did not reach the proxy on its first attempt; its log:\n{log}"),
    )?;
    eprintln!(
        "Job Complete {completed:.1?} after kubectl apply; kubelet got GOAWAY too_many_pings {} times",
        cluster.too_many_pings()
    );
    Ok(())
}

#[test]
fn annotated_job_stays_running_without_the_shim() -> Result<()> {
    let cluster = Cluster::up(Mode::Direct)?;
    cluster.apply_file(MANIFEST)?;

    let pod = cluster.wait_for(JOB_TIMEOUT, "the app container to end", || {
        let Some(pod) = the_pod(&cluster)? else {
            return Ok(None);
        };
        let ended = container_status(&pod, "app").is_some_and(|s| exit_code(s).is_some());
        Ok(ended.then_some(pod))
    })?;
    let name = pod_name(&pod).to_owned();
    let app = container_status(&pod, "app").context("no app status")?;
    if exit_code(app) != Some(0) {
        return Err(cluster.fail(&format!(
            "pod {name}: the app ended with {} (want exit code 0: the baseline differs only in \
             what happens after it)",
            app["state"]
        )));
    }

    // Watch, not wait: every look must find the pod Running with its proxy
    // running and the Job not Complete, until the window has passed.
    let app_ended = Instant::now();
    let mut looks = 0;
    while app_ended.elapsed() < BASELINE_WINDOW {
        let job = cluster.kubectl_json(&["get", "job", JOB])?;
        let pod = the_pod(&cluster)?.context("the Job's pod is gone")?;
        let proxy = container_status(&pod, "proxy").context("no proxy status")?;
        let running = pod["status"]["phase"] == "Running" && proxy["state"]["running"].is_object();
        if condition_true(&job, "Complete") || !running {
            return Err(cluster.fail(&format!(
                "without the shim, {:.1?} after the app ended: Job conditions {}, pod phase {}, \
                 proxy {} (want: not Complete, Running, proxy running)",
                app_ended.elapsed(),
                job["status"]["conditions"],
                pod["status"]["phase"],
                proxy["state"]
            )));
        }
        looks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "without the shim: pod {name} still Running with its proxy running {BASELINE_WINDOW:?} \
         after the app ended ({looks} looks)"
    );
    Ok(())
}

/// Ten copies of the demo Job at once through the shim: every one completes
/// and no container is restarted (each attempt counts as a restart in the
/// pod's status, and an app restarted under restartPolicy Never means a
/// start that failed).
///
/// With the frame relay (before issue 9's per-hop HTTP/2 endpoints) this
/// failed every time: with several pods starting at once, kubelet's CRI
/// connection through the shim got GOAWAY ENHANCE_YOUR_CALM
/// "too_many_pings" from containerd, held StartContainer calls on it failed
/// with UNAVAILABLE (exit 128, StartError) and apps were restarted (19 failed
/// starts and 155 GOAWAYs for 10 Jobs, one Job Failed); straight at
/// containerd there was no GOAWAY and no failed start.
#[test]
fn ten_annotated_jobs_at_once_complete_without_restarts() -> Result<()> {
    const JOBS: usize = 10;
    let cluster = Cluster::up(Mode::Shim)?;
    let manifest = std::fs::read_to_string(support::repo_root().join(MANIFEST))?;
    let one = format!("  name: {JOB}\n");
    anyhow::ensure!(
        manifest.contains(&one),
        "{MANIFEST} has no `{}`",
        one.trim_end()
    );
    let yaml: String = (1..=JOBS)
        .map(|i| {
            format!(
                "---\n{}",
                manifest.replace(&one, &format!("  name: {JOB}-{i}\n"))
            )
        })
        .collect();
    cluster.apply(&yaml)?;

    cluster.wait_for(JOB_TIMEOUT, "all ten Jobs to be Complete", || {
        let jobs = cluster.kubectl_json(&["get", "jobs"])?;
        let jobs = jobs["items"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = jobs.iter().find(|j| condition_true(j, "Failed")) {
            return Err(cluster.fail(&format!(
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

    let pods = cluster.kubectl_json(&["get", "pods"])?;
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    let mut wrong = Vec::new();
    for pod in &pods {
        let statuses = pod["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in &statuses {
            if c["restartCount"] != 0 || exit_code(c) != Some(0) {
                wrong.push(format!(
                    "{}/{}: restartCount {}, {}",
                    pod_name(pod),
                    c["name"],
                    c["restartCount"],
                    c["state"]
                ));
            }
        }
    }
    let pings = cluster.too_many_pings();
    if pods.len() != JOBS || !wrong.is_empty() || pings > 0 {
        return Err(cluster.fail(&format!(
            "{} pods for {JOBS} Jobs; kubelet got GOAWAY too_many_pings {pings} times; \
             containers restarted or not at exit 0:\n{}",
            pods.len(),
            wrong.join("\n")
        )));
    }
    Ok(())
}
