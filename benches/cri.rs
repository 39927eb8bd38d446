//! Forwarding overhead: the same CRI calls sent straight to containerd,
//! through a plain byte relay (socat: the floor of one extra Unix-socket hop)
//! and through sidecar-shim, side by side in one run.
//!
//! Run by `hack/bench`, which starts a private containerd, the relay, the
//! shim and a second shim with metrics on (`--metrics-listen`), and passes
//! their sockets:
//!
//! ```text
//! cargo bench --bench cri -- --direct SOCK --relay SOCK --shim SOCK --shim-pid PID
//!     [--metrics SOCK --metrics-pid PID --metrics-addr IP:PORT]
//!     [--containers 100] [--seconds 1.0] [--rounds 3]
//!     [--calls Version,ContainerStatus,ListContainers] [--concurrency 1,32]
//!     [--admin-load]
//! ```
//!
//! `--admin-load` keeps one client calling the shim's admin API (ListPods,
//! back to back, on `admin.sock` next to the shim's socket) for the whole
//! run, to show what admin calls cost the CRI relay on the shim's single
//! thread; it prints how many it made.
//!
//! With `--metrics-addr` it scrapes that shim at the end and compares the
//! calls it counted with the calls it was sent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
    ListContainersRequest, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint};

const IMAGE: &str = "localhost/sidecar-shim/busybox:test";

struct Args {
    targets: Vec<(&'static str, PathBuf)>,
    shim_pid: Option<u32>,
    metrics_pid: Option<u32>,
    metrics_addr: Option<std::net::SocketAddr>,
    containers: usize,
    seconds: f64,
    rounds: usize,
    calls: Vec<Call>,
    concurrency: Vec<usize>,
    admin_load: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        targets: vec![],
        shim_pid: None,
        metrics_pid: None,
        metrics_addr: None,
        containers: 100,
        seconds: 1.0,
        rounds: 3,
        calls: vec![Call::Version, Call::ContainerStatus, Call::ListContainers],
        concurrency: vec![1, 32],
        admin_load: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--direct" => args.targets.push(("direct", val().into())),
            "--relay" => args.targets.push(("relay", val().into())),
            "--shim" => args.targets.push(("shim", val().into())),
            "--shim-pid" => args.shim_pid = Some(val().parse().expect("pid")),
            "--metrics" => args.targets.push(("metrics", val().into())),
            "--metrics-pid" => args.metrics_pid = Some(val().parse().expect("pid")),
            "--metrics-addr" => args.metrics_addr = Some(val().parse().expect("IP:PORT")),
            "--containers" => args.containers = val().parse().expect("count"),
            "--seconds" => args.seconds = val().parse().expect("seconds"),
            "--rounds" => args.rounds = val().parse().expect("rounds"),
            "--calls" => {
                args.calls = val()
                    .split(',')
                    .map(|c| match c {
                        "Version" => Call::Version,
                        "ContainerStatus" => Call::ContainerStatus,
                        "ListContainers" => Call::ListContainers,
                        other => panic!("unknown call {other}"),
                    })
                    .collect()
            }
            "--concurrency" => {
                args.concurrency = val()
                    .split(',')
                    .map(|c| c.parse().expect("number"))
                    .collect()
            }
            "--admin-load" => args.admin_load = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !args.targets.is_empty(),
        "give at least one of --direct, --relay, --shim, --metrics"
    );
    args
}

async fn connect(path: PathBuf) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(channel(path).await).max_decoding_message_size(64 << 20)
}

async fn channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect")
}

/// ListPods on the shim's admin socket, back to back, until `stop` is set;
/// returns how many calls it made and for how long.
async fn admin_load(
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, Duration) {
    use sidecar_shim::admin::proto::{admin_client::AdminClient, ListPodsRequest};
    let mut client = AdminClient::new(channel(path).await);
    let start = Instant::now();
    let mut calls = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        client
            .list_pods(ListPodsRequest {})
            .await
            .expect("ListPods");
        calls += 1;
    }
    (calls, start.elapsed())
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    Version,
    ContainerStatus,
    ListContainers,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Version => "Version",
            Call::ContainerStatus => "ContainerStatus",
            Call::ListContainers => "ListContainers",
        }
    }
}

