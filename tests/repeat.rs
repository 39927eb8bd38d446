//! Repeated and concurrent calls for the same ids reach the same end state
//! as one call, through the shim, against a real containerd.
//!
//! kubelet repeats calls after timeouts and after its own restart; these
//! tests send the repeats themselves (straight CRI calls through the shim's
//! socket) and judge from containerd, asked directly, and from what the
//! containers recorded: how often the app really started, whether after the
//! sidecar listened, when and how often the sidecar got SIGTERM. The repeats
//! are sent while the first call is held: the sidecar opens its port, and
//! the app exits on SIGTERM, only when the test lets them, once the shim's
//! status shows the calls held.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerState, ContainerStatus, CreateContainerRequest,
    ListContainersRequest, ListPodSandboxRequest, Mount, PodSandboxConfig, RemovePodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use support::kubelet::{parse_uptime, uptime_at};
use support::*;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;
/// The grace period of every container here (seconds).
const GRACE: i64 = 20;
/// Slack when comparing a container's `/proc/uptime` reading (10 ms steps)
/// with an instant of this process.
const CLOCK_SLACK: f64 = 0.02;

struct Env {
    shim: ShimProcess,
    containerd: PrivateContainerd,
    shared: PathBuf,
}

impl Env {
    async fn start() -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
        let shared = containerd.dir().join("shared");
        std::fs::create_dir_all(&shared)?;
        Ok(Env {
            shim,
            containerd,
            shared,
        })
    }

    fn via_shim(&self) -> RuntimeServiceClient<Channel> {
        self.shim.cri().0
    }

    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }

    /// A pod with sidecar `proxy` (ready when its port opens).
    async fn pod(&self, name: &str) -> Result<(String, PodSandboxConfig)> {
        let mut config = pod_sandbox_config(name, &self.containerd.pod_log_root());
        config
            .annotations
            .insert("sidecar-shim.io/sidecars".into(), "proxy".into());
        config.annotations.insert(
            "sidecar-shim.io/ready.proxy".into(),
            format!("tcp://:{PORT}"),
        );
        let id = run_pod(&mut self.via_shim(), &config).await?;
        Ok((id, config))
    }

    async fn create(
        &self,
        pod: &(String, PodSandboxConfig),
        name: &str,
        command: Vec<String>,
    ) -> Result<String> {
        let mut config: ContainerConfig = container_config(name, &[]);
        config.command = command;
        config.mounts = vec![Mount {
            container_path: "/shared".into(),
            host_path: self.shared.display().to_string(),
            ..Default::default()
        }];
        config.annotations.insert(
            "io.kubernetes.pod.terminationGracePeriod".into(),
            GRACE.to_string(),
        );
        Ok(self
            .via_shim()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.0.clone(),
                config: Some(config),
                sandbox_config: Some(pod.1.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.via_shim()
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    /// StartContainer; returns when it was sent and when it was answered.
    async fn timed_start(&self, id: &str) -> Result<(Instant, Instant)> {
        let sent = Instant::now();
        self.start_container(id).await?;
        Ok((sent, Instant::now()))
    }

    async fn stop(&self, id: &str, timeout: i64) -> Result<()> {
        self.via_shim()
            .stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout,
            })
            .await
            .with_context(|| format!("StopContainer {id}"))?;
        Ok(())
    }

    /// Wait until the shim reports container `id` as deferred (its start
    /// answered, the container not started), by its status report, or
    /// containerd runs it (a shim that did not wait for the sidecar): only
    /// to know when to let the sidecar get ready. Whether the container
    /// waited is judged from containerd and the containers.
    async fn wait_deferred(&self, id: &str) -> Result<()> {
        wait_for_value(
            TIMEOUT,
            &format!("the shim to report {id} deferred"),
            || async {
                if self.truth(id).await?.state == ContainerState::ContainerRunning as i32 {
                    return Ok(Some(()));
                }
                let report = self.shim.status_json().await?;
                let deferred = report["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|p| p["containers"].as_array().into_iter().flatten())
                    .any(|c| c["id"] == id && c["state"] == "deferred");
                Ok(deferred.then_some(()))
            },
        )
        .await
    }

    /// Wait until the shim holds `count` calls of `kind` (start, stop) for
    /// container `id`, by its status report, or containerd has `id` exited
    /// or running (the calls went through: a shim that did not hold them):
    /// only to know that a repeat arrives while the first call waits. What
    /// the calls did is judged from containerd and the containers.
    async fn wait_held(&self, kind: &str, id: &str, count: usize) -> Result<()> {
        let gone_through = match kind {
            "start" => ContainerState::ContainerRunning,
            _ => ContainerState::ContainerExited,
        };
        wait_for_value(
            TIMEOUT,
            &format!("the shim to hold {count} {kind} calls of {id}"),
            || async {
                if self.truth(id).await?.state == gone_through as i32 {
                    return Ok(Some(()));
                }
                let report = self.shim.status_json().await?;
                let held = report["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|p| p["held_calls"].as_array().into_iter().flatten())
                    .filter(|h| h["kind"] == kind && h["container_id"] == id)
                    .count();
                Ok((held >= count).then_some(()))
            },
        )
        .await
    }

    async fn wait_state(&self, id: &str, want: ContainerState) -> Result<ContainerStatus> {
        wait_for_value(
            TIMEOUT,
            &format!("{id} to be {want:?} in containerd"),
            || async {
                let s = self.truth(id).await?;
                Ok((s.state == want as i32).then_some(s))
            },
        )
        .await
    }
}

/// A proxy that opens its port once /shared/open exists, recording when it
/// starts listening (proxy.listen), and records each SIGTERM.
fn proxy() -> Vec<String> {
    sh(&format!(
        "trap 'cat /proc/uptime >> /shared/proxy.term; exit 0' TERM; \
         while [ ! -f /shared/open ]; do sleep 0.05; done; \
         cat /proc/uptime >> /shared/proxy.listen; \
         nc -ll -p {PORT} -e true & while :; do sleep 3600 & wait $!; done"
    ))
}

/// An app that records each start and, on SIGTERM, records it (app.term),
/// and exits once /shared/exit exists, recording when (app.exit).
fn app() -> Vec<String> {
    sh("trap 'cat /proc/uptime >> /shared/app.term; \
        while [ ! -f /shared/exit ]; do sleep 0.05; done; \
        cat /proc/uptime >> /shared/app.exit; exit 0' TERM; \
        cat /proc/uptime >> /shared/app.start; while :; do sleep 3600 & wait $!; done")
}

/// Let the proxy open its port.
fn open_port(env: &Env) -> Result<()> {
    Ok(std::fs::write(env.shared.join("open"), "")?)
}

fn recorded(dir: &Path, file: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(parse_uptime)
        .collect()
}

/// The uptime the proxy recorded when it started listening (waiting for it).
async fn listened(env: &Env) -> Result<f64> {
    wait_for_value(TIMEOUT, "the proxy to record its listen", || async {
        Ok(recorded(&env.shared, "proxy.listen").first().copied())
    })
    .await
}

/// Sidecar first, so the app's start is held: two StartContainer calls for
/// the app at once (both held while the proxy's port is closed), and a third
/// after. All succeed; the app started once, after the proxy listened, and
/// both held calls were answered only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_held_start_waits_with_the_first_and_starts_once() -> Result<()> {
    let env = Env::start().await?;
    let pod = env.pod("held").await?;
    let proxy = env.create(&pod, "proxy", proxy()).await?;
    env.start_container(&proxy).await?;
    let app = env.create(&pod, "app", app()).await?;
    // Both sent together; the port opens once the shim holds both.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let together = |b: Arc<tokio::sync::Barrier>| {
        let (env, app) = (&env, &app);
        async move {
            b.wait().await;
            env.timed_start(app).await
        }
    };
    let (a, b, opened) = tokio::join!(
        together(barrier.clone()),
        together(barrier.clone()),
        async {
            env.wait_held("start", &app, 2).await?;
            open_port(&env)
        }
    );
    opened?;
    let a = a?;
    let b = b.context("the repeated start")?;
    let s = env
        .wait_state(&app, ContainerState::ContainerRunning)
        .await?;
    let listen = listened(&env).await?;
    let started = recorded(&env.shared, "app.start");
    eprintln!(
        "uptime: proxy listened {listen:.2}; starts sent {:.3} and {:.3}, answered {:.3} and \
         {:.3}; app started {started:?}",
        uptime_at(a.0),
        uptime_at(b.0),
        uptime_at(a.1),
        uptime_at(b.1)
    );
    for (sent, answered) in [a, b] {
        ensure!(
            uptime_at(sent) < listen && uptime_at(answered) + CLOCK_SLACK >= listen,
            "a start sent at {:.3} was answered at {:.3}, the proxy listened at {listen:.2}",
            uptime_at(sent),
            uptime_at(answered)
        );
    }
    let p = env.truth(&proxy).await?;
    ensure!(s.started_at > p.started_at, "app started before its proxy");
    // Once more while it runs: the runtime answers as it would.
    let third = env.start_container(&app).await;
    wait_for(TIMEOUT, "the app to record its start", || async {
        !recorded(&env.shared, "app.start").is_empty()
    })
    .await?;
    let started = recorded(&env.shared, "app.start");
    ensure!(
        started.len() == 1,
        "the app started {} times",
        started.len()
    );
    ensure!(
        started[0] >= listen,
        "the app started at {:.2}, before the proxy listened at {listen:.2}",
        started[0]
    );
    let direct = env
        .containerd
        .cri()
        .0
        .start_container(StartContainerRequest {
            container_id: app.clone(),
        })
        .await;
    ensure!(
        third.is_ok() == direct.is_ok(),
        "a start of a running container: shim {third:?}, containerd {direct:?}"
    );
    Ok(())
}

