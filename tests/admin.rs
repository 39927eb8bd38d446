//! The admin API and `sidecar-shim status`, end to end: the real binary
//! serves a private containerd, the kubelet simulator runs pods through it,
//! and `sidecar-shim status` (the real binary, as an operator runs it) is
//! compared with what containerd itself says (read directly, never through
//! the shim) and with what kubelet did (the simulator's call records).
//!
//! Sidecars here open their port only once the test creates a file in a
//! shared host directory, so a start stays deferred or held exactly as long
//! as the test needs to look at it.
//!
//! * A pod listing its app before its sidecar: the app's start is reported
//!   deferred (since kubelet's StartContainer) while containerd has it
//!   CREATED; once the sidecar's port opens, containerd runs the app after
//!   the sidecar and status reports it running, the sidecar ready, nothing
//!   held or deferred. The text table has its columns.
//! * A pod listing its sidecar first: kubelet's StartContainer of the app is
//!   in flight and reported held; it is released once the port opens.
//! * Health: the runtime is reachable; after containerd is killed it is not
//!   (exit 1); after a restart it is again (exit 0).
//! * The admin socket is 0600; `--admin-listen` and `status --config` find a
//!   socket elsewhere; a missing or dead socket is exit 2 naming the path.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::{ContainerState, ContainerStatus, VersionRequest};
use serde_json::Value;
use support::kubelet::*;
use support::*;

/// Generous: a loaded 2-core machine runs several of these at once.
const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;
const SIDECARS: &str = "sidecar-shim.io/sidecars";
const READY_PROXY: &str = "sidecar-shim.io/ready.proxy";

/// What `sidecar-shim status` printed and how it exited.
struct StatusRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl StatusRun {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("status printed no JSON: {}", self.describe()))
    }

    fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `sidecar-shim status ARGS`.
async fn status(args: &[&str]) -> Result<StatusRun> {
    let out = tokio::process::Command::new(ShimProcess::binary())
        .arg("status")
        .args(args)
        .output()
        .await
        .context("running sidecar-shim status")?;
    Ok(StatusRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `status --admin SOCKET --output json`, which must exit 0 (healthy).
async fn status_json(admin: &Path) -> Result<Value> {
    let run = status(&["--admin", path_str(admin)?, "--output", "json"]).await?;
    ensure!(run.code == Some(0), "{}", run.describe());
    run.json()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// The pod with this sandbox id in status's JSON.
fn pod_of<'a>(report: &'a Value, sandbox_id: &str) -> Result<&'a Value> {
    report["pods"]
        .as_array()
        .context("no pods array")?
        .iter()
        .find(|p| p["sandbox_id"] == sandbox_id)
        .with_context(|| format!("pod {sandbox_id} not reported: {report:#}"))
}

/// The container with this id in a pod of status's JSON.
fn container_of<'a>(pod: &'a Value, id: &str) -> Result<&'a Value> {
    pod["containers"]
        .as_array()
        .context("no containers array")?
        .iter()
        .find(|c| c["id"] == id)
        .with_context(|| format!("container {id} not reported: {pod:#}"))
}

/// containerd, the shim in front of it, a simulated kubelet talking to the
/// shim, and a host directory the containers see as /shared. (Fields drop
/// in order: kubelet, shim, containerd.)
struct Env {
    kubelet: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
    shared: PathBuf,
}

impl Env {
    async fn start() -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let kubelet = Kubelet::new(shim.listen(), &containerd.pod_log_root());
        let shared = containerd.dir().join("shared");
        std::fs::create_dir_all(&shared)?;
        Ok(Env {
            kubelet,
            shim,
            containerd,
            shared,
        })
    }

    /// containerd's own status of a container.
    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }

    async fn wait_truth(&self, id: &str, want: ContainerState) -> Result<ContainerStatus> {
        wait_for_value(
            TIMEOUT,
            &format!("containerd to report {id} {want:?}"),
            || async move {
                let s = self.truth(id).await?;
                Ok((s.state == want as i32).then_some(s))
            },
        )
        .await
        .with_context(|| self.shim.log())
    }

    /// The id of the first attempt of `name`, once kubelet created it.
    async fn created(&self, pod: &PodHandle, name: &str) -> Result<String> {
        wait_for_value(TIMEOUT, &format!("kubelet to create {name}"), || {
            let id = pod.container_ids(name).first().cloned();
            async move { Ok(id) }
        })
        .await
        .with_context(|| pod.summary())
    }

    /// Lets the sidecar open its port.
    fn release(&self) -> Result<()> {
        std::fs::write(self.shared.join("go"), "")?;
        Ok(())
    }
}

