//! The Prometheus metrics (`--metrics-listen`), end to end: the
//! `sidecar-shim` binary in front of a private containerd, scraped over
//! loopback like Prometheus would.
//!
//! What the metrics say is compared with what cannot be the shim's own
//! bookkeeping: the answers the clients got (and containerd gives the same
//! calls directly), the kubelet simulator's record of its calls,
//! containerd's timestamps, and what the containers recorded themselves
//! (`/proc/uptime`).
//!
//! * calls by method and code, latencies, a cancelled call, the runtime
//!   killed and restarted (UNAVAILABLE answers, one reconnect);
//! * a held start, a deferred start, an ordered shutdown and a Job
//!   completion driven by the kubelet simulator: the held, hold duration,
//!   deferral, readiness and stop metrics;
//! * without the flag nothing listens; a taken port fails startup.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use k8s_cri::v1::{
    ContainerState, ContainerStatus, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ListImagesRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use support::kubelet::*;
use support::state_of as state;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous: a loaded 2-core machine runs several of these at once.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Slack when comparing a container's `/proc/uptime` reading (10 ms steps)
/// or a containerd timestamp with the shim's measurements.
const CLOCK_SLACK: f64 = 0.05;
const PORT: u16 = 8080;
const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RUNTIME: &str = "runtime.v1.RuntimeService/";
const METRICS_FLAG: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

// ---------------------------------------------------------------------------
// Scraping

/// The address the shim logged for its metrics listener.
async fn metrics_address(shim: &ShimProcess) -> Result<SocketAddr> {
    const MARK: &str = "serving Prometheus metrics on http://";
    wait_for_value(TIMEOUT, "the shim to log its metrics address", || {
        let log = shim.log();
        async move {
            let Some(line) = log.lines().find(|l| l.contains(MARK)) else {
                return Ok(None);
            };
            let rest = &line[line.find(MARK).expect("found") + MARK.len()..];
            let addr = rest.split("/metrics").next().unwrap_or_default();
            Ok(Some(addr.parse::<SocketAddr>().with_context(|| {
                format!("address in the log line {line:?}")
            })?))
        }
    })
    .await
}

/// A plain HTTP/1.1 GET over loopback: (status, content type, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    ensure!(addr.ip().is_loopback(), "only loopback is scraped: {addr}");
    let mut stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut raw))
        .await
        .context("response timed out")??;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok((status, content_type, body.to_string()))
}

/// One scrape: every sample by metric name and label set.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    async fn take(addr: SocketAddr) -> Result<Scrape> {
        let (status, content_type, body) = http_get(addr, "/metrics").await?;
        ensure!(status == 200, "GET /metrics: {status}\n{body}");
        ensure!(
            content_type.starts_with("application/openmetrics-text"),
            "content type {content_type:?}"
        );
        ensure!(body.ends_with("# EOF\n"), "no # EOF:\n{body}");
        Scrape::parse(body)
    }

    fn parse(text: String) -> Result<Scrape> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').context("no value")?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').context("unclosed labels")?;
                    let labels = inner
                        .split("\",")
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").context("label")?;
                            Ok((k.to_string(), v.trim_end_matches('"').to_string()))
                        })
                        .collect::<Result<BTreeMap<_, _>>>()
                        .with_context(|| format!("labels of {line:?}"))?;
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Ok(Scrape { text, samples })
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|s| s.2)
    }

    /// A sample that must be there.
    fn must(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.get(name, labels)
            .with_context(|| format!("no {name} {labels:?} in\n{}", self.text))
    }

    /// `sidecar_shim_calls_total` by (method, code).
    fn calls(&self) -> BTreeMap<(String, String), f64> {
        self.samples
            .iter()
            .filter(|(n, ..)| n == "sidecar_shim_calls_total")
            .map(|(_, l, v)| ((l["method"].clone(), l["code"].clone()), *v))
            .collect()
    }

    fn held(&self, call: &str) -> Result<f64> {
        self.must("sidecar_shim_held_calls", &[("call", call)])
    }

    /// (count, sum) of the hold durations of `call`.
    fn holds(&self, call: &str) -> Result<(f64, f64)> {
        Ok((
            self.must(
                "sidecar_shim_hold_duration_seconds_count",
                &[("call", call)],
            )?,
            self.must("sidecar_shim_hold_duration_seconds_sum", &[("call", call)])?,
        ))
    }

    fn decisions(&self, decision: &str) -> f64 {
        self.get(
            "sidecar_shim_lifecycle_decisions_total",
            &[("decision", decision)],
        )
        .unwrap_or(0.0)
    }

    fn checks(&self, check: &str, result: &str) -> f64 {
        self.get(
            "sidecar_shim_readiness_checks_total",
            &[("check", check), ("result", result)],
        )
        .unwrap_or(0.0)
    }

    fn stops(&self, reason: &str) -> f64 {
        self.get("sidecar_shim_sidecar_stops_total", &[("reason", reason)])
            .unwrap_or(0.0)
    }
}

