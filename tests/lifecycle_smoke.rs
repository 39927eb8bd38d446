//! The lifecycle end to end through the shim binary, driven by plain CRI
//! calls in kubelet's order; times and states come from containerd itself and
//! from what the containers recorded.

mod support;

use std::time::Duration;

use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatusRequest,
    CreateContainerRequest, ListContainersRequest, Mount, StartContainerRequest,
    StopContainerRequest,
};
use support::*;

/// containerd's view of a container (bypassing the shim).
async fn truth(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    id: &str,
) -> k8s_cri::v1::ContainerStatus {
    rt.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

fn futures_lite<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Uptime seconds a container wrote to a file, if it did.
fn recorded(path: &std::path::Path) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_before_sidecar_is_deferred_until_the_sidecar_port_opens() {
    let containerd = PrivateContainerd::start().await.expect("containerd");
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[])
        .await
        .expect("shim");
    let (mut via_shim, _) = cri_client(&listen);
    let (mut direct, _) = containerd.cri();
    let shared = containerd.dir().join("shared");
    std::fs::create_dir_all(&shared).unwrap();

    let mut pod = pod_sandbox_config("app-first", &containerd.pod_log_root());
    pod.annotations
        .insert("sidecar-shim.io/sidecars".into(), "proxy".into());
    pod.annotations
        .insert("sidecar-shim.io/ready.proxy".into(), "tcp://:8080".into());
    let pod_id = run_pod(&mut via_shim, &pod).await.expect("pod");
    let mount = Mount {
        container_path: "/shared".into(),
        host_path: shared.display().to_string(),
        ..Default::default()
    };

    // Spec order [app, proxy], as kubelet starts them: one at a time.
    let mut app = container_config("app", &[]);
    app.command = sh("cat /proc/uptime > /shared/app.start; sleep 1000");
    app.mounts = vec![mount.clone()];
    let app_id = via_shim
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(app),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect("create app")
        .into_inner()
        .container_id;
    let started = std::time::Instant::now();
    via_shim
        .start_container(StartContainerRequest {
            container_id: app_id.clone(),
        })
        .await
        .expect("app's start is answered (deferred)");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not held: kubelet would deadlock"
    );
    // kubelet must read it as running, everywhere it looks.
    let seen = via_shim
        .container_status(ContainerStatusRequest {
            container_id: app_id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(seen.state, ContainerState::ContainerRunning as i32);
    assert_eq!(
        truth(&mut direct, &app_id).await.state,
        ContainerState::ContainerCreated as i32
    );
    let running = via_shim
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        running.containers.iter().any(|c| c.id == app_id),
        "deferred app listed as running"
    );
    let err = exec_sync(&mut via_shim, &app_id, &["true"], 5)
        .await
        .expect_err("exec refused");
    assert!(format!("{err:#}").contains("has not started"), "{err:#}");

    let mut proxy = container_config("proxy", &[]);
    proxy.command =
        sh("sleep 1; cat /proc/uptime > /shared/proxy.listen; exec nc -ll -p 8080 -e true");
    proxy.mounts = vec![mount];
    let proxy_id = via_shim
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(proxy),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect("create proxy")
        .into_inner()
        .container_id;
    via_shim
        .start_container(StartContainerRequest {
            container_id: proxy_id.clone(),
        })
        .await
        .expect("start proxy");

    // The app really starts once the port is open.
    wait_for(Duration::from_secs(30), "app really running", || {
        let mut d = direct.clone();
        let id = app_id.clone();
        async move { truth(&mut d, &id).await.state == ContainerState::ContainerRunning as i32 }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nproxy: {:?}\nproxy log: {:?}\nshim log:\n{}",
            futures_lite(truth(&mut direct.clone(), &proxy_id)),
            std::fs::read_to_string(std::path::Path::new(&pod.log_directory).join("proxy/0.log")),
            shim.log()
        )
    });
    wait_for(Duration::from_secs(10), "app recorded its start", || {
        let p = shared.join("app.start");
        async move { recorded(&p).is_some() }
    })
    .await
    .unwrap();
    let listen_at = recorded(&shared.join("proxy.listen")).expect("proxy recorded");
    let app_at = recorded(&shared.join("app.start")).expect("app recorded");
    assert!(
        app_at >= listen_at,
        "app started at {app_at}, proxy listened at {listen_at}"
    );

    // Stop: the app (normal) first; then the sidecar goes too.
    via_shim
        .stop_container(StopContainerRequest {
            container_id: app_id.clone(),
            timeout: 2,
        })
        .await
        .expect("stop app");
    via_shim
        .stop_container(StopContainerRequest {
            container_id: proxy_id.clone(),
            timeout: 2,
        })
        .await
        .expect("stop proxy");
    assert_eq!(
        truth(&mut direct, &proxy_id).await.state,
        ContainerState::ContainerExited as i32
    );
    drop(shim);
}
