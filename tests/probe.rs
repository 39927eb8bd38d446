//! Readiness checks against a real (private) containerd: the pod's network
//! namespace is found and tcp/http checks run inside it, exec checks run in
//! the container, running checks read the container's state.
//!
//! All network traffic stays on loopback: 127.0.0.1 inside pod network
//! namespaces, and once on the host's loopback (to show a port open in the
//! pod is not open there).

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ContainerState, NamespaceMode, PodSandboxConfig};
use sidecar_shim::lifecycle::probe::{self, Outcome, Target};
use sidecar_shim::lifecycle::spec::ReadyCheck;
use support::*;
use tonic::transport::Channel;

/// Generous: the test machine is small and runs several tests at once.
const DEADLINE: Duration = Duration::from_secs(90);

struct Pod {
    /// Kept alive for the test; dropping it removes everything.
    _containerd: PrivateContainerd,
    rt: RuntimeServiceClient<Channel>,
    config: PodSandboxConfig,
    id: String,
}

impl Pod {
    async fn start(name: &str) -> Result<Pod> {
        Pod::start_with(name, NamespaceMode::Pod).await
    }

    async fn start_with(name: &str, network: NamespaceMode) -> Result<Pod> {
        let containerd = PrivateContainerd::start().await?;
        let (mut rt, _) = containerd.cri();
        let mut config = pod_sandbox_config(name, &containerd.pod_log_root());
        if let Some(ns) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            ns.network = network as i32;
        }
        if network == NamespaceMode::Node {
            // As kubelet does: a host-network pod has the node's hostname
            // (runc refuses to set one without a UTS namespace of its own).
            config.hostname.clear();
        }
        let id = run_pod(&mut rt, &config).await?;
        Ok(Pod {
            _containerd: containerd,
            rt,
            config,
            id,
        })
    }

    /// Create and start a busybox container running `script`, and wait
    /// until it runs.
    async fn container(&mut self, name: &str, script: &str) -> Result<String> {
        let command = sh(script);
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let config = container_config(name, &command);
        let id = start_container(&mut self.rt, &self.id, &self.config, &config).await?;
        let rt = self.rt.clone();
        let cid = id.clone();
        wait_for(DEADLINE, &format!("container {name} running"), || {
            let mut rt = rt.clone();
            let cid = cid.clone();
            async move {
                matches!(
                    container_state(&mut rt, &cid).await,
                    Ok(ContainerState::ContainerRunning)
                )
            }
        })
        .await?;
        Ok(id)
    }

    async fn netns(&mut self) -> Result<PathBuf> {
        probe::pod_netns(&mut self.rt, &self.id)
            .await?
            .context("pod_netns found no network namespace for a pod-network pod")
    }

    async fn check(&mut self, check: &ReadyCheck, target: &Target) -> Outcome {
        probe::check(check, target, &mut self.rt).await
    }

    /// Poll `check` until its outcome is (not) ready, as wanted; that
    /// outcome.
    async fn wait_outcome(
        &self,
        check: &ReadyCheck,
        target: &Target,
        ready: bool,
    ) -> Result<Outcome> {
        let what = if ready { "Ready" } else { "NotReady" };
        self.wait_until(check, target, what, |o| o.is_ready() == ready)
            .await
    }

    /// Poll `check` until it is NotReady for a reason containing `why`
    /// (a single attempt may fail otherwise on a loaded machine: an exec
    /// that takes longer than its 1 s timeout, say); that reason.
    async fn wait_reason(&self, check: &ReadyCheck, target: &Target, why: &str) -> Result<String> {
        let outcome = self
            .wait_until(
                check,
                target,
                &format!("NotReady: ...{why}..."),
                |o| matches!(o, Outcome::NotReady(r) if r.contains(why)),
            )
            .await?;
        Ok(reason(outcome))
    }

    async fn wait_until(
        &self,
        check: &ReadyCheck,
        target: &Target,
        what: &str,
        done: impl Fn(&Outcome) -> bool,
    ) -> Result<Outcome> {
        let rt = self.rt.clone();
        let done = &done;
        wait_for_value(DEADLINE, &format!("{check} to be {what}"), || {
            let mut rt = rt.clone();
            let (check, target) = (check.clone(), target.clone());
            async move {
                let outcome = probe::check(&check, &target, &mut rt).await;
                if done(&outcome) {
                    Ok(Some(outcome))
                } else {
                    Err(anyhow!("last outcome: {outcome:?}"))
                }
            }
        })
        .await
    }
}