/// Scrape until `cond` holds.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&Scrape) -> bool,
) -> Result<Scrape> {
    wait_for_value(TIMEOUT, what, || {
        let cond = &cond;
        async move {
            let s = Scrape::take(addr).await?;
            Ok(cond(&s).then_some(s))
        }
    })
    .await
}

/// Calls made, by (method label, code name), as the metrics should count them.
#[derive(Default)]
struct Expected(BTreeMap<(String, String), f64>);

impl Expected {
    fn add(&mut self, method: &str, code: tonic::Code) {
        *self.0.entry(key(method, &code_name(code))).or_default() += 1.0;
    }

    /// A `runtime.v1.RuntimeService` method.
    fn add_rt(&mut self, method: &str, code: tonic::Code) {
        self.add(&format!("{RUNTIME}{method}"), code);
    }
}

fn key(method: &str, code: &str) -> (String, String) {
    (method.to_string(), code.to_string())
}

/// The code name of a status the way the metrics spell it.
fn code_name(code: tonic::Code) -> String {
    sidecar_shim::metrics::code_label(code).to_string()
}

// ---------------------------------------------------------------------------
// Listening sockets, from the kernel

/// The TCP sockets in LISTEN state that process `pid` holds, by local
/// address: its socket descriptors matched with its network namespace's
/// `/proc/PID/net/tcp{,6}`.
fn tcp_listeners(pid: u32) -> Result<Vec<SocketAddr>> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let link = std::fs::read_link(fd?.path()).unwrap_or_default();
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            inodes.push(inode.to_string());
        }
    }
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))?;
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            out.push(parse_proc_addr(f[1], v6).context("local address")?);
        }
    }
    Ok(out)
}

/// `0100007F:1F90` (IPv4, bytes in host order) or the 32-digit IPv6 form.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::swap_bytes))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip: std::net::IpAddr = if v6 {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        std::net::Ipv6Addr::from(b).into()
    } else {
        std::net::Ipv4Addr::from(*words.first()?).into()
    };
    Some(SocketAddr::new(ip, port))
}

// ---------------------------------------------------------------------------
// 1. Calls by method and code