async fn one(client: &mut RuntimeServiceClient<Channel>, call: Call, id: &str) {
    let r = match call {
        Call::Version => client.version(VersionRequest::default()).await.map(drop),
        Call::ContainerStatus => client
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .map(drop),
        Call::ListContainers => client
            .list_containers(ListContainersRequest::default())
            .await
            .map(drop),
    };
    r.expect("call failed");
}

/// Run `conc` callers for `secs`; returns per-call latencies and calls/s.
async fn run(
    client: &RuntimeServiceClient<Channel>,
    call: Call,
    conc: usize,
    secs: f64,
    ids: &[String],
) -> (Vec<u64>, f64) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let mut client = client.clone();
        let ids = ids.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut i = w;
            while Instant::now() < until {
                let t = Instant::now();
                one(&mut client, call, &ids[i % ids.len()]).await;
                lat.push(t.elapsed().as_nanos() as u64);
                i += conc;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    (all, rate)
}

/// The sum of `sidecar_shim_calls_total` at http://ADDR/metrics (loopback).
async fn scrape_calls(addr: std::net::SocketAddr) -> std::io::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(addr.ip().is_loopback(), "only loopback is scraped");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("sidecar_shim_calls_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn setup(direct: &mut RuntimeServiceClient<Channel>, n: usize) -> (String, Vec<String>) {
    let uid = format!("bench-{}", std::process::id());
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: uid.clone(),
            namespace: "bench".into(),
            uid: uid.clone(),
            attempt: 0,
        }),
        hostname: "bench".into(),
        log_directory: std::env::temp_dir().join(&uid).display().to_string(),
        ..Default::default()
    };
    let pod = direct
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let c = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: format!("c{i}"),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "3600".into()],
            log_path: format!("c{i}.log"),
            labels: [("io.kubernetes.container.name".to_string(), format!("c{i}"))].into(),
            ..Default::default()
        };
        let id = direct
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(c),
                sandbox_config: Some(config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        ids.push(id);
    }
    (pod, ids)
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let direct_path = args
            .targets
            .iter()
            .find(|t| t.0 == "direct")
            .map(|t| t.1.clone())
            .unwrap_or(args.targets[0].1.clone());
        let mut direct = connect(direct_path).await;
        eprintln!("creating {} containers…", args.containers);
        let t = Instant::now();
        let (pod, ids) = setup(&mut direct, args.containers).await;
        eprintln!("created in {:.1?}", t.elapsed());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = args.admin_load.then(|| {
            let shim = &args.targets.iter().find(|t| t.0 == "shim").expect("--admin-load needs --shim").1;
            tokio::spawn(admin_load(shim.with_file_name("admin.sock"), stop.clone()))
        });
        let mut clients = Vec::new();
        for (name, path) in &args.targets {
            clients.push((*name, connect(path.clone()).await));
        }
        println!(
            "{:<16} {:>4}  {:<7} {:>9} {:>9} {:>10}",
            "call", "conc", "via", "p50 µs", "p99 µs", "calls/s"
        );
        let mut ratios = Vec::new();
        // Calls sent along each path.
        let mut sent = vec![0usize; clients.len()];
        for &call in &args.calls {
            for &conc in &args.concurrency {
                // Warm up every path, then alternate them round by round so
                // that drift on the shared machine hits all alike.
                for (i, (_, c)) in clients.iter().enumerate() {
                    sent[i] += run(c, call, conc, 0.2, &ids).await.0.len();
                }
                let mut lat: Vec<Vec<u64>> = vec![Vec::new(); clients.len()];
                let mut rates: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
                for round in 0..args.rounds {
                    for k in 0..clients.len() {
                        let i = (k + round) % clients.len();
                        let (l, r) = run(&clients[i].1, call, conc, args.seconds, &ids).await;
                        sent[i] += l.len();
                        lat[i].extend(l);
                        rates[i].push(r);
                    }
                }
                let mut p50 = Vec::new();
                let mut rate = Vec::new();
                for (i, (name, _)) in clients.iter().enumerate() {
                    lat[i].sort_unstable();
                    rates[i].sort_by(f64::total_cmp);
                    let r = rates[i][rates[i].len() / 2];
                    println!(
                        "{:<16} {:>4}  {:<7} {:>9.1} {:>9.1} {:>10.0}",
                        call.name(),
                        conc,
                        name,
                        pct(&lat[i], 0.5),
                        pct(&lat[i], 0.99),
                        r
                    );
                    p50.push((*name, pct(&lat[i], 0.5)));
                    rate.push((*name, r));
                }
                ratios.push((call, conc, p50, rate));
            }
        }
        println!();
        println!(
            "{:<16} {:>4}  {:>18} {:>18} {:>18} {:>18}",
            "call",
            "conc",
            "p50 shim/direct",
            "p50 shim/relay",
            "rate shim/direct",
            "rate shim/relay"
        );
        let get = |v: &Vec<(&str, f64)>, n: &str| v.iter().find(|x| x.0 == n).map(|x| x.1);
        let ratio = |v: &Vec<(&str, f64)>, a: &str, b: &str| match (get(v, a), get(v, b)) {
            (Some(x), Some(y)) => format!("{:.3}", x / y),
            _ => "-".into(),
        };
        for (call, conc, p50, rate) in &ratios {
            println!(
                "{:<16} {:>4}  {:>18} {:>18} {:>18} {:>18}",
                call.name(),
                conc,
                ratio(p50, "shim", "direct"),
                ratio(p50, "shim", "relay"),
                ratio(rate, "shim", "direct"),
                ratio(rate, "shim", "relay"),
            );
        }
        if let Some(load) = load {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (calls, took) = load.await.expect("admin load");
            println!(
                "\nadmin load: {calls} ListPods calls in {:.1?} ({:.0}/s), alongside every call above",
                took,
                calls as f64 / took.as_secs_f64()
            );
        }
        if args.targets.iter().any(|t| t.0 == "metrics") {
            println!();
            println!(
                "{:<16} {:>4}  {:>18} {:>18} {:>18} {:>18}",
                "metrics on:",
                "conc",
                "p50 metrics/relay",
                "rate metrics/relay",
                "p50 metrics/shim",
                "rate metrics/shim"
            );
            for (call, conc, p50, rate) in &ratios {
                println!(
                    "{:<16} {:>4}  {:>18} {:>18} {:>18} {:>18}",
                    call.name(),
                    conc,
                    ratio(p50, "metrics", "relay"),
                    ratio(rate, "metrics", "relay"),
                    ratio(p50, "metrics", "shim"),
                    ratio(rate, "metrics", "shim"),
                );
            }
        }
        println!();
        for (what, pid) in [("shim", args.shim_pid), ("metrics shim", args.metrics_pid)] {
            let Some(pid) = pid else { continue };
            match peak_rss_kib(pid) {
                Some(kib) => println!("{what} peak RSS (VmHWM): {:.1} MiB", kib as f64 / 1024.0),
                None => println!("{what} peak RSS: process {pid} not readable"),
            }
        }
        if let (Some(addr), Some(i)) = (
            args.metrics_addr,
            args.targets.iter().position(|t| t.0 == "metrics"),
        ) {
            match scrape_calls(addr).await {
                Ok(counted) => println!(
                    "metrics shim counted {counted} calls in sidecar_shim_calls_total; the bench sent it {}",
                    sent[i]
                ),
                Err(e) => println!("scraping {addr} failed: {e}"),
            }
        }
        direct
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .ok();
        direct
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .ok();
    });
}
