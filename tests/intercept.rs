//! Calls the shim answers itself share a client connection with relayed
//! calls: answers are injected between relayed frames and HTTP/2 flow control
//! stays right in both directions. The proxy runs in-process with a test
//! interceptor (the lifecycle's real one is exercised by the lifecycle tests)
//! in front of a real private containerd.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerFilter, ContainerState, CreateContainerRequest, ListContainersRequest, VersionRequest,
    VersionResponse,
};
use prost::Message;
use sidecar_shim::proxy::{self, CallFuture, Interceptor, LocalCall};
use support::*;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint, Uri};

const VERSION: &str = "/runtime.v1.RuntimeService/Version";

/// Answers Version itself: `runtime_name` is the request's `version` string
/// repeated to the length given after a `size=` prefix, or an error for
/// `fail`, or never for `hang` (reporting when the call is dropped).
struct TestInterceptor {
    dropped: mpsc::UnboundedSender<()>,
}

struct DropSignal(mpsc::UnboundedSender<()>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Interceptor for TestInterceptor {
    fn intercepts(&self, method: &str) -> bool {
        method == VERSION
    }
    fn call(&self, call: LocalCall) -> CallFuture {
        let dropped = self.dropped.clone();
        Box::pin(async move {
            let req = VersionRequest::decode(call.message)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            if req.version == "fail" {
                return Err(tonic::Status::failed_precondition(
                    "sidecar not ready: proxy",
                ));
            }
            if req.version == "hang" {
                let _guard = DropSignal(dropped);
                std::future::pending::<()>().await;
            }
            let size: usize = req
                .version
                .strip_prefix("size=")
                .map(|s| s.split(';').next().unwrap_or("0").parse().unwrap_or(0))
                .unwrap_or(0);
            let resp = VersionResponse {
                version: "local".into(),
                runtime_name: "x".repeat(size),
                runtime_version: req.version.len().to_string(),
                runtime_api_version: "v1".into(),
            };
            Ok(Bytes::from(resp.encode_to_vec()))
        })
    }
}

struct Harness {
    containerd: PrivateContainerd,
    listen: std::path::PathBuf,
    dropped: mpsc::UnboundedReceiver<()>,
    _shutdown: oneshot::Sender<()>,
}

async fn harness() -> Harness {
    let containerd = PrivateContainerd::start().await.expect("containerd");
    let listen = containerd.dir().join("shim.sock");
    let listener = tokio::net::UnixListener::bind(&listen).expect("bind");
    let (tx, dropped) = mpsc::unbounded_channel();
    let (shutdown, rx) = oneshot::channel::<()>();
    let runtime = containerd.socket().to_path_buf();
    tokio::spawn(proxy::serve_with(
        listener,
        runtime,
        Arc::new(TestInterceptor { dropped: tx }),
        // Metrics on: the relay also follows response header blocks, which
        // must leave every frame as it was.
        Arc::new(sidecar_shim::metrics::Metrics::new()),
        async move {
            let _ = rx.await;
        },
        proxy::Options {
            drain: Duration::from_secs(1),
            ..proxy::Options::default()
        },
    ));
    Harness {
        containerd,
        listen,
        dropped,
        _shutdown: shutdown,
    }
}

/// Many containers, so that ListContainers answers cross flow-control windows.
async fn create_containers(h: &Harness, n: usize) -> String {
    let (mut rt, _) = h.containerd.cri();
    let config = pod_sandbox_config("intercept", &h.containerd.pod_log_root());
    let pod = run_pod(&mut rt, &config).await.expect("pod");
    for i in 0..n {
        rt.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(&format!("c{i}"), &["sleep", "1000"])),
            sandbox_config: Some(config.clone()),
        })
        .await
        .expect("create");
    }
    pod
}

/// A client whose receive windows are HTTP/2's defaults (64 KiB for the
/// connection and each stream), so that every large answer has to wait for
/// window updates.
fn small_window_client(socket: &std::path::Path) -> RuntimeServiceClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .initial_connection_window_size(65_535)
        .initial_stream_window_size(65_535)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
    RuntimeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_interleave_with_relayed_calls_on_one_connection() {
    interleave(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_interleave_with_relayed_calls_under_small_windows() {
    interleave(true).await
}

async fn interleave(small_windows: bool) {
    let h = harness().await;
    let pod = create_containers(&h, 150).await;
    let (direct, _) = h.containerd.cri();
    let mut direct_list = direct.clone();
    let expected = direct_list
        .list_containers(ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers
        .len();
    assert_eq!(expected, 150);

    // One client connection carries everything, as kubelet's does.
    let client = if small_windows {
        small_window_client(&h.listen)
    } else {
        cri_client(&h.listen).0
    };
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut c = client.clone();
        let pod = pod.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                if (i + round) % 2 == 0 {
                    // Local answers of 40 KiB to 400 KiB: together far more than
                    // the client's 64 KiB connection window.
                    let size = 40 * 1024 * (1 + (i + round) % 10);
                    let resp = c
                        .version(VersionRequest {
                            version: format!("size={size}"),
                        })
                        .await
                        .expect("local Version")
                        .into_inner();
                    assert_eq!(resp.version, "local");
                    assert_eq!(resp.runtime_name.len(), size);
                } else {
                    let resp = c
                        .list_containers(ListContainersRequest {
                            filter: Some(ContainerFilter {
                                pod_sandbox_id: pod.clone(),
                                ..Default::default()
                            }),
                        })
                        .await
                        .expect("relayed ListContainers")
                        .into_inner();
                    assert_eq!(resp.containers.len(), 150);
                    assert!(resp
                        .containers
                        .iter()
                        .all(|c| c.state == ContainerState::ContainerCreated as i32));
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("calls finish: no flow-control stall")
            .expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_local_requests_give_their_flow_control_credit_back() {
    let h = harness().await;
    let (mut client, _) = cri_client(&h.listen);
    // 24 requests of 1 MiB each to a local method: if the proxy kept the
    // credit the client spent on them, the client's connection window to the
    // runtime would run dry and the relayed call after them would stall.
    let big = format!("size=1;{}", "y".repeat(1 << 20));
    for _ in 0..24 {
        let resp = client
            .version(VersionRequest {
                version: big.clone(),
            })
            .await
            .expect("local Version")
            .into_inner();
        assert_eq!(resp.runtime_version, big.len().to_string());
    }
    let list = tokio::time::timeout(
        Duration::from_secs(20),
        client.list_containers(ListContainersRequest::default()),
    )
    .await
    .expect("relayed call after 24 MiB of local requests does not stall");
    assert!(list.is_ok(), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_errors_reach_the_client_and_cancelled_calls_are_dropped() {
    let mut h = harness().await;
    let (mut client, _) = cri_client(&h.listen);
    let err = client
        .version(VersionRequest {
            version: "fail".into(),
        })
        .await
        .expect_err("local error");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "sidecar not ready: proxy");

    // A held call the client gives up on (its deadline passes) is dropped.
    let mut req = tonic::Request::new(VersionRequest {
        version: "hang".into(),
    });
    req.set_timeout(Duration::from_millis(300));
    let err = client.version(req).await.expect_err("deadline");
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err:?}");
    tokio::time::timeout(Duration::from_secs(10), h.dropped.recv())
        .await
        .expect("the held call's future is dropped after the client resets it");

    // The connection goes on working.
    let v = client
        .version(VersionRequest {
            version: "size=3".into(),
        })
        .await
        .unwrap();
    assert_eq!(v.into_inner().runtime_name, "xxx");
    client
        .list_containers(ListContainersRequest::default())
        .await
        .expect("relayed");
}