/// CRI calls through the shim, successful and failing, relayed and answered
/// by the lifecycle, one cancelled by its client: `sidecar_shim_calls_total`
/// holds exactly those, under the codes the client got (which containerd
/// gives the same calls directly), and the latency histogram counts each
/// call once, the cancelled one for as long as it ran. Then containerd is
/// killed: calls get UNAVAILABLE from the shim, counted as such; once it is
/// back the next call goes through and the reconnect is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_counted_by_method_and_code() -> Result<()> {
    let mut containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &METRICS_FLAG).await?;
    let addr = metrics_address(&shim).await?;

    let first = Scrape::take(addr).await?;
    ensure!(first.calls().is_empty(), "calls before any: {first:?}");
    assert_eq!(
        first.must("sidecar_shim_runtime_reconnects_total", &[])?,
        0.0
    );
    let (status, _, body) = http_get(addr, "/").await?;
    assert_eq!(status, 404, "{body}");

    let (mut rt, mut img) = shim.cri();
    let (mut direct, _) = containerd.cri();
    let mut want = Expected::default();

    let began = Instant::now();
    for _ in 0..3 {
        rt.version(VersionRequest::default()).await?;
        want.add_rt("Version", tonic::Code::Ok);
    }
    let versions_took = began.elapsed().as_secs_f64();
    // A status of an unknown container: containerd answers NOT_FOUND, and so
    // does the shim (relayed).
    let unknown = ContainerStatusRequest {
        container_id: "no-such-container".into(),
        verbose: false,
    };
    let code = direct
        .container_status(unknown.clone())
        .await
        .expect_err("unknown container")
        .code();
    assert_eq!(code, tonic::Code::NotFound);
    for _ in 0..2 {
        let got = rt
            .container_status(unknown.clone())
            .await
            .expect_err("unknown");
        assert_eq!(got.code(), code, "{got:?}");
        want.add_rt("ContainerStatus", got.code());
    }
    // StartContainer is always answered by the lifecycle (which forwards
    // calls of unmanaged containers itself).
    let start_unknown = StartContainerRequest {
        container_id: "no-such-container".into(),
    };
    let code = direct
        .start_container(start_unknown.clone())
        .await
        .expect_err("unknown container")
        .code();
    let got = rt
        .start_container(start_unknown)
        .await
        .expect_err("unknown");
    assert_eq!(got.code(), code, "{got:?}");
    want.add_rt("StartContainer", got.code());

    img.list_images(ListImagesRequest::default()).await?;
    want.add("runtime.v1.ImageService/ListImages", tonic::Code::Ok);

    // An old service: counted as "other", under the code containerd gives.
    let old = |socket: &Path| {
        let channel = channel_with_authority(socket, "localhost");
        k8s_cri::v1alpha2::runtime_service_client::RuntimeServiceClient::new(channel)
    };
    let old_direct = old(containerd.socket())
        .version(k8s_cri::v1alpha2::VersionRequest::default())
        .await;
    let old_shim = old(shim.listen())
        .version(k8s_cri::v1alpha2::VersionRequest::default())
        .await;
    let code_of =
        |r: &Result<_, tonic::Status>| r.as_ref().err().map_or(tonic::Code::Ok, |s| s.code());
    assert_eq!(code_of(&old_shim), code_of(&old_direct));
    want.add("other", code_of(&old_shim));

    // A pod and a container, created, started, exec'd into, stopped, removed.
    let config = pod_sandbox_config("metrics-calls", &containerd.pod_log_root());
    let pod = run_pod(&mut rt, &config).await?;
    want.add_rt("RunPodSandbox", tonic::Code::Ok);
    let container = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", &["sleep", "1000"])),
            sandbox_config: Some(config.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    want.add_rt("CreateContainer", tonic::Code::Ok);
    rt.start_container(StartContainerRequest {
        container_id: container.clone(),
    })
    .await?;
    want.add_rt("StartContainer", tonic::Code::Ok);
    let out = exec_sync(&mut rt, &container, &["echo", "hi"], 10).await?;
    assert_eq!(out.stdout, "hi\n");
    want.add_rt("ExecSync", tonic::Code::Ok);

    // A call its client gives up on (no deadline sent: the client just
    // resets the stream): counted CANCELLED, its latency until the reset.
    let cancelled_after = Duration::from_millis(300);
    let gave_up = tokio::time::timeout(
        cancelled_after,
        rt.exec_sync(ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec!["sleep".into(), "5".into()],
            timeout: 0,
        }),
    )
    .await;
    ensure!(gave_up.is_err(), "sleep 5 returned: {gave_up:?}");
    want.add_rt("ExecSync", tonic::Code::Cancelled);

    rt.stop_container(StopContainerRequest {
        container_id: container.clone(),
        timeout: 0,
    })
    .await?;
    want.add_rt("StopContainer", tonic::Code::Ok);
    rt.remove_container(RemoveContainerRequest {
        container_id: container.clone(),
    })
    .await?;
    want.add_rt("RemoveContainer", tonic::Code::Ok);
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    want.add_rt("StopPodSandbox", tonic::Code::Ok);
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    want.add_rt("RemovePodSandbox", tonic::Code::Ok);

    // The reset reaches the shim a moment after the client gave up.
    let scrape = scrape_until(addr, "the calls to be counted", |s| s.calls() == want.0)
        .await
        .with_context(|| format!("want {:#?}", want.0))?;
    for (method, count) in [
        ("Version", 3.0),
        ("ContainerStatus", 2.0),
        ("StartContainer", 2.0),
        ("ExecSync", 2.0),
    ] {
        let method = format!("{RUNTIME}{method}");
        assert_eq!(
            scrape.must(
                "sidecar_shim_call_duration_seconds_count",
                &[("method", &method)]
            )?,
            count,
            "{method}"
        );
    }
    let exec_time = scrape.must(
        "sidecar_shim_call_duration_seconds_sum",
        &[("method", &format!("{RUNTIME}ExecSync"))],
    )?;
    ensure!(
        exec_time >= cancelled_after.as_secs_f64() - CLOCK_SLACK && exec_time < 5.0,
        "ExecSync took {exec_time} s in all, one of them cancelled after {cancelled_after:?}"
    );
    // The shim's time for the three Version calls is within what the
    // client measured around them.
    let version = format!("{RUNTIME}Version");
    let shim_took = scrape.must(
        "sidecar_shim_call_duration_seconds_sum",
        &[("method", &version)],
    )?;
    ensure!(
        shim_took > 0.0 && shim_took <= versions_took,
        "Version: {shim_took} s in the shim, {versions_took} s at the client"
    );
    assert_eq!(
        scrape.must(
            "sidecar_shim_call_duration_seconds_bucket",
            &[("le", "+Inf"), ("method", &version)]
        )?,
        3.0
    );

    // containerd killed: fresh connections (as a client reconnecting would
    // make) are answered UNAVAILABLE by the shim itself.
    containerd.kill()?;
    for _ in 0..2 {
        let (mut fresh, _) = shim.cri();
        let got = fresh
            .version(VersionRequest::default())
            .await
            .expect_err("containerd is down");
        assert_eq!(got.code(), tonic::Code::Unavailable, "{got:?}");
        want.add_rt("Version", tonic::Code::Unavailable);
    }
    containerd.restart().await?;
    let (mut fresh, _) = shim.cri();
    fresh.version(VersionRequest::default()).await?;
    want.add_rt("Version", tonic::Code::Ok);
    let scrape = Scrape::take(addr).await?;
    assert_eq!(scrape.calls(), want.0);
    assert_eq!(
        scrape.must("sidecar_shim_runtime_reconnects_total", &[])?,
        1.0
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Lifecycle metrics

/// containerd, the shim with metrics in front of it, the kubelet simulator
/// talking to the shim, and a host directory shared with the containers.
/// (Fields drop in order: kubelet, shim, containerd.)
struct Env {
    kubelet: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
    shared: PathBuf,
    metrics: SocketAddr,
}

impl Env {
    async fn start() -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let listen = containerd.dir().join("shim.sock");
        let shim = ShimProcess::start(&listen, containerd.socket(), &METRICS_FLAG).await?;
        let metrics = metrics_address(&shim).await?;
        let kubelet = Kubelet::with_config(
            shim.listen(),
            &containerd.pod_log_root(),
            KubeletConfig {
                initial_backoff: Duration::from_secs(1),
                ..Default::default()
            },
        );
        let shared = containerd.dir().join("shared");
        std::fs::create_dir_all(&shared)?;
        Ok(Env {
            kubelet,
            shim,
            containerd,
            shared,
            metrics,
        })
    }

    async fn truth(&self, id: &str) -> Result<ContainerStatus> {
        self.containerd.container_status(id).await
    }

    async fn scrape(&self) -> Result<Scrape> {
        Scrape::take(self.metrics).await
    }

    async fn scrape_until(&self, what: &str, cond: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
        scrape_until(self.metrics, what, cond)
            .await
            .with_context(|| self.decisions())
    }

    /// The shim's decisions, warnings and errors, for failure messages.
    fn decisions(&self) -> String {
        let log = self.shim.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
            .collect();
        format!("shim log (info and up):\n{}", lines.join("\n"))
    }

    /// Wait until containerd has `name` of `pod` in `state`; returns its status.
    async fn wait_state(
        &self,
        pod: &PodHandle,
        name: &str,
        want: ContainerState,
    ) -> Result<ContainerStatus> {
        wait_for_value(
            TIMEOUT,
            &format!("containerd: {name} {want:?}"),
            || async move {
                for id in pod.container_ids(name) {
                    let s = self.truth(&id).await?;
                    if s.state == want as i32 {
                        return Ok(Some(s));
                    }
                }
                Ok(None)
            },
        )
        .await
        .with_context(|| format!("{}\n{}", pod.summary(), self.decisions()))
    }
}

