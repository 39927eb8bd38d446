//! The test environment itself, against a private containerd directly (no
//! shim): CRI answers, the test images are there, pods get a network and run
//! busybox containers, clients with a percent-encoded `:authority` work, and
//! containerd can be killed and restarted under running pods.

mod support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    ContainerState, ImageSpec, ImageStatusRequest, ListContainersRequest, ListImagesRequest,
    ListPodSandboxRequest, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, StatusRequest, StopContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn version_status_and_images() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let (mut rt, mut img) = containerd.cri();

    let version = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");

    let status = rt
        .status(StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .context("Status without status")?;
    for condition in ["RuntimeReady", "NetworkReady"] {
        let c = status
            .conditions
            .iter()
            .find(|c| c.r#type == condition)
            .with_context(|| format!("no {condition} condition in {status:?}"))?;
        ensure!(c.status, "{condition} is false: {c:?}");
    }

    let images = img
        .list_images(ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    for want in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        ensure!(
            images.iter().any(|i| i.repo_tags.iter().any(|t| t == want)),
            "{want} not in ListImages: {images:?}"
        );
        let status = img
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: want.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner();
        ensure!(status.image.is_some(), "ImageStatus({want}) found nothing");
    }
    Ok(())
}

#[tokio::test]
async fn pod_with_busybox_container_lifecycle() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let (mut rt, _) = containerd.cri();

    let pod_config = pod_sandbox_config("env-smoke", &containerd.pod_log_root());
    let pod_id = run_pod(&mut rt, &pod_config).await?;

    let pod_status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("PodSandboxStatus without status")?;
    let ip = pod_status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    ensure!(!ip.is_empty(), "pod has no IP: {pod_status:?}");

    let mut config = container_config("main", &[]);
    config.command = sh("echo hi; sleep 1000");
    let container_id = start_container(&mut rt, &pod_id, &pod_config, &config).await?;
    ensure!(
        container_state(&mut rt, &container_id).await? == ContainerState::ContainerRunning,
        "container not running after StartContainer"
    );

    // The container's stdout reaches its CRI log file.
    let log_file = std::path::Path::new(&pod_config.log_directory).join(&config.log_path);
    wait_for(TIMEOUT, "'hi' in the container log", || {
        let log_file = log_file.clone();
        async move {
            std::fs::read_to_string(&log_file)
                .map(|s| s.contains(" stdout F hi"))
                .unwrap_or(false)
        }
    })
    .await?;

    let out = exec_sync(
        &mut rt,
        &container_id,
        &[
            "sh",
            "-c",
            "echo out-$((6*7)); echo err >&2; cat /proc/uptime >/dev/null",
        ],
        10,
    )
    .await?;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, "out-42\n");
    assert_eq!(out.stderr, "err\n");
    let out = exec_sync(&mut rt, &container_id, &["sh", "-c", "exit 3"], 10).await?;
    assert_eq!(out.exit_code, 3);

    // The pod's loopback is up (containers reach each other on 127.0.0.1).
    let out = exec_sync(&mut rt, &container_id, &["ip", "-o", "addr"], 10).await?;
    ensure!(
        out.stdout.contains("127.0.0.1") && out.stdout.contains(&ip),
        "pod addresses: {}",
        out.stdout
    );

    rt.stop_container(StopContainerRequest {
        container_id: container_id.clone(),
        timeout: 2,
    })
    .await?;
    ensure!(container_state(&mut rt, &container_id).await? == ContainerState::ContainerExited);
    rt.remove_container(RemoveContainerRequest {
        container_id: container_id.clone(),
    })
    .await?;
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await?;
    let left = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(left.is_empty(), "pods left: {left:?}");
    Ok(())
}

