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