/// A CRI timestamp (wall-clock nanoseconds) as `/proc/uptime` seconds.
fn uptime_of_nanos(nanos: i64) -> f64 {
    let now = Instant::now();
    uptime_at(now) - (unix_nanos_at(now) - nanos) as f64 / 1e9
}

/// The first uptime a container wrote to `dir/file`, waiting for it.
async fn recorded(dir: &Path, file: &str) -> Result<f64> {
    wait_for_value(TIMEOUT, &format!("{file} to be recorded"), || {
        let v = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| t.lines().find_map(parse_uptime));
        async move { Ok(v) }
    })
    .await
}

/// Shell: append the uptime to /shared/FILE.
fn rec(file: &str) -> String {
    format!("cat /proc/uptime >> /shared/{file};")
}

/// A sidecar that opens its port once the test creates /shared/GO, and
/// exits 0 on SIGTERM.
fn gated_sidecar(dir: &Path, go: &str) -> ContainerDef {
    ContainerDef::new(
        "proxy",
        sh(&format!(
            "trap 'exit 0' TERM; while [ ! -e /shared/{go} ]; do sleep 0.05; done; {} \
             nc -ll -p {PORT} -e true & while :; do sleep 0.1; done",
            rec("proxy.listen")
        )),
    )
    .mount(dir, "/shared")
}