/// App first, so its start is deferred: a repeated StartContainer is
/// answered at once too, and the app starts once, after the proxy listened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_deferred_start_is_answered_and_starts_once() -> Result<()> {
    let env = Env::start().await?;
    let pod = env.pod("deferred").await?;
    let app = env.create(&pod, "app", app()).await?;
    // Both are answered while the proxy does not even exist.
    env.start_container(&app).await?;
    env.start_container(&app).await?;
    ensure!(
        env.truth(&app).await?.state == ContainerState::ContainerCreated as i32,
        "the app started before its proxy exists"
    );
    let proxy = env.create(&pod, "proxy", proxy()).await?;
    env.start_container(&proxy).await?;
    // The proxy runs; the port opens once the shim still defers the app
    // after that.
    env.wait_state(&proxy, ContainerState::ContainerRunning)
        .await?;
    env.wait_deferred(&app).await?;
    open_port(&env)?;
    let s = env
        .wait_state(&app, ContainerState::ContainerRunning)
        .await?;
    ensure!(s.started_at > env.truth(&proxy).await?.started_at);
    wait_for(TIMEOUT, "the app to record its start", || async {
        !recorded(&env.shared, "app.start").is_empty()
    })
    .await?;
    let started = recorded(&env.shared, "app.start");
    let listen = listened(&env).await?;
    ensure!(started.len() == 1, "the app started at {started:?}");
    ensure!(
        started[0] >= listen,
        "the app started at {:.2}, before the proxy listened at {listen:.2}",
        started[0]
    );
    Ok(())
}