/// The containerd SIDECAR_SHIM_CONTAINERD asks for is the one that runs, as
/// it reports its version over CRI and as its process and its shims' are
/// that version's binaries (Debian's for 1.6, `hack/upstream`'s for 1.7 and
/// 2.3).
#[tokio::test]
async fn the_selected_containerd_and_its_shim_run() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let selected = std::env::var(CONTAINERD_ENV).unwrap_or_else(|_| "1.6".into());
    assert_eq!(containerd.selected_version(), selected);
    let version = containerd.version().trim_start_matches('v');
    ensure!(
        version.starts_with(&format!("{selected}.")),
        "{CONTAINERD_ENV}={selected}, containerd reports {version}"
    );
    let bin = match selected.as_str() {
        "1.6" => std::path::PathBuf::from("/usr/bin"),
        v => {
            let out = std::process::Command::new(hack("upstream"))
                .args(["dir", &format!("containerd-{v}")])
                .output()?;
            ensure!(out.status.success(), "hack/upstream dir containerd-{v}");
            std::path::PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let pid = containerd.pid().context("containerd not running")?;
    assert_eq!(exe(pid), bin.join("containerd"));

    // A pod's shim: a containerd-shim-runc-v2 in containerd's mount
    // namespace.
    let (mut rt, _) = containerd.cri();
    let pod_config = pod_sandbox_config("env-shim", &containerd.pod_log_root());
    run_pod(&mut rt, &pod_config).await?;
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let shims: Vec<_> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| ns(p).is_some() && ns(p) == ns(pid))
        .map(exe)
        .filter(|e| {
            e.file_name()
                .is_some_and(|n| n == "containerd-shim-runc-v2")
        })
        .collect();
    ensure!(!shims.is_empty(), "no shim in containerd's namespace");
    for shim in shims {
        assert_eq!(shim, bin.join("containerd-shim-runc-v2"));
    }
    Ok(())
}

#[tokio::test]
async fn clients_with_any_authority_work_against_containerd() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    for authority in [
        "localhost",
        // What older kubelets and crictl 1.26 send: the socket path,
        // percent-encoded. http::Uri refuses it, so this goes through the
        // wire-level rewriter.
        "%2Frun%2Fsidecar-shim%2Fsidecar-shim.sock",
        "%2Frun%2Fcontainerd%2Fcontainerd.sock",
    ] {
        let (mut rt, mut img) = cri_client_with_authority(containerd.socket(), authority);
        // Several calls on one connection exercise the HPACK state.
        for _ in 0..3 {
            let v = rt
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await
                .with_context(|| format!("Version with :authority {authority}"))?
                .into_inner();
            assert_eq!(v.runtime_name, "containerd");
            let images = img
                .list_images(ListImagesRequest { filter: None })
                .await
                .with_context(|| format!("ListImages with :authority {authority}"))?
                .into_inner()
                .images;
            ensure!(images.len() >= 2);
        }
    }
    Ok(())
}

#[tokio::test]
async fn containerd_kill_and_restart_keeps_running_pods() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let (mut rt, _) = containerd.cri();
    let pod_config = pod_sandbox_config("restart", &containerd.pod_log_root());
    let pod_id = run_pod(&mut rt, &pod_config).await?;
    let mut config = container_config("main", &[]);
    config.command = sh("sleep 1000");
    let container_id = start_container(&mut rt, &pod_id, &pod_config, &config).await?;

    containerd.kill()?;
    ensure!(rt
        .version(VersionRequest {
            version: "v1".into()
        })
        .await
        .is_err());
    containerd.restart().await?;

    // A new client: the old connection died with containerd.
    let (mut rt, _) = containerd.cri();
    let containers = rt
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    ensure!(
        containers.iter().any(|c| c.id == container_id),
        "container lost over the restart: {containers:?}"
    );
    ensure!(container_state(&mut rt, &container_id).await? == ContainerState::ContainerRunning);
    let out = exec_sync(&mut rt, &container_id, &["echo", "still here"], 10).await?;
    assert_eq!(out.stdout, "still here\n");
    Ok(())
}