/// The sidecar: waits for /shared/go, then serves TCP on PORT.
fn proxy() -> ContainerDef {
    ContainerDef::new(
        "proxy",
        sh(&format!(
            "trap 'exit 0' TERM; while [ ! -f /shared/go ]; do sleep 0.1; done; \
             nc -ll -p {PORT} -e true & while :; do sleep 0.1; done"
        )),
    )
}

fn app() -> ContainerDef {
    ContainerDef::new("app", sh("trap 'exit 0' TERM; while :; do sleep 0.1; done"))
}

fn gated_pod(name: &str, containers: [ContainerDef; 2], shared: &Path) -> PodDef {
    let mut def = PodDef::new(name)
        .termination_grace(Duration::from_secs(5))
        .annotation(SIDECARS, "proxy")
        .annotation(READY_PROXY, &format!("tcp://:{PORT}"));
    for c in containers {
        def = def.container(c.mount(shared, "/shared"));
    }
    def
}

fn nanos(v: &Value) -> Result<i64> {
    v.as_i64().with_context(|| format!("not a timestamp: {v}"))
}

// ---------------------------------------------------------------------------
// Deferred

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_start_is_reported_as_containerd_has_it() -> Result<()> {
    let env = Env::start().await?;
    let admin = env.shim.admin_socket();
    let pod = env
        .kubelet
        .run_pod(gated_pod("deferred", [app(), proxy()], &env.shared))
        .await?;
    let app_id = env.created(&pod, "app").await?;
    let proxy_id = env.created(&pod, "proxy").await?;
    // The proxy runs (waiting for /shared/go); the app's start was answered.
    env.wait_truth(&proxy_id, ContainerState::ContainerRunning)
        .await?;
    let start = wait_for_value(TIMEOUT, "kubelet's StartContainer of app to return", || {
        let c = pod
            .first_call("StartContainer", Some("app"))
            .filter(|c| !c.in_flight());
        async move { Ok(c) }
    })
    .await?;
    ensure!(start.ok(), "{}", pod.summary());

    let report = status_json(&admin).await?;
    let truth_app = env.truth(&app_id).await?;
    ensure!(
        truth_app.state == ContainerState::ContainerCreated as i32,
        "containerd: app {:?}",
        truth_app.state
    );
    ensure!(report["healthy"] == true, "{report:#}");
    let p = pod_of(&report, pod.sandbox_id())?;
    assert_eq!(p["namespace"], "default");
    assert_eq!(p["name"], pod.name());
    assert_eq!(p["sidecars"], serde_json::json!(["proxy"]));
    let app = container_of(p, &app_id)?;
    assert_eq!(app["name"], "app");
    assert_eq!(app["role"], "normal");
    assert_eq!(app["state"], "deferred", "{p:#}");
    let since = nanos(&app["deferred"]["since_unix_nanos"])?;
    let (sent, answered) = (
        unix_nanos_at(start.start),
        unix_nanos_at(start.end.context("in flight")?),
    );
    ensure!(
        sent <= since && since <= answered,
        "deferred since {since}, kubelet's StartContainer {sent}..{answered}"
    );
    let deadline = nanos(&app["deferred"]["deadline_unix_nanos"])?;
    // The ready-timeout (default 90 s) from the deferral.
    assert_eq!(deadline - since, 90_000_000_000, "{app:#}");
    let px = container_of(p, &proxy_id)?;
    assert_eq!(px["role"], "sidecar");
    assert_eq!(px["sidecar_index"], 0);
    assert_eq!(px["state"], "running");
    assert_eq!(px["ready"], false);
    assert_eq!(px["ready_check"], format!("tcp://:{PORT}"));
    // Sidecars first, then the app (spec order was app, proxy).
    assert_eq!(p["containers"][0]["id"], proxy_id.as_str());
    ensure!(
        p["held_calls"].as_array().is_some_and(|h| h.is_empty()),
        "deferred, not held: {p:#}"
    );

    // The same as a table.
    let text = status(&["--admin", path_str(&admin)?]).await?;
    eprintln!("sidecar-shim status:\n{}", text.stdout);
    ensure!(text.code == Some(0), "{}", text.describe());
    let header = text
        .stdout
        .lines()
        .find(|l| l.starts_with("POD "))
        .with_context(|| text.describe())?;
    let columns: Vec<&str> = header.split("  ").filter(|c| !c.is_empty()).collect();
    let columns: Vec<&str> = columns.iter().map(|c| c.trim()).collect();
    assert_eq!(
        columns,
        [
            "POD",
            "CONTAINER",
            "ID",
            "ROLE",
            "STATE",
            "READY",
            "HELD",
            "DEFERRED",
            "STOPPED BY SHIM"
        ]
    );
    let row = |name: &str| {
        text.stdout
            .lines()
            .find(|l| {
                l.starts_with(&format!("default/{}", pod.name()))
                    && l.split_whitespace().nth(1) == Some(name)
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    let app_row = row("app").with_context(|| text.describe())?;
    assert_eq!(app_row[2], &app_id[..13]);
    assert_eq!(&app_row[3..6], ["normal", "deferred", "-"], "{app_row:?}");
    ensure!(
        text.stdout.contains("1 start deferred"),
        "{}",
        text.describe()
    );
    let proxy_row = row("proxy").with_context(|| text.describe())?;
    assert_eq!(&proxy_row[3..6], ["sidecar", "running", "no"]);
    ensure!(
        text.stdout.starts_with("sidecar-shim ")
            && text.stdout.lines().next().unwrap().ends_with(": healthy"),
        "{}",
        text.describe()
    );

    // The port opens: containerd runs the app, after the proxy.
    env.release()?;
    let truth_app = env
        .wait_truth(&app_id, ContainerState::ContainerRunning)
        .await?;
    let truth_proxy = env.truth(&proxy_id).await?;
    ensure!(
        truth_app.started_at > truth_proxy.started_at,
        "app started {} before the proxy {}",
        truth_app.started_at,
        truth_proxy.started_at
    );
    // The shim hears of the start when containerd answers it: wait for
    // status to say so, then look at everything.
    let report = wait_for_value(TIMEOUT, "status to report app running", || {
        let admin = admin.clone();
        let app_id = app_id.clone();
        let sandbox = pod.sandbox_id().to_string();
        async move {
            let r = status_json(&admin).await?;
            let running = container_of(pod_of(&r, &sandbox)?, &app_id)?["state"] == "running";
            Ok(running.then_some(r))
        }
    })
    .await?;
    let p = pod_of(&report, pod.sandbox_id())?;
    let app = container_of(p, &app_id)?;
    assert_eq!(app["deferred"], Value::Null);
    assert_eq!(container_of(p, &proxy_id)?["ready"], true);
    ensure!(
        p["held_calls"].as_array().is_some_and(|h| h.is_empty()),
        "{p:#}"
    );
    ensure!(
        pod.container_ids("app") == [app_id.clone()],
        "{}",
        pod.summary()
    );

    let timings = pod.delete(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    // Removed with its sandbox: no longer managed.
    let report = status_json(&admin).await?;
    ensure!(
        pod_of(&report, pod.sandbox_id()).is_err(),
        "deleted pod still reported: {report:#}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Held

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_start_is_reported_while_kubelet_waits() -> Result<()> {
    let env = Env::start().await?;
    let admin = env.shim.admin_socket();
    let pod = env
        .kubelet
        .run_pod(gated_pod("held", [proxy(), app()], &env.shared))
        .await?;
    let proxy_id = env.created(&pod, "proxy").await?;
    let app_id = env.created(&pod, "app").await?;
    let start = wait_for_value(TIMEOUT, "kubelet's StartContainer of app", || {
        let c = pod.first_call("StartContainer", Some("app"));
        async move { Ok(c) }
    })
    .await?;
    // kubelet has sent it; the shim holds it as soon as it arrives.
    let report = wait_for_value(TIMEOUT, "status to report a held call", || {
        let admin = admin.clone();
        let sandbox = pod.sandbox_id().to_string();
        async move {
            let r = status_json(&admin).await?;
            let held = pod_of(&r, &sandbox)?["held_calls"]
                .as_array()
                .is_some_and(|h| !h.is_empty());
            Ok(held.then_some(r))
        }
    })
    .await?;
    let still_waiting = pod
        .first_call("StartContainer", Some("app"))
        .is_some_and(|c| c.in_flight());
    let truth_app = env.truth(&app_id).await?;
    let truth_proxy = env.truth(&proxy_id).await?;
    ensure!(still_waiting, "kubelet's call returned: {}", pod.summary());
    ensure!(truth_app.state == ContainerState::ContainerCreated as i32);
    ensure!(truth_proxy.state == ContainerState::ContainerRunning as i32);

    let p = pod_of(&report, pod.sandbox_id())?;
    let held = p["held_calls"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{p:#}");
    assert_eq!(held[0]["kind"], "start");
    assert_eq!(held[0]["container_id"], app_id.as_str());
    assert_eq!(held[0]["container_name"], "app");
    let since = nanos(&held[0]["since_unix_nanos"])?;
    ensure!(
        since >= unix_nanos_at(start.start),
        "held since {since}, before kubelet sent it at {}",
        unix_nanos_at(start.start)
    );
    ensure!(
        held[0]["held_seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{p:#}"
    );
    ensure!(nanos(&held[0]["until_unix_nanos"])? > since);
    let app = container_of(p, &app_id)?;
    assert_eq!(app["state"], "created");
    assert_eq!(app["deferred"], Value::Null);
    let px = container_of(p, &proxy_id)?;
    assert_eq!(
        (px["state"].as_str(), px["ready"].as_bool()),
        (Some("running"), Some(false))
    );

    let text = status(&["--admin", path_str(&admin)?]).await?;
    eprintln!("sidecar-shim status:\n{}", text.stdout);
    let app_row: Vec<&str> = text
        .stdout
        .lines()
        .find(|l| l.contains(&app_id[..13]))
        .with_context(|| text.describe())?
        .split_whitespace()
        .collect();
    assert_eq!(
        &app_row[3..7],
        ["normal", "created", "-", "start"],
        "{app_row:?}"
    );
    ensure!(text.stdout.contains("1 call held"), "{}", text.describe());

    // Released: kubelet's call returns, containerd runs the app, nothing
    // is held any more.
    env.release()?;
    env.wait_truth(&app_id, ContainerState::ContainerRunning)
        .await?;
    wait_for(TIMEOUT, "kubelet's StartContainer of app to return", || {
        let done = pod
            .first_call("StartContainer", Some("app"))
            .is_some_and(|c| c.ok());
        async move { done }
    })
    .await?;
    let report = status_json(&admin).await?;
    let p = pod_of(&report, pod.sandbox_id())?;
    ensure!(
        p["held_calls"].as_array().is_some_and(|h| h.is_empty()),
        "{p:#}"
    );
    assert_eq!(container_of(p, &proxy_id)?["ready"], true);
    let timings = pod.delete(None).await?;
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Health

#[tokio::test]
async fn health_follows_the_runtime() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let admin = shim.admin_socket();
    let (mut direct, _) = containerd.cri();
    let version = direct
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();

    let report = status_json(&admin).await?;
    assert_eq!(report["healthy"], true);
    let rt = &report["runtime"];
    assert_eq!(rt["reachable"], true, "{report:#}");
    assert_eq!(rt["name"], version.runtime_name.as_str());
    assert_eq!(rt["version"], version.runtime_version.as_str());
    assert_eq!(rt["api_version"], version.runtime_api_version.as_str());
    assert_eq!(rt["endpoint"], path_str(containerd.socket())?);
    let state_dir = ShimProcess::default_state_dir(shim.listen());
    assert_eq!(report["store"]["state_dir"], path_str(&state_dir)?);
    assert_eq!(report["store"]["writable"], true);
    assert_eq!(report["shim"]["pid"], shim.pid());
    let text = status(&["--admin", path_str(&admin)?]).await?;
    ensure!(
        text.stdout
            .contains(&format!("state:    {} writable", state_dir.display())),
        "{}",
        text.describe()
    );

    containerd.kill()?;
    let run = status(&["--admin", path_str(&admin)?, "--output", "json"]).await?;
    ensure!(
        run.code == Some(1),
        "unhealthy is exit 1: {}",
        run.describe()
    );
    let report = run.json()?;
    assert_eq!(report["healthy"], false);
    assert_eq!(report["runtime"]["reachable"], false);
    ensure!(
        report["runtime"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect")),
        "{report:#}"
    );
    let text = status(&["--admin", path_str(&admin)?]).await?;
    ensure!(text.code == Some(1), "{}", text.describe());
    ensure!(
        text.stdout.contains("UNHEALTHY (runtime unreachable)")
            && text.stdout.contains("UNREACHABLE"),
        "{}",
        text.describe()
    );

    containerd.restart().await?;
    let report = status_json(&admin).await?;
    assert_eq!(report["runtime"]["reachable"], true, "{report:#}");
    assert_eq!(report["healthy"], true);
    Ok(())
}

// ---------------------------------------------------------------------------
// The socket

#[tokio::test]
async fn admin_socket_is_root_only_and_errors_name_the_path() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let admin = containerd.dir().join("admin-elsewhere").join("a.sock");
    let mut shim = ShimProcess::start(
        &listen,
        containerd.socket(),
        &["--admin-listen", path_str(&admin)?],
    )
    .await?;

    let meta = std::fs::symlink_metadata(&admin)
        .with_context(|| format!("no admin socket at {}", admin.display()))?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), std::fs::metadata("/proc/self")?.uid());
    ensure!(
        !listen.with_file_name("admin.sock").exists()
            && !listen.with_extension("admin.sock").exists(),
        "a default admin socket was created too"
    );
    let report = status_json(&admin).await?;
    assert_eq!(report["admin_socket"], path_str(&admin)?);

    // `status --config` finds it from the node's config file.
    let config = containerd.dir().join("shim.toml");
    std::fs::write(&config, format!("admin_listen = {:?}\n", path_str(&admin)?))?;
    let run = status(&["--config", path_str(&config)?, "--output", "json"]).await?;
    ensure!(run.code == Some(0), "{}", run.describe());
    assert_eq!(run.json()?["shim"]["pid"], shim.pid());

    // Nothing there: exit 2, naming the path.
    let missing = containerd.dir().join("missing.sock");
    let run = status(&["--admin", path_str(&missing)?]).await?;
    ensure!(run.code == Some(2), "{}", run.describe());
    ensure!(
        run.stderr.contains(&format!(
            "cannot reach the admin socket {}",
            missing.display()
        )) && run.stderr.contains("is sidecar-shim running?"),
        "{}",
        run.describe()
    );
    ensure!(run.stdout.is_empty(), "{}", run.describe());

    // SIGKILLed: the socket is left behind and refuses connections.
    shim.kill9().await?;
    let run = status(&["--admin", path_str(&admin)?]).await?;
    ensure!(run.code == Some(2), "{}", run.describe());
    ensure!(
        run.stderr.contains(path_str(&admin)?) && run.stderr.contains("nothing serves it"),
        "{}",
        run.describe()
    );
    // The next shim replaces the stale socket.
    let shim = ShimProcess::start(
        &listen,
        containerd.socket(),
        &["--admin-listen", path_str(&admin)?],
    )
    .await?;
    assert_eq!(status_json(&admin).await?["shim"]["pid"], shim.pid());
    Ok(())
}