fn reason(outcome: Outcome) -> String {
    match outcome {
        Outcome::NotReady(why) => why,
        Outcome::Ready => panic!("expected NotReady, got Ready"),
    }
}

/// A port that nothing on the host's loopback listens on right now (bound
/// to an ephemeral port, then released).
fn free_host_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

#[tokio::test]
async fn pod_netns_is_the_pods_network_namespace() -> Result<()> {
    let mut pod = Pod::start("netns").await?;
    let netns = pod.netns().await?;
    eprintln!("pod network namespace: {}", netns.display());
    let meta = std::fs::metadata(&netns).with_context(|| format!("{}", netns.display()))?;
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    assert_ne!(
        (meta.dev(), meta.ino()),
        (ours.dev(), ours.ino()),
        "{} is the test's own network namespace",
        netns.display()
    );
    // The same namespace a container of the pod is in.
    let cid = pod.container("app", "exec sleep 3600").await?;
    let out = exec_sync(&mut pod.rt, &cid, &["readlink", "/proc/self/ns/net"], 30).await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), format!("net:[{}]", meta.ino()));

    let err = probe::pod_netns(&mut pod.rt, "no-such-sandbox")
        .await
        .expect_err("unknown sandbox");
    assert!(format!("{err:#}").contains("no-such-sandbox"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn host_network_pods_have_no_netns() -> Result<()> {
    let mut pod = Pod::start_with("hostnet", NamespaceMode::Node).await?;
    assert_eq!(probe::pod_netns(&mut pod.rt, &pod.id).await?, None);
    Ok(())
}

#[tokio::test]
async fn tcp_check_runs_in_the_pods_network_namespace() -> Result<()> {
    let mut pod = Pod::start("tcp").await?;
    let netns = pod.netns().await?;
    let port = free_host_port();
    // Listens only once told to, so that "not ready before" is no race.
    // (Debian's busybox nc has no -k or -s: -ll keeps listening, on all of
    // the pod's addresses, running `true` for each connection.)
    let cid = pod
        .container(
            "listener",
            &format!("while [ ! -e /tmp/go ]; do sleep 0.1; done; exec nc -ll -p {port} -e true"),
        )
        .await?;
    let check = ReadyCheck::Tcp { port };
    let in_pod = Target {
        netns: Some(netns),
        container_id: cid.clone(),
    };
    let why = pod.wait_reason(&check, &in_pod, "refused").await?;
    assert!(
        why.starts_with(&format!("tcp://:{port}: connecting to 127.0.0.1:{port}: ")),
        "{why}"
    );

    let out = exec_sync(&mut pod.rt, &cid, &["touch", "/tmp/go"], 30).await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    pod.wait_outcome(&check, &in_pod, true).await?;

    // The same port on the host's loopback is not open: the check above
    // ran in the pod's namespace.
    let on_host = Target {
        netns: None,
        container_id: cid,
    };
    let why = reason(pod.check(&check, &on_host).await);
    assert!(why.contains("refused"), "{why}");
    // And the pod's still is.
    assert_eq!(pod.check(&check, &in_pod).await, Outcome::Ready);
    Ok(())
}

#[tokio::test]
async fn http_check_reads_the_status() -> Result<()> {
    let mut pod = Pod::start("http").await?;
    let netns = pod.netns().await?;
    let cid = pod
        .container(
            "web",
            "mkdir -p /www && echo ok > /www/ready.html && \
             exec httpd -f -p 127.0.0.1:8081 -h /www",
        )
        .await?;
    let target = Target {
        netns: Some(netns),
        container_id: cid,
    };
    let ready = ReadyCheck::Http {
        port: 8081,
        path: "/ready.html".into(),
    };
    pod.wait_outcome(&ready, &target, true).await?;

    let missing = ReadyCheck::Http {
        port: 8081,
        path: "/missing.html".into(),
    };
    let why = pod.wait_reason(&missing, &target, "HTTP status").await?;
    assert_eq!(why, "http://:8081/missing.html: HTTP status 404");

    let closed = ReadyCheck::Http {
        port: 8082,
        path: "/".into(),
    };
    let why = reason(pod.check(&closed, &target).await);
    assert!(why.contains("connecting to 127.0.0.1:8082"), "{why}");
    Ok(())
}

#[tokio::test]
async fn exec_check_runs_in_the_container() -> Result<()> {
    let mut pod = Pod::start("exec").await?;
    let cid = pod.container("sidecar", "exec sleep 3600").await?;
    let target = Target {
        netns: None,
        container_id: cid.clone(),
    };
    let check = ReadyCheck::Exec {
        command: vec!["sh".into(), "-c".into(), "test -f /tmp/ready".into()],
    };
    pod.wait_reason(&check, &target, "exited with code 1")
        .await?;

    let out = exec_sync(&mut pod.rt, &cid, &["touch", "/tmp/ready"], 30).await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    pod.wait_outcome(&check, &target, true).await?;

    // The reason has the exit code and the first line of stderr (else
    // stdout).
    let noisy = ReadyCheck::Exec {
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo out; echo; echo '  not yet  ' >&2; echo more >&2; exit 3".into(),
        ],
    };
    let why = pod.wait_reason(&noisy, &target, "exited with code").await?;
    assert!(why.ends_with("exited with code 3: not yet"), "{why}");
    let quiet = ReadyCheck::Exec {
        command: vec!["sh".into(), "-c".into(), "echo stdout only; exit 4".into()],
    };
    let why = pod.wait_reason(&quiet, &target, "exited with code").await?;
    assert!(why.ends_with("exited with code 4: stdout only"), "{why}");

    let gone = Target {
        netns: None,
        container_id: "no-such-container".into(),
    };
    let why = pod.wait_reason(&check, &gone, "NotFound").await?;
    assert!(why.contains("no-such-container"), "{why}");
    Ok(())
}

#[tokio::test]
async fn running_check_reads_the_state() -> Result<()> {
    let mut pod = Pod::start("running").await?;
    let cid = pod.container("sidecar", "exec sleep 3600").await?;
    let running = Target {
        netns: None,
        container_id: cid,
    };
    assert_eq!(
        pod.check(&ReadyCheck::Running, &running).await,
        Outcome::Ready
    );

    let config = container_config("quitter", &["sh", "-c", "exit 7"]);
    let cid = start_container(&mut pod.rt, &pod.id, &pod.config, &config).await?;
    let rt = pod.rt.clone();
    let id = cid.clone();
    wait_for(DEADLINE, "container quitter exited", || {
        let mut rt = rt.clone();
        let id = id.clone();
        async move {
            matches!(
                container_state(&mut rt, &id).await,
                Ok(ContainerState::ContainerExited)
            )
        }
    })
    .await?;
    let exited = Target {
        netns: None,
        container_id: cid,
    };
    let why = reason(pod.check(&ReadyCheck::Running, &exited).await);
    assert!(why.contains("has exited (code 7"), "{why}");

    let gone = Target {
        netns: None,
        container_id: "no-such-container".into(),
    };
    let why = reason(pod.check(&ReadyCheck::Running, &gone).await);
    assert!(
        why.starts_with("ContainerStatus no-such-container: NotFound"),
        "{why}"
    );
    Ok(())
}