#[tokio::test]
async fn dropping_the_containerd_cleans_up() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let (mut rt, _) = containerd.cri();
    let pod_config = pod_sandbox_config("cleanup", &containerd.pod_log_root());
    let pod_id = run_pod(&mut rt, &pod_config).await?;
    let mut config = container_config("main", &[]);
    config.command = sh("sleep 1000");
    start_container(&mut rt, &pod_id, &pod_config, &config).await?;

    let dir = containerd.dir().to_path_buf();
    let bridge = std::fs::read_to_string(dir.join("cni/bridge"))?
        .trim()
        .to_string();
    let holder: u32 = std::fs::read_to_string(dir.join("ns/holder.pid"))?
        .trim()
        .parse()?;
    let containerd_pid = containerd.pid().context("containerd not running")?;
    drop(containerd);

    // No process (shim, pause, container) mentions the pod any more.
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            ensure!(
                !cmdline.contains(&pod_id) && !cmdline.contains(&dir.display().to_string()),
                "process {:?} left: {cmdline}",
                entry.file_name()
            );
        }
    }

    ensure!(!dir.exists(), "{} left behind", dir.display());
    ensure!(!pid_alive(holder), "namespace holder {holder} still runs");
    ensure!(!pid_alive(containerd_pid), "containerd still runs");
    ensure!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "bridge {bridge} left behind"
    );
    // Nothing of ours is still mounted in this namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under {}",
        dir.display()
    );
    Ok(())
}

/// The rewriting client really puts the exact string on the wire: a fake
/// server reads the client's first request headers and decodes them.
#[tokio::test]
async fn percent_encoded_authority_is_sent_verbatim() -> Result<()> {
    use tokio::io::AsyncReadExt;

    let dir = tempfile::Builder::new()
        .prefix("sshim-")
        .tempdir_in("/tmp")?;
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let authority = "%2Frun%2Fsidecar-shim%2Fsidecar-shim.sock";
    let (mut rt, _) = cri_client_with_authority(&socket, authority);
    let call = tokio::spawn(async move {
        rt.version(VersionRequest {
            version: "v1".into(),
        })
        .await
    });

    let (mut conn, _) = tokio::time::timeout(TIMEOUT, listener.accept()).await??;
    let mut buf = Vec::new();
    let headers = tokio::time::timeout(TIMEOUT, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            ensure!(n > 0, "client closed before sending headers");
            buf.extend_from_slice(&chunk[..n]);
            // Preface, then frames; look for the first complete HEADERS.
            let mut at = 24;
            while buf.len() >= at + 9 {
                let len = (usize::from(buf[at]) << 16)
                    | (usize::from(buf[at + 1]) << 8)
                    | usize::from(buf[at + 2]);
                if buf.len() < at + 9 + len {
                    break;
                }
                if buf[at + 3] == 0x1 {
                    ensure!(buf[at + 4] & 0x4 != 0, "headers split over frames");
                    let block = &buf[at + 9..at + 9 + len];
                    return loona_hpack::Decoder::new()
                        .decode(block)
                        .map_err(|e| anyhow::anyhow!("{e}"));
                }
                at += 9 + len;
            }
        }
    })
    .await??;
    call.abort();

    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get(":authority").as_deref(), Some(authority));
    assert_eq!(
        get(":path").as_deref(),
        Some("/runtime.v1.RuntimeService/Version")
    );
    assert_eq!(get(":method").as_deref(), Some("POST"));
    assert_eq!(get("content-type").as_deref(), Some("application/grpc"));
    Ok(())
}

/// The ShimProcess helper: the built binary starts against the private
/// containerd, accepts, relays a call, exits cleanly on SIGTERM and can be
/// SIGKILLed.
#[tokio::test]
async fn shim_process_helper_starts_relays_and_stops() -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("sidecar-shim.sock");

    let mut shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let (mut rt, _) = shim.cri();
    let v = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(v.runtime_name, "containerd");
    let status = shim.terminate().await?;
    ensure!(status.success(), "shim exited with {status} on SIGTERM");

    let mut shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let status = shim.kill9().await?;
    ensure!(!status.success());
    ensure!(shim.log().contains("=== sidecar-shim --listen"));
    Ok(())
}