/// An app that records its start, and on SIGTERM takes 2 s to exit
/// (recording when).
fn slow_app(dir: &Path) -> ContainerDef {
    ContainerDef::new(
        "app",
        sh(&format!(
            "trap '{} sleep 2; {} exit 0' TERM; {} while :; do sleep 0.1; done",
            rec("app.term"),
            rec("app.exit"),
            rec("app.start")
        )),
    )
    .mount(dir, "/shared")
}

fn subdir(env: &Env, name: &str) -> Result<PathBuf> {
    let dir = env.shared.join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// kubelet's first call of `method` for `container` that has returned.
async fn wait_call_done(pod: &PodHandle, method: &str, container: &str) -> Result<CriCall> {
    wait_for_value(
        TIMEOUT,
        &format!("kubelet's {method} of {container} to return"),
        || {
            let c = pod
                .first_call(method, Some(container))
                .filter(|c| !c.in_flight());
            async move { Ok(c) }
        },
    )
    .await
    .with_context(|| pod.summary())
}

/// Pods driven by the kubelet simulator through the shim, one after the
/// other so each step's metrics can be told apart:
///
/// * held: [proxy, app], the proxy ready on TCP once the test lets it. While
///   kubelet's StartContainer of the app waits (containerd: app CREATED),
///   one StartContainer is held and TCP checks fail; once the port opens the
///   hold ends, one hold is observed, lasting from before the port opened
///   until kubelet got its answer, and one TCP check succeeded.
/// * deferred: [app, proxy]: kubelet's StartContainer of the app is
///   answered at once while containerd still has it CREATED: one deferred
///   start, no new hold; the app starts after the port opened.
/// * the held pod deleted: the proxy's StopContainer is held while the app
///   takes 2 s to exit (one StopContainer in the gauge), then released: one
///   stop `after_apps`, a hold at least as long as the app took to exit.
/// * a Job pod whose main exits 0: the shim stops the sidecar itself
///   (`job_complete`) after containerd says main exited.
///
/// At the end, the calls counted per method and code are exactly the
/// simulator's calls of the pod worker's methods with the codes it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_metrics_follow_held_deferred_and_stopped_pods() -> Result<()> {
    let env = Env::start().await?;
    let tcp_ready = format!("tcp://:{PORT}");

    // -- held start
    let dir = subdir(&env, "held")?;
    let held = env
        .kubelet
        .run_pod(
            PodDef::new("metrics-held")
                .termination_grace(Duration::from_secs(10))
                .annotation(SIDECARS, "proxy")
                .annotation("sidecar-shim.io/ready.proxy", &tcp_ready)
                .container(gated_sidecar(&dir, "go"))
                .container(slow_app(&dir)),
        )
        .await?;
    wait_for(
        TIMEOUT,
        "kubelet's StartContainer of the app to be sent",
        || {
            let sent = held
                .first_call("StartContainer", Some("app"))
                .is_some_and(|c| c.in_flight());
            async move { sent }
        },
    )
    .await
    .with_context(|| held.summary())?;
    let s = env
        .scrape_until("the app's start to be held and TCP checks to fail", |s| {
            s.held("StartContainer").ok() == Some(1.0) && s.checks("tcp", "not_ready") >= 1.0
        })
        .await?;
    // The hold began before this moment.
    let seen_held = uptime_at(Instant::now());
    let app_id = held.container_ids("app")[0].clone();
    ensure!(
        state(&env.truth(&app_id).await?) == ContainerState::ContainerCreated,
        "containerd started the app while its start was held"
    );
    assert_eq!(s.checks("tcp", "ready"), 0.0);
    assert_eq!(s.decisions("start held"), 1.0);
    assert_eq!(s.holds("StartContainer")?.0, 0.0, "no hold has ended yet");
    ensure!(
        held.first_call("StartContainer", Some("app"))
            .is_some_and(|c| c.in_flight()),
        "kubelet's StartContainer returned while the metrics said held\n{}",
        held.summary()
    );

    // Keep it held a while, so that its duration says something.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(dir.join("go"), "")?;
    let app_start = wait_call_done(&held, "StartContainer", "app").await?;
    ensure!(app_start.ok(), "{}", held.summary());
    let app = env
        .wait_state(&held, "app", ContainerState::ContainerRunning)
        .await?;
    let listen_at = recorded(&dir, "proxy.listen").await?;
    let s = env.scrape().await?;
    assert_eq!(s.held("StartContainer")?, 0.0);
    let (count, took) = s.holds("StartContainer")?;
    assert_eq!(count, 1.0);
    let sent = uptime_at(app_start.start);
    let answered = app_start.duration().context("in flight")?.as_secs_f64();
    eprintln!(
        "held start: sent {sent:.3}, seen held {seen_held:.3}, port open {listen_at:.2}, \
         app started (containerd) {:.3}, hold {took:.3} s, kubelet's call {answered:.3} s",
        uptime_of_nanos(app.started_at)
    );
    // At least from when the test saw it held until the port opened, at
    // most as long as kubelet waited.
    ensure!(
        took >= listen_at - seen_held - CLOCK_SLACK && took <= answered + CLOCK_SLACK,
        "hold of {took:.3} s: seen held at {seen_held:.3}, port opened at {listen_at:.2}, \
         kubelet waited {answered:.3} s"
    );
    ensure!(uptime_of_nanos(app.started_at) >= listen_at - CLOCK_SLACK);
    assert_eq!(s.checks("tcp", "ready"), 1.0);
    assert_eq!(s.decisions("held start released"), 1.0);
    assert_eq!(s.decisions("sidecar ready"), 1.0);
    assert_eq!(s.must("sidecar_shim_deferred_starts_total", &[])?, 0.0);

    // -- deferred start
    let ddir = subdir(&env, "deferred")?;
    let deferred = env
        .kubelet
        .run_pod(
            PodDef::new("metrics-deferred")
                .termination_grace(Duration::from_secs(10))
                .annotation(SIDECARS, "proxy")
                .annotation("sidecar-shim.io/ready.proxy", &tcp_ready)
                .container(slow_app(&ddir))
                .container(gated_sidecar(&ddir, "go")),
        )
        .await?;
    let start = wait_call_done(&deferred, "StartContainer", "app").await?;
    ensure!(start.ok(), "{}", deferred.summary());
    let s = env.scrape().await?;
    let app_id = deferred.container_ids("app")[0].clone();
    ensure!(
        state(&env.truth(&app_id).await?) == ContainerState::ContainerCreated,
        "containerd started the deferred app before its sidecar was ready"
    );
    assert_eq!(s.must("sidecar_shim_deferred_starts_total", &[])?, 1.0);
    assert_eq!(s.decisions("start deferred"), 1.0);
    assert_eq!(s.holds("StartContainer")?.0, 1.0, "a deferral is no hold");
    std::fs::write(ddir.join("go"), "")?;
    let app = env
        .wait_state(&deferred, "app", ContainerState::ContainerRunning)
        .await?;
    let listen_at = recorded(&ddir, "proxy.listen").await?;
    ensure!(uptime_of_nanos(app.started_at) >= listen_at - CLOCK_SLACK);
    let s = env
        .scrape_until("the deferred start to be released", |s| {
            s.decisions("deferred start released") == 1.0
        })
        .await?;
    assert_eq!(s.checks("tcp", "ready"), 2.0);
    assert_eq!(s.must("sidecar_shim_deferred_starts_total", &[])?, 1.0);

    // -- ordered shutdown of the held pod
    let deleting = {
        let held = &held;
        async move { held.delete(None).await }
    };
    let watch = async {
        let s = env
            .scrape_until("the proxy's StopContainer to be held", |s| {
                s.held("StopContainer").ok() == Some(1.0)
            })
            .await?;
        Ok::<_, anyhow::Error>((s, uptime_at(Instant::now())))
    };
    let (timings, during) = tokio::join!(deleting, watch);
    let timings = timings?;
    let (during, seen_held) = during?;
    let app_exit = recorded(&dir, "app.exit").await?;
    ensure!(
        seen_held < app_exit,
        "the stop was seen held at {seen_held:.3}, after the app exited at {app_exit:.2}"
    );
    ensure!(timings.iter().all(|t| t.error.is_none()), "{timings:?}");
    assert_eq!(during.stops("after_apps"), 0.0, "released while held");
    let s = env.scrape().await?;
    assert_eq!(s.held("StopContainer")?, 0.0);
    assert_eq!(s.stops("after_apps"), 1.0);
    let (count, took) = s.holds("StopContainer")?;
    assert_eq!(count, 1.0);
    let stop = held
        .calls_of("StopContainer", Some("proxy"))
        .first()
        .cloned()
        .context("no StopContainer of the proxy")?;
    let sent = uptime_at(stop.start);
    let answered = stop.duration().context("in flight")?.as_secs_f64();
    eprintln!(
        "held stop: sent {sent:.3}, seen held {seen_held:.3}, app exited {app_exit:.2}, hold \
         {took:.3} s, kubelet's call {answered:.3} s"
    );
    ensure!(
        took >= app_exit - seen_held - CLOCK_SLACK && took <= answered + CLOCK_SLACK,
        "stop hold of {took:.3} s: seen held at {seen_held:.3}, app exited {app_exit:.2}, \
         kubelet waited {answered:.3} s"
    );
    assert_eq!(s.decisions("sidecar stop held"), 1.0);
    deferred.delete(None).await?;

    // -- Job completion
    let jdir = subdir(&env, "job")?;
    let job = env
        .kubelet
        .run_pod(
            PodDef::job("metrics-job")
                .annotation(SIDECARS, "proxy")
                .container(
                    ContainerDef::new(
                        "proxy",
                        sh("trap 'exit 0' TERM; while :; do sleep 0.1; done"),
                    )
                    .mount(&jdir, "/shared"),
                )
                .container(ContainerDef::new("main", sh("sleep 1; exit 0"))),
        )
        .await?;
    job.wait_phase(Phase::Succeeded, TIMEOUT)
        .await
        .with_context(|| format!("{}\n{}", job.summary(), env.decisions()))?;
    let s = env.scrape().await?;
    assert_eq!(s.stops("job_complete"), 1.0);
    assert_eq!(s.decisions("job complete"), 1.0);
    ensure!(s.checks("running", "ready") >= 1.0, "{}", s.text);
    let main = env.truth(&job.container_ids("main")[0]).await?;
    let proxy = env.truth(&job.container_ids("proxy")[0]).await?;
    ensure!(
        state(&proxy) == ContainerState::ContainerExited && proxy.finished_at >= main.finished_at,
        "containerd: proxy {:?} finished {}, main finished {}",
        state(&proxy),
        proxy.finished_at,
        main.finished_at
    );
    job.delete(None).await?;

    // -- every pod worker call, counted under the code kubelet got
    let methods = [
        "RunPodSandbox",
        "CreateContainer",
        "StartContainer",
        "StopContainer",
        "StopPodSandbox",
        "RemovePodSandbox",
    ];
    let mut want = Expected::default();
    for pod in [&held, &deferred, &job] {
        for c in pod.calls() {
            if !methods.contains(&c.method) {
                continue;
            }
            ensure!(!c.in_flight(), "{} still in flight", c.method);
            let code = c.error.as_ref().map_or(tonic::Code::Ok, |e| e.code);
            want.add_rt(c.method, code);
        }
    }
    let got: BTreeMap<_, _> = env
        .scrape()
        .await?
        .calls()
        .into_iter()
        .filter(|((m, _), _)| methods.iter().any(|x| *m == format!("{RUNTIME}{x}")))
        .collect();
    assert_eq!(got, want.0);
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. The listener itself

/// With `--metrics-listen` the shim holds exactly one listening TCP socket,
/// at the address it logged; without it, none (the kernel's socket tables
/// say so). Neither needs a runtime: the shim answers UNAVAILABLE, which the
/// one with metrics counts.
#[tokio::test]
async fn without_the_flag_nothing_listens() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sshim-m")
        .tempdir_in("/tmp")?;
    let runtime = dir.path().join("no-runtime.sock");
    let with = ShimProcess::start(&dir.path().join("with.sock"), &runtime, &METRICS_FLAG).await?;
    // Its own admin socket: the default (admin.sock next to the CRI
    // socket) is the first shim's.
    let admin = dir.path().join("without-admin.sock");
    let without = ShimProcess::start(
        &dir.path().join("without.sock"),
        &runtime,
        &["--admin-listen", admin.to_str().expect("UTF-8")],
    )
    .await?;

    let addr = metrics_address(&with).await?;
    assert_eq!(tcp_listeners(with.pid())?, vec![addr]);
    assert_eq!(tcp_listeners(without.pid())?, vec![]);
    ensure!(!without.log().contains("Prometheus"), "{}", without.log());

    for shim in [&with, &without] {
        let got = shim
            .cri()
            .0
            .version(VersionRequest::default())
            .await
            .expect_err("no runtime");
        assert_eq!(got.code(), tonic::Code::Unavailable);
    }
    let s = Scrape::take(addr).await?;
    assert_eq!(
        s.calls(),
        BTreeMap::from([(key(&format!("{RUNTIME}Version"), "UNAVAILABLE"), 1.0)])
    );
    // Still none after serving calls.
    assert_eq!(tcp_listeners(without.pid())?, vec![]);
    Ok(())
}

