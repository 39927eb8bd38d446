//! The kubelet simulator (`tests/support/kubelet.rs`) against a private
//! containerd directly, no shim: it starts containers the way kubelet does,
//! computes kubelet's pod phase, restarts per restart policy with backoff,
//! kills terminal pods and deletes pods the way kubelet's killPod does. It
//! also shows the problem the shim solves: a Job pod whose sidecar is a
//! regular container never completes.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ListPodSandboxRequest, PodSandboxState, PodSandboxStatusRequest,
};
use support::kubelet::*;
use support::*;

/// Generous: a loaded 2-core machine runs several tests at once.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A container command that exits 0 on SIGTERM (a shell as PID 1 ignores
/// SIGTERM unless it traps it).
fn until_term() -> Vec<String> {
    sh("trap 'exit 0' TERM; while :; do sleep 0.1; done")
}

/// A directory under the test's temporary directory, to bind-mount into
/// containers.
fn shared_dir(containerd: &PrivateContainerd, name: &str) -> Result<PathBuf> {
    let dir = containerd.dir().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn read_uptime(path: &Path) -> Result<f64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_uptime(&text).with_context(|| format!("no uptime in {}: {text:?}", path.display()))
}

async fn containerd_status(containerd: &PrivateContainerd, id: &str) -> Result<ContainerStatus> {
    let (mut rt, _) = containerd.cri();
    rt.container_status(ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .context("ContainerStatus without status")
}

async fn sandbox_state(containerd: &PrivateContainerd, id: &str) -> Result<PodSandboxState> {
    let (mut rt, _) = containerd.cri();
    let status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("PodSandboxStatus without status")?;
    Ok(PodSandboxState::try_from(status.state)?)
}

fn secs_between(earlier_nanos: i64, later_nanos: i64) -> f64 {
    (later_nanos - earlier_nanos) as f64 / 1e9
}

#[test]
fn pre_stop_annotation_is_kubelets_json() {
    assert_eq!(
        pre_stop_json(&PreStop::Exec(sh("echo \"a\" > /x"))),
        r#"{"exec":{"command":["sh","-c","echo \"a\" \u003e /x"]}}"#
    );
    assert_eq!(
        pre_stop_json(&PreStop::Sleep(Duration::from_millis(1500))),
        r#"{"sleep":{"seconds":2}}"#
    );
}

/// (1) Containers start in spec order, each created only after the previous
/// one's StartContainer returned, with kubelet's metadata, labels and
/// annotations on the sandbox and the containers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_start_one_at_a_time_in_spec_order() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let pod = kubelet
        .run_pod(
            PodDef::new("order")
                .label("app", "order")
                .annotation("example.com/note", "hello")
                .container(ContainerDef::new("first", until_term()))
                .container(ContainerDef::new("second", until_term())),
        )
        .await?;
    pod.wait_started(TIMEOUT).await?;
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    let first = pod
        .wait_state("first", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    let second = pod
        .wait_state("second", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    ensure!(
        second.started_at >= first.started_at && second.created_at >= first.started_at,
        "second (created {}, started {}) before first started ({})",
        second.created_at,
        second.started_at,
        first.started_at
    );

    // The first sync, call by call, each one after the previous returned.
    let calls: Vec<CriCall> = pod
        .calls()
        .into_iter()
        .filter(|c| c.origin == Origin::Start)
        .collect();
    let seq: Vec<(&str, &str)> = calls
        .iter()
        .map(|c| (c.method, c.container.as_deref().unwrap_or("-")))
        .collect();
    let mut want = vec![("RunPodSandbox", "-"), ("PodSandboxStatus", "-")];
    for name in ["first", "second"] {
        for method in [
            "ImageStatus",
            "ImageStatus",
            "CreateContainer",
            "StartContainer",
        ] {
            want.push((method, name));
        }
    }
    assert_eq!(seq, want);
    for pair in calls.windows(2) {
        ensure!(
            pair[0].ok() && pair[0].end.is_some_and(|end| end <= pair[1].start),
            "{} not finished before {}: {:?}",
            pair[0].method,
            pair[1].method,
            pair
        );
    }

    // What containerd got.
    let (mut rt, _) = containerd.cri();
    let sandbox = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.sandbox_id().to_string(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no sandbox status")?;
    for (k, v) in [
        ("app", "order"),
        (LABEL_POD_NAME, "order"),
        (LABEL_POD_NAMESPACE, "default"),
        (LABEL_POD_UID, pod.uid()),
    ] {
        assert_eq!(sandbox.labels.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(
        sandbox
            .annotations
            .get("example.com/note")
            .map(String::as_str),
        Some("hello")
    );
    let meta = sandbox.metadata.context("no sandbox metadata")?;
    assert_eq!(
        (
            meta.name.as_str(),
            meta.namespace.as_str(),
            meta.uid.as_str()
        ),
        ("order", "default", pod.uid())
    );
    for (status, name) in [(&first, "first"), (&second, "second")] {
        assert_eq!(status.metadata.as_ref().map(|m| m.attempt), Some(0));
        for (k, v) in [
            (LABEL_CONTAINER_NAME, name),
            (LABEL_POD_NAME, "order"),
            (LABEL_POD_NAMESPACE, "default"),
            (LABEL_POD_UID, pod.uid()),
        ] {
            assert_eq!(status.labels.get(k).map(String::as_str), Some(v), "{k}");
        }
        let a = &status.annotations;
        assert_eq!(
            a.get(ANNOTATION_RESTART_COUNT).map(String::as_str),
            Some("0")
        );
        assert_eq!(
            a.get(ANNOTATION_GRACE_PERIOD).map(String::as_str),
            Some("30")
        );
        assert_eq!(
            a.get(ANNOTATION_TERMINATION_MESSAGE_PATH)
                .map(String::as_str),
            Some("/dev/termination-log")
        );
        assert_eq!(
            a.get(ANNOTATION_TERMINATION_MESSAGE_POLICY)
                .map(String::as_str),
            Some("File")
        );
        ensure!(a.get(ANNOTATION_HASH).is_some_and(|h| !h.is_empty()));
        ensure!(!a.contains_key(ANNOTATION_PRE_STOP));
        ensure!(
            status.log_path.ends_with(&format!("{name}/0.log")),
            "log path {}",
            status.log_path
        );
    }
    ensure!(pod.duplicates().is_empty(), "{}", pod.summary());

    let timings = pod.delete(None).await?;
    assert_eq!(timings.len(), 2);
    for t in &timings {
        ensure!(t.error.is_none() && t.timeout == 30, "{t:?}");
    }
    let left = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(left.is_empty(), "sandboxes left: {left:?}");
    Ok(())
}

/// (2) The problem: a Job pod (restart Never) whose sidecar is a regular
/// container stays Running after its main container exited 0. Deleting it
/// kills the sidecar (137) and the pod ends Failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_with_a_plain_sidecar_keeps_running_after_main_exits() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let pod = kubelet
        .run_pod(
            PodDef::job("pi")
                .container(ContainerDef::new("main", sh("sleep 1; exit 0")))
                .container(ContainerDef::new("sidecar", sh("sleep 1000"))),
        )
        .await?;
    let labels = &pod.sandbox_config().labels;
    for k in [
        LABEL_JOB_NAME,
        LABEL_JOB_NAME_LEGACY,
        LABEL_CONTROLLER_UID,
        LABEL_CONTROLLER_UID_LEGACY,
    ] {
        ensure!(labels.contains_key(k), "no {k} in {labels:?}");
    }
    assert_eq!(labels.get(LABEL_JOB_NAME).map(String::as_str), Some("pi"));

    let main = pod
        .wait_state("main", ContainerState::ContainerExited, TIMEOUT)
        .await?;
    assert_eq!(main.exit_code, 0);
    // The pod worker has read the exit...
    wait_for(TIMEOUT, "the pod worker to see main exited", || {
        let pod = &pod;
        async move {
            pod.synced("main")
                .is_some_and(|s| s.state == ContainerState::ContainerExited as i32)
        }
    })
    .await?;
    // ... and the pod stays Running, not killed, for as long as we look.
    let seen_exit = Instant::now();
    while seen_exit.elapsed() < Duration::from_secs(3) {
        // assert!, not ensure!: a panic shows containerd's log too.
        assert!(
            pod.phase() == Phase::Running,
            "phase {:?}\n{}",
            pod.phase(),
            pod.summary()
        );
        assert!(pod.first_call("StopPodSandbox", None).is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sidecar = pod.latest("sidecar").await.context("no sidecar status")?;
    assert_eq!(sidecar.state, ContainerState::ContainerRunning as i32);
    ensure!(pod.container_ids("main").len() == 1, "main was restarted");

    // Grace 0: StopContainer gets kubelet's minimum of 2 s. The sidecar
    // ends non-zero (143 on SIGTERM, 137 if killed), so the deleted pod ends
    // Failed.
    let timings = pod.delete(Some(Duration::ZERO)).await?;
    let names: Vec<&str> = timings.iter().map(|t| t.container.as_str()).collect();
    assert_eq!(names, ["sidecar"]);
    assert_eq!(timings[0].timeout, 2);
    let sidecar = pod.synced("sidecar").context("no sidecar status")?;
    eprintln!(
        "sidecar exit code after deletion: {} (StopContainer took {:?})",
        sidecar.exit_code,
        timings[0].returned.duration_since(timings[0].sent)
    );
    ensure!(sidecar.exit_code != 0, "{sidecar:?}");
    assert_eq!(pod.phase(), Phase::Failed);
    Ok(())
}

/// (3) Restart policy Never: exit 1 → Failed, exit 0 → Succeeded; either
/// way kubelet then kills the pod (StopPodSandbox) and restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_pods_end_failed_or_succeeded_and_are_killed() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let failing = kubelet
        .run_pod(
            PodDef::new("fails")
                .restart_policy(RestartPolicy::Never)
                .container(ContainerDef::new("main", sh("sleep 0.5; exit 1"))),
        )
        .await?;
    let succeeding = kubelet
        .run_pod(
            PodDef::new("succeeds")
                .restart_policy(RestartPolicy::Never)
                .container(ContainerDef::new("main", sh("sleep 0.5; exit 0"))),
        )
        .await?;
    failing.wait_phase(Phase::Failed, TIMEOUT).await?;
    succeeding.wait_phase(Phase::Succeeded, TIMEOUT).await?;

    for (pod, exit_code) in [(&failing, 1), (&succeeding, 0)] {
        wait_for(
            TIMEOUT,
            "StopPodSandbox after the terminal phase",
            || async move {
                pod.first_call("StopPodSandbox", None)
                    .is_some_and(|c| c.ok())
            },
        )
        .await
        .with_context(|| pod.summary())?;
        let stop = pod.first_call("StopPodSandbox", None).context("no stop")?;
        let terminal_at = pod
            .events()
            .iter()
            .find_map(|e| match e.event {
                Event::PhaseChanged { to, .. } if to.is_terminal() => Some(e.at),
                _ => None,
            })
            .context("no terminal phase event")?;
        ensure!(stop.start >= terminal_at, "{}", pod.summary());
        assert_eq!(stop.origin, Origin::Kill);
        assert_eq!(
            sandbox_state(&containerd, pod.sandbox_id()).await?,
            PodSandboxState::SandboxNotready
        );
        let main = pod.synced("main").context("no status")?;
        assert_eq!(main.exit_code, exit_code);
        assert_eq!(pod.container_ids("main").len(), 1, "{}", pod.summary());
        ensure!(pod.duplicates().is_empty(), "{}", pod.summary());
        // Nothing was running: only RemovePodSandbox is left.
        let timings = pod.delete(None).await?;
        ensure!(timings.is_empty(), "{timings:?}");
        ensure!(pod
            .first_call("RemovePodSandbox", None)
            .is_some_and(|c| c.ok()));
    }
    assert_eq!(failing.phase(), Phase::Failed);
    assert_eq!(succeeding.phase(), Phase::Succeeded);
    Ok(())
}

/// (4) Restart policy OnFailure: a container that fails twice and then
/// succeeds gets new attempts (1 and 2); the first restart is immediate,
/// the second waits the crash-loop backoff; then the pod Succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_with_backoff_until_success() -> Result<()> {
    const BACKOFF: Duration = Duration::from_secs(2);
    let containerd = PrivateContainerd::start().await?;
    let dir = shared_dir(&containerd, "retry")?;
    let kubelet = Kubelet::with_config(
        containerd.socket(),
        &containerd.pod_log_root(),
        KubeletConfig {
            initial_backoff: BACKOFF,
            ..Default::default()
        },
    );
    let script = "n=$(cat /shared/count 2>/dev/null || echo 0); n=$((n+1)); \
                  echo $n > /shared/count; [ $n -ge 3 ]";
    let pod = kubelet
        .run_pod(
            PodDef::job("retry")
                .restart_policy(RestartPolicy::OnFailure)
                .container(ContainerDef::new("main", sh(script)).mount(&dir, "/shared")),
        )
        .await?;
    pod.wait_phase(Phase::Succeeded, TIMEOUT).await?;
    assert_eq!(std::fs::read_to_string(dir.join("count"))?.trim(), "3");

    let ids = pod.container_ids("main");
    ensure!(ids.len() == 3, "attempts {ids:?}\n{}", pod.summary());
    let mut statuses = Vec::new();
    for (attempt, id) in ids.iter().enumerate() {
        let s = containerd_status(&containerd, id).await?;
        assert_eq!(s.metadata.as_ref().map(|m| m.attempt), Some(attempt as u32));
        assert_eq!(
            s.annotations.get(ANNOTATION_RESTART_COUNT),
            Some(&attempt.to_string())
        );
        ensure!(s.log_path.ends_with(&format!("main/{attempt}.log")));
        assert_eq!(s.state, ContainerState::ContainerExited as i32);
        statuses.push(s);
    }
    let exits: Vec<i32> = statuses.iter().map(|s| s.exit_code).collect();
    assert_eq!(exits, [1, 1, 0]);
    let gap1 = secs_between(statuses[0].finished_at, statuses[1].created_at);
    let gap2 = secs_between(statuses[1].finished_at, statuses[2].created_at);
    eprintln!("restart after exit: first {gap1:.2} s, second {gap2:.2} s (backoff {BACKOFF:?})");
    ensure!(
        gap2 >= BACKOFF.as_secs_f64(),
        "second restart {gap2:.2} s after the exit, within the backoff\n{}",
        pod.summary()
    );
    // No backoff before the first restart (kubelet's backoff entry starts
    // with it).
    let events = pod.events();
    let second_created = events
        .iter()
        .find_map(|e| match &e.event {
            Event::Created { attempt: 1, .. } => Some(e.at),
            _ => None,
        })
        .context("no attempt 1")?;
    ensure!(
        !events
            .iter()
            .any(|e| matches!(e.event, Event::BackOff { .. }) && e.at < second_created),
        "backoff before the first restart\n{}",
        pod.summary()
    );
    let restarts = events
        .iter()
        .filter(|e| matches!(e.event, Event::Restart { .. }))
        .count();
    assert_eq!(restarts, 2);
    ensure!(pod.duplicates().is_empty(), "{}", pod.summary());
    ensure!(pod.first_call("StopPodSandbox", None).is_some());
    pod.delete(None).await?;
    Ok(())
}

/// (5) Deletion: the preStop exec hook runs first, then every running
/// container gets SIGTERM at about the same time (kubelet stops them in
/// parallel), then StopPodSandbox, then RemovePodSandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_runs_pre_stop_then_stops_containers_in_parallel() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let dir = shared_dir(&containerd, "term")?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let command = |name: &str| {
        sh(&format!(
            "trap 'cat /proc/uptime > /shared/{name}.term; exit 0' TERM; \
             touch /shared/{name}.ready; while :; do sleep 0.1; done"
        ))
    };
    let hook = PreStop::Exec(sh("cat /proc/uptime > /shared/app.prestop"));
    let pod = kubelet
        .run_pod(
            PodDef::new("graceful")
                .termination_grace(Duration::from_secs(10))
                .container(
                    ContainerDef::new("app", command("app"))
                        .mount(&dir, "/shared")
                        .pre_stop(hook.clone()),
                )
                .container(ContainerDef::new("side", command("side")).mount(&dir, "/shared")),
        )
        .await?;
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    // Both traps are set.
    wait_for(TIMEOUT, "both containers ready", || {
        let dir = dir.clone();
        async move { dir.join("app.ready").exists() && dir.join("side.ready").exists() }
    })
    .await?;
    let app = pod.latest("app").await.context("no app status")?;
    assert_eq!(
        app.annotations.get(ANNOTATION_PRE_STOP).map(String::as_str),
        Some(r#"{"exec":{"command":["sh","-c","cat /proc/uptime \u003e /shared/app.prestop"]}}"#)
    );
    assert_eq!(
        app.annotations.get(ANNOTATION_PRE_STOP),
        Some(&pre_stop_json(&hook))
    );
    assert_eq!(
        app.annotations
            .get(ANNOTATION_GRACE_PERIOD)
            .map(String::as_str),
        Some("10")
    );

    let began = Instant::now();
    let timings = pod.delete(None).await?;
    let took = began.elapsed();
    let prestop = read_uptime(&dir.join("app.prestop"))?;
    let app_term = read_uptime(&dir.join("app.term"))?;
    let side_term = read_uptime(&dir.join("side.term"))?;
    eprintln!(
        "delete took {took:?}; uptime: app preStop {prestop:.2}, SIGTERM app {app_term:.2}, side {side_term:.2}"
    );
    ensure!(
        (app_term - side_term).abs() < 1.0,
        "SIGTERMs {app_term} and {side_term} more than 1 s apart"
    );
    ensure!(
        prestop <= app_term,
        "preStop at {prestop}, SIGTERM at {app_term}"
    );
    ensure!(took < Duration::from_secs(10), "delete took {took:?}");

    let names: Vec<&str> = timings.iter().map(|t| t.container.as_str()).collect();
    assert_eq!(names, ["app", "side"]);
    let (app_t, side_t) = (&timings[0], &timings[1]);
    let run = app_t.pre_stop.as_ref().context("no preStop run for app")?;
    ensure!(!run.timed_out && run.error.is_none(), "{run:?}");
    ensure!(app_t.sent >= run.end);
    // 10 s minus the hook's whole seconds (normally 0).
    ensure!((9..=10).contains(&app_t.timeout), "{app_t:?}");
    ensure!(
        side_t.pre_stop.is_none() && side_t.timeout == 10,
        "{side_t:?}"
    );
    ensure!(app_t.error.is_none() && side_t.error.is_none());
    // Parallel: side's stop did not wait for app's.
    ensure!(side_t.sent < app_t.returned, "{timings:?}");
    // The SIGTERM reached side while its StopContainer was in flight.
    ensure!(
        side_term >= uptime_at(side_t.sent) - 0.05
            && side_term <= uptime_at(side_t.returned) + 0.05,
        "side SIGTERM at {side_term}, StopContainer from {} to {}",
        uptime_at(side_t.sent),
        uptime_at(side_t.returned)
    );
    let exec = pod
        .first_call("ExecSync", Some("app"))
        .context("no ExecSync")?;
    ensure!(exec.ok() && exec.timeout == Some(0), "{exec:?}");
    ensure!(exec.end.is_some_and(|e| e <= app_t.sent));

    let stop_sandbox = pod
        .first_call("StopPodSandbox", None)
        .context("no StopPodSandbox")?;
    ensure!(stop_sandbox.start >= app_t.returned.max(side_t.returned));
    let remove = pod
        .first_call("RemovePodSandbox", None)
        .context("no RemovePodSandbox")?;
    ensure!(stop_sandbox.end.is_some_and(|e| e <= remove.start) && remove.ok());
    // Both exited 0 on SIGTERM: with podIsTerminal kubelet reports Succeeded.
    assert_eq!(pod.phase(), Phase::Succeeded);
    Ok(())
}

/// A single-container kill (a failed liveness probe) under restart policy
/// Always: the pod worker starts attempt 1. And a sleep preStop hook is run
/// by the kubelet itself (no ExecSync) and its seconds come off the
/// StopContainer timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_container_restarts_and_sleep_pre_stop_stays_off_the_cri() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let pod = kubelet
        .run_pod(
            PodDef::new("liveness")
                .termination_grace(Duration::from_secs(5))
                .container(
                    ContainerDef::new("app", until_term())
                        .pre_stop(PreStop::Sleep(Duration::from_secs(1))),
                ),
        )
        .await?;
    let first = pod
        .wait_state("app", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    assert_eq!(
        first
            .annotations
            .get(ANNOTATION_PRE_STOP)
            .map(String::as_str),
        Some(r#"{"sleep":{"seconds":1}}"#)
    );

    kubelet
        .stop_container(&pod, "app", Duration::from_secs(2))
        .await?;
    wait_for(TIMEOUT, "a second attempt of app", || {
        let pod = &pod;
        async move { pod.container_ids("app").len() == 2 }
    })
    .await
    .with_context(|| pod.summary())?;
    let second = pod
        .wait_state("app", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    assert_eq!(second.metadata.as_ref().map(|m| m.attempt), Some(1));
    let old = containerd_status(&containerd, &first.id).await?;
    assert_eq!(
        (old.state, old.exit_code),
        (ContainerState::ContainerExited as i32, 0)
    );
    let stop = pod
        .first_call("StopContainer", Some("app"))
        .context("no stop")?;
    assert_eq!((stop.origin, stop.timeout), (Origin::Manual, Some(2)));
    ensure!(pod.duplicates().is_empty(), "{}", pod.summary());
    pod.wait_phase(Phase::Running, TIMEOUT).await?;

    let timings = pod.delete(None).await?;
    assert_eq!(timings.len(), 1);
    let t = &timings[0];
    let run = t.pre_stop.as_ref().context("no preStop run")?;
    ensure!(
        run.end.duration_since(run.start) >= Duration::from_secs(1),
        "{run:?}"
    );
    ensure!(t.sent >= run.end && t.timeout == 4, "{t:?}");
    ensure!(pod.calls_of("ExecSync", None).is_empty());
    Ok(())
}

/// The duplicate detector: a CREATED container of the pod (here made behind
/// the simulator's back, as a shim that answered StartContainer but left the
/// container CREATED would) makes kubelet create and start a new attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_container_is_started_again_and_recorded_as_duplicate() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let kubelet = Kubelet::new(containerd.socket(), &containerd.pod_log_root());
    let pod = kubelet
        .run_pod(PodDef::new("dup").container(ContainerDef::new("app", until_term())))
        .await?;
    pod.wait_state("app", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    pod.wait_phase(Phase::Running, TIMEOUT).await?;
    ensure!(pod.duplicates().is_empty());

    let mut config = container_config("app", &[]);
    config.command = until_term();
    config.metadata = Some(ContainerMetadata {
        name: "app".into(),
        attempt: 1,
    });
    config.log_path = "app/1.log".into();
    config.labels.extend(
        pod.sandbox_config()
            .labels
            .iter()
            .filter(|(k, _)| k.starts_with("io.kubernetes.pod."))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    config
        .annotations
        .insert(ANNOTATION_RESTART_COUNT.into(), "1".into());
    let (mut rt, _) = containerd.cri();
    let created = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.sandbox_id().to_string(),
            config: Some(config),
            sandbox_config: Some(pod.sandbox_config().clone()),
        })
        .await?
        .into_inner()
        .container_id;

    wait_for(TIMEOUT, "a duplicate", || {
        let pod = &pod;
        async move { !pod.duplicates().is_empty() }
    })
    .await
    .with_context(|| pod.summary())?;
    let dups = pod.duplicates();
    assert_eq!(dups.len(), 1, "{}", pod.summary());
    let d = &dups[0];
    assert_eq!(
        (d.old_id.as_str(), d.old_state, d.old_attempt, d.new_attempt),
        (created.as_str(), ContainerState::ContainerCreated, 1, 2)
    );
    ensure!(d.start_answer.is_none());
    wait_for(TIMEOUT, "attempt 2 created", || {
        let pod = &pod;
        async move { pod.container_ids("app").len() == 2 }
    })
    .await?;
    let new = pod
        .wait_state("app", ContainerState::ContainerRunning, TIMEOUT)
        .await?;
    assert_eq!(new.metadata.as_ref().map(|m| m.attempt), Some(2));
    // Both running attempts get stopped; the CREATED one gets no stop.
    let timings = pod.delete(None).await?;
    assert_eq!(timings.len(), 2, "{timings:?}");
    ensure!(timings.iter().all(|t| t.id != created));
    Ok(())
}