/// Shutdown with repeats: the app's stop and the proxy's stop together, the
/// proxy's stop again while the first waits for the app (which exits only
/// once the test lets it, after the shim holds both), then StopPodSandbox
/// twice at once and RemovePodSandbox twice. Every call succeeds; the proxy
/// got one SIGTERM, after the app exited; nothing is left in containerd or
/// in the shim's state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_stops_and_removals_end_like_one() -> Result<()> {
    let env = Env::start().await?;
    let pod = env.pod("stops").await?;
    let proxy = env.create(&pod, "proxy", proxy()).await?;
    env.start_container(&proxy).await?;
    open_port(&env)?;
    let app = env.create(&pod, "app", app()).await?;
    env.start_container(&app).await?;
    env.wait_state(&app, ContainerState::ContainerRunning)
        .await?;
    let state_file = ShimProcess::default_state_dir(env.shim.listen())
        .join("pods")
        .join(format!("{}.json", pod.0));
    ensure!(state_file.exists(), "no state file for the pod");

    let began = Instant::now();
    let (app_stop, first, second) =
        tokio::join!(env.stop(&app, GRACE), env.stop(&proxy, GRACE), async {
            env.wait_held("stop", &proxy, 1).await?;
            let sent = Instant::now();
            let (stopped, exit) = tokio::join!(env.stop(&proxy, GRACE), async {
                env.wait_held("stop", &proxy, 2).await?;
                std::fs::write(env.shared.join("exit"), "")?;
                anyhow::Ok(())
            });
            exit?;
            stopped.map(|()| sent)
        });
    app_stop?;
    first?;
    let second_sent = second.context("the repeated proxy stop")?;
    let took = began.elapsed();
    let app_exit = recorded(&env.shared, "app.exit");
    let terms = recorded(&env.shared, "proxy.term");
    eprintln!(
        "uptime: repeated proxy stop sent {:.3}, app exited {app_exit:?}, proxy SIGTERMs \
         {terms:?}; the stops took {took:?}",
        uptime_at(second_sent)
    );
    ensure!(app_exit.len() == 1, "app exits recorded: {app_exit:?}");
    ensure!(terms.len() == 1, "proxy SIGTERMs: {terms:?}");
    ensure!(
        uptime_at(second_sent) < app_exit[0],
        "the repeated stop was sent at {:.3}, after the app exited at {:.3}",
        uptime_at(second_sent),
        app_exit[0]
    );
    ensure!(
        terms[0] + CLOCK_SLACK >= app_exit[0],
        "proxy SIGTERM at {:.3}, before the app exited at {:.3}",
        terms[0],
        app_exit[0]
    );
    // Released by the app's exit, not by the grace period running out.
    ensure!(
        took < Duration::from_secs(GRACE as u64),
        "the stops took {took:?}"
    );

    let stop_pod = || async {
        env.via_shim()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.0.clone(),
            })
            .await
            .map(|_| ())
    };
    let (a, b) = tokio::join!(stop_pod(), stop_pod());
    a?;
    b?;
    for _ in 0..2 {
        env.via_shim()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.0.clone(),
            })
            .await?;
    }
    let (mut rt, _) = env.containerd.cri();
    let sandboxes = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    let containers = rt
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    ensure!(
        sandboxes.is_empty() && containers.is_empty(),
        "left in containerd: {sandboxes:?} {containers:?}"
    );
    ensure!(!state_file.exists(), "the pod's state file is left");
    Ok(())
}

/// Beyond a cap the shim forwards without holding: with
/// `max_deferred_starts = 0`, an app listed before its sidecar starts at
/// once (as it would without the shim), and the shim says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_a_cap_the_shim_forwards_and_warns() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let config = containerd.dir().join("config.toml");
    std::fs::write(&config, "[lifecycle]\nmax_deferred_starts = 0\n")?;
    let listen = containerd.dir().join("shim.sock");
    let config_arg = config.display().to_string();
    let shim = ShimProcess::start(&listen, containerd.socket(), &["--config", &config_arg]).await?;
    let shared = containerd.dir().join("shared");
    std::fs::create_dir_all(&shared)?;
    let env = Env {
        shim,
        containerd,
        shared,
    };
    let pod = env.pod("capped").await?;
    let app = env.create(&pod, "app", app()).await?;
    env.start_container(&app).await?;
    env.wait_state(&app, ContainerState::ContainerRunning)
        .await?;
    let log = env.shim.log();
    ensure!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains("cap reached")
            && l.contains("max_deferred")),
        "no warning about the cap:\n{log}"
    );
    Ok(())
}