/// A metrics address already in use fails startup with exit 1 and an error
/// naming it, before the CRI socket is created.
#[tokio::test]
async fn a_taken_metrics_port_fails_startup() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sshim-m")
        .tempdir_in("/tmp")?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let listen = dir.path().join("shim.sock");
    let out = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new(ShimProcess::binary())
            .arg("--listen")
            .arg(&listen)
            .arg("--runtime-endpoint")
            .arg(dir.path().join("no-runtime.sock"))
            .arg("--metrics-listen")
            .arg(addr.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the shim did not exit")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    ensure!(
        stderr.contains(&format!("cannot listen for metrics on {addr}"))
            && stderr.contains("in use"),
        "{stderr}"
    );
    ensure!(!listen.exists(), "the CRI socket was created");
    drop(taken);
    Ok(())
}

/// Bad addresses are refused before anything starts (exit 2, naming the
/// value).
#[tokio::test]
async fn a_bad_metrics_address_is_a_config_error() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sshim-m")
        .tempdir_in("/tmp")?;
    let listen = dir.path().join("shim.sock");
    for bad in ["localhost:9464", "9464"] {
        let out = tokio::time::timeout(
            TIMEOUT,
            tokio::process::Command::new(ShimProcess::binary())
                .arg("--listen")
                .arg(&listen)
                .args(["--metrics-listen", bad])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("the shim did not exit")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        if !stderr.contains(bad) || !stderr.contains("IP:PORT") {
            bail!("{bad}: {stderr}");
        }
        ensure!(!listen.exists(), "the CRI socket was created");
    }
    Ok(())
}
