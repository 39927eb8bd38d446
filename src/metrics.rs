//! Prometheus metrics: what the shim counts, the handle the proxy and the
//! lifecycle record into, and the HTTP listener that serves them on
//! `--metrics-listen` (off unless configured).
//!
//! A [`Metrics`] handle is passed explicitly (an `Arc`) to whoever records.
//! Without the listener the handle is disabled: every method returns at
//! once, and the relay does not decode response header blocks at all (it
//! asks [`Metrics::enabled`] once per connection).
//!
//! Labels stay few and bounded: the gRPC method (the CRI v1 methods this
//! build knows, anything else `other`), the gRPC code by name, and small
//! fixed sets for the lifecycle's decisions. Never pod or container ids.
//!
//! The listener serves `GET /metrics` in the OpenMetrics text format. It
//! binds exactly the address it is given and has no authentication: give it
//! a loopback or node-local address.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::lifecycle::machine::Note;
use crate::lifecycle::spec::ReadyCheck;

/// The label of calls to methods not in [`KNOWN_METHODS`].
pub const OTHER_METHOD: &str = "other";

/// The CRI methods that get a label of their own (`runtime.v1` of
/// Kubernetes 1.33); any other path, including the old `runtime.v1alpha2`
/// services, counts as [`OTHER_METHOD`] so that a client cannot grow the
/// label set.
pub const KNOWN_METHODS: &[&str] = &[
    "runtime.v1.RuntimeService/Version",
    "runtime.v1.RuntimeService/RunPodSandbox",
    "runtime.v1.RuntimeService/StopPodSandbox",
    "runtime.v1.RuntimeService/RemovePodSandbox",
    "runtime.v1.RuntimeService/PodSandboxStatus",
    "runtime.v1.RuntimeService/ListPodSandbox",
    "runtime.v1.RuntimeService/CreateContainer",
    "runtime.v1.RuntimeService/StartContainer",
    "runtime.v1.RuntimeService/StopContainer",
    "runtime.v1.RuntimeService/RemoveContainer",
    "runtime.v1.RuntimeService/ListContainers",
    "runtime.v1.RuntimeService/ContainerStatus",
    "runtime.v1.RuntimeService/UpdateContainerResources",
    "runtime.v1.RuntimeService/ReopenContainerLog",
    "runtime.v1.RuntimeService/ExecSync",
    "runtime.v1.RuntimeService/Exec",
    "runtime.v1.RuntimeService/Attach",
    "runtime.v1.RuntimeService/PortForward",
    "runtime.v1.RuntimeService/ContainerStats",
    "runtime.v1.RuntimeService/ListContainerStats",
    "runtime.v1.RuntimeService/PodSandboxStats",
    "runtime.v1.RuntimeService/ListPodSandboxStats",
    "runtime.v1.RuntimeService/UpdateRuntimeConfig",
    "runtime.v1.RuntimeService/Status",
    "runtime.v1.RuntimeService/CheckpointContainer",
    "runtime.v1.RuntimeService/GetContainerEvents",
    "runtime.v1.RuntimeService/ListMetricDescriptors",
    "runtime.v1.RuntimeService/ListPodSandboxMetrics",
    "runtime.v1.RuntimeService/RuntimeConfig",
    "runtime.v1.RuntimeService/UpdatePodSandboxResources",
    "runtime.v1.ImageService/ListImages",
    "runtime.v1.ImageService/ImageStatus",
    "runtime.v1.ImageService/PullImage",
    "runtime.v1.ImageService/RemoveImage",
    "runtime.v1.ImageService/ImageFsInfo",
];

/// The method label of a gRPC path (`/runtime.v1.RuntimeService/Version`).
pub fn method_label(path: &str) -> &'static str {
    let name = path.strip_prefix('/').unwrap_or(path);
    KNOWN_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// A gRPC status code by its canonical name, as gRPC's documentation and
/// other exporters spell it.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code a gRPC client reports for a stream reset with this HTTP/2 error
/// code (gRPC's PROTOCOL-HTTP2.md, "Errors").
pub fn reset_code(h2_error: u32) -> tonic::Code {
    match h2_error {
        0x7 => tonic::Code::Unavailable,       // REFUSED_STREAM
        0x8 => tonic::Code::Cancelled,         // CANCEL
        0xb => tonic::Code::ResourceExhausted, // ENHANCE_YOUR_CALM
        0xc => tonic::Code::PermissionDenied,  // INADEQUATE_SECURITY
        _ => tonic::Code::Internal,
    }
}

/// The kind label of a readiness check.
pub fn check_label(check: &ReadyCheck) -> &'static str {
    match check {
        ReadyCheck::Running => "running",
        ReadyCheck::Tcp { .. } => "tcp",
        ReadyCheck::Http { .. } => "http",
        ReadyCheck::Exec { .. } => "exec",
    }
}

/// The calls the lifecycle may hold, as labels of the hold metrics.
pub const HELD_CALLS: &[&str] = &[
    "StartContainer",
    "StopContainer",
    "ExecSync",
    "StopPodSandbox",
];

/// Why a sidecar was stopped, from the machine's note of the decision: the
/// shim's own stops (`job_complete`, `pod_teardown`) and kubelet's held
/// StopContainer released (`after_apps`, `grace_ran_out`,
/// `single_container`, `already_exited`). `None`: the note is not a
/// sidecar stop.
pub fn stop_reason(note: &Note) -> Option<&'static str> {
    Some(match note.what {
        "job complete: stopping sidecar" => "job_complete",
        "teardown: stopping sidecar" => "pod_teardown",
        // A stop kubelet asked for before the shim restarted.
        "sidecar stop resumed" => "resumed_after_restart",
        "cap reached: sidecar stopped without waiting" => "cap_reached",
        "sidecar stop released" => {
            // The detail starts with why the machine released it.
            let why = note.detail.split(';').next().unwrap_or_default();
            match why {
                "normal containers and later sidecars have exited" => "after_apps",
                "grace period ran out" => "grace_ran_out",
                "no sign of pod shutdown: a single-container stop" => "single_container",
                "it exited meanwhile" => "already_exited",
                _ => "other",
            }
        }
        _ => return None,
    })
}

/// Bucket bounds of call latencies, in seconds: from a fast relayed call
/// (about 100 µs) to kubelet's two-minute deadline.
const CALL_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0, 120.0,
];

/// Bucket bounds of hold durations, in seconds: readiness is checked every
/// 10 ms, a ready-timeout is at most 110 s, a stop waits out grace periods.
const HOLD_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HoldLabels {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StopLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The shim's metrics; a disabled handle records nothing.
pub struct Metrics {
    on: Option<Recorders>,
}

struct Recorders {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_duration: HistogramFamily<MethodLabels>,
    held: Family<HoldLabels, Gauge>,
    hold_duration: HistogramFamily<HoldLabels>,
    deferred_starts: Counter,
    sidecar_stops: Family<StopLabels, Counter>,
    readiness_checks: Family<CheckLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    state_write_errors: Counter,
    runtime_reconnects: Counter,
    /// The proxy last failed to connect to the runtime.
    runtime_unreachable: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::disabled()
    }
}

impl Metrics {
    /// A handle that records nothing (no `--metrics-listen`).
    pub fn disabled() -> Metrics {
        Metrics { on: None }
    }

    /// A handle with every metric registered, at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sidecar_shim");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "CRI calls answered, by gRPC method and the gRPC code the client got: relayed to the \
             runtime, answered by the lifecycle, or refused while the runtime was unreachable",
            calls.clone(),
        );
        let call_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(|| Histogram::new(CALL_BUCKETS));
        registry.register_with_unit(
            "call_duration",
            "Time from a call's request headers to the end of its response (trailers or end of \
             stream), by gRPC method",
            Unit::Seconds,
            call_duration.clone(),
        );
        let held = Family::<HoldLabels, Gauge>::default();
        registry.register(
            "held_calls",
            "Calls the lifecycle is holding now (waiting for sidecars to be ready or for a pod's \
             normal containers to exit), by call",
            held.clone(),
        );
        let hold_duration: HistogramFamily<HoldLabels> =
            Family::new_with_constructor(|| Histogram::new(HOLD_BUCKETS));
        registry.register_with_unit(
            "hold_duration",
            "How long calls the lifecycle held waited for its decision, by call",
            Unit::Seconds,
            hold_duration.clone(),
        );
        for call in HELD_CALLS {
            // Exported from the start, so a scrape shows 0 rather than nothing.
            let _ = held.get_or_create(&HoldLabels { call });
            let _ = hold_duration.get_or_create(&HoldLabels { call });
        }
        let deferred_starts = Counter::default();
        registry.register(
            "deferred_starts",
            "StartContainer calls answered at once whose real start waits for sidecars kubelet \
             has not created yet",
            deferred_starts.clone(),
        );
        let sidecar_stops = Family::<StopLabels, Counter>::default();
        registry.register(
            "sidecar_stops",
            "Sidecar stops the lifecycle carried out or released, by reason",
            sidecar_stops.clone(),
        );
        let readiness_checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "readiness_checks",
            "Sidecar readiness checks run, by kind of check and result",
            readiness_checks.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "lifecycle_decisions",
            "Lifecycle decisions, by the decision as the info log line names it",
            decisions.clone(),
        );
        let state_write_errors = Counter::default();
        registry.register(
            "state_write_errors",
            "Failed writes of the lifecycle's persisted state",
            state_write_errors.clone(),
        );
        let runtime_reconnects = Counter::default();
        registry.register(
            "runtime_reconnects",
            "Times the runtime became reachable again after the proxy had failed to connect to it",
            runtime_reconnects.clone(),
        );
        Metrics {
            on: Some(Recorders {
                registry,
                calls,
                call_duration,
                held,
                hold_duration,
                deferred_starts,
                sidecar_stops,
                readiness_checks,
                decisions,
                state_write_errors,
                runtime_reconnects,
                runtime_unreachable: AtomicBool::new(false),
            }),
        }
    }

    /// Whether anything is recorded (callers skip work done only for metrics).
    pub fn enabled(&self) -> bool {
        self.on.is_some()
    }

    /// Every metric in the OpenMetrics text format (empty when disabled).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(on) = &self.on {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &on.registry);
        }
        out
    }

    /// A call to the gRPC path `path` ended with `code` (what the client
    /// got) after `took`.
    pub fn call(&self, path: &str, code: tonic::Code, took: Duration) {
        if let Some(on) = &self.on {
            let method = method_label(path);
            on.calls
                .get_or_create(&CallLabels {
                    method,
                    code: code_label(code),
                })
                .inc();
            on.call_duration
                .get_or_create(&MethodLabels { method })
                .observe(took.as_secs_f64());
        }
    }

    /// Wrap the wait of a call the lifecycle may hold (`call`, one of
    /// [`HELD_CALLS`]) for its decision. It counts as held only if the
    /// decision was not there at once: from the first time `wait` is polled
    /// and not ready until it is, or is dropped (the client gave up), it is
    /// in the held gauge; then its duration, from this call on, is observed.
    pub fn hold<F: Future + Unpin>(&self, call: &'static str, wait: F) -> Hold<F> {
        let record = self.on.as_ref().map(|on| HoldRecord {
            held: on.held.get_or_create(&HoldLabels { call }).clone(),
            duration: on.hold_duration.get_or_create(&HoldLabels { call }).clone(),
            since: Instant::now(),
            waiting: false,
        });
        Hold { wait, record }
    }

    /// A lifecycle decision (the machine's note of it).
    pub fn decision(&self, note: &Note) {
        let Some(on) = &self.on else {
            return;
        };
        on.decisions
            .get_or_create(&DecisionLabels {
                decision: note.what,
            })
            .inc();
        if note.what == "start deferred" {
            on.deferred_starts.inc();
        }
        if let Some(reason) = stop_reason(note) {
            on.sidecar_stops.get_or_create(&StopLabels { reason }).inc();
        }
    }

    /// One run of a sidecar's readiness check.
    pub fn readiness_check(&self, check: &ReadyCheck, ready: bool) {
        if let Some(on) = &self.on {
            on.readiness_checks
                .get_or_create(&CheckLabels {
                    check: check_label(check),
                    result: if ready { "ready" } else { "not_ready" },
                })
                .inc();
        }
    }

    /// Writing the lifecycle's persisted state failed.
    pub fn state_write_error(&self) {
        if let Some(on) = &self.on {
            on.state_write_errors.inc();
        }
    }

    /// The runtime is reachable again after a failure to reach it.
    pub fn runtime_reconnect(&self) {
        if let Some(on) = &self.on {
            on.runtime_reconnects.inc();
        }
    }

    /// The proxy could not connect to the runtime.
    pub fn runtime_unreachable(&self) {
        if let Some(on) = &self.on {
            on.runtime_unreachable.store(true, Ordering::Relaxed);
        }
    }

    /// The proxy connected to the runtime: a reconnect if the last attempt
    /// had failed.
    pub fn runtime_reachable(&self) {
        if let Some(on) = &self.on {
            if on.runtime_unreachable.swap(false, Ordering::Relaxed) {
                on.runtime_reconnects.inc();
            }
        }
    }
}

/// A held call's wait for the lifecycle's decision (see [`Metrics::hold`]).
pub struct Hold<F> {
    wait: F,
    record: Option<HoldRecord>,
}

struct HoldRecord {
    held: Gauge,
    duration: Histogram,
    since: Instant,
    /// Polled and found not ready: in the gauge.
    waiting: bool,
}

impl HoldRecord {
    fn end(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.held.dec();
            self.duration.observe(self.since.elapsed().as_secs_f64());
        }
    }
}

impl<F: Future + Unpin> Future for Hold<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let me = &mut *self;
        let poll = Pin::new(&mut me.wait).poll(cx);
        if let Some(record) = &mut me.record {
            match poll {
                Poll::Pending if !record.waiting => {
                    record.waiting = true;
                    record.held.inc();
                }
                Poll::Ready(_) => {
                    record.end();
                    me.record = None;
                }
                Poll::Pending => {}
            }
        }
        poll
    }
}

impl<F> Drop for Hold<F> {
    fn drop(&mut self) {
        if let Some(record) = &mut self.record {
            record.end();
        }
    }
}

/// Bind the metrics listener on exactly `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    if addr.ip().is_unspecified() {
        warn!(
            address = %addr,
            "the metrics listener accepts connections on every interface; \
             prefer a loopback or node-local address"
        );
    }
    Ok(listener)
}

/// How long a scraper may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, "serving Prometheus metrics on http://{addr}/metrics");
    }
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off rather
                // than spin.
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = answer(&metrics, &req);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn answer(metrics: &Metrics, req: &Request<Incoming>) -> Response<String> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    reply(StatusCode::OK, OPENMETRICS, metrics.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_capped() {
        let cases = [
            (
                "/runtime.v1.RuntimeService/StartContainer",
                "runtime.v1.RuntimeService/StartContainer",
            ),
            (
                "/runtime.v1.ImageService/PullImage",
                "runtime.v1.ImageService/PullImage",
            ),
            ("/runtime.v1alpha2.RuntimeService/Version", OTHER_METHOD),
            ("/runtime.v1.RuntimeService/NoSuchMethod", OTHER_METHOD),
            ("/runtime.v1.RuntimeService/StartContainer/x", OTHER_METHOD),
            ("", OTHER_METHOD),
            ("/", OTHER_METHOD),
        ];
        for (path, want) in cases {
            assert_eq!(method_label(path), want, "{path:?}");
        }
        // Every known method is its own label, spelled as its path.
        for m in KNOWN_METHODS {
            assert_eq!(method_label(&format!("/{m}")), *m);
        }
        let mut sorted = KNOWN_METHODS.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), KNOWN_METHODS.len(), "duplicates");
    }

    #[test]
    fn known_methods_are_the_cri_v1_services() {
        // Each is a method the generated clients of this build call (or a
        // newer one), so a typo would never match a real path.
        for m in KNOWN_METHODS {
            let (service, method) = m.split_once('/').expect("service/method");
            assert!(
                service == "runtime.v1.RuntimeService" || service == "runtime.v1.ImageService",
                "{m}"
            );
            assert!(method.chars().all(|c| c.is_ascii_alphanumeric()), "{m}");
        }
    }

    #[test]
    fn codes_by_name() {
        let cases = [
            (0, "OK"),
            (1, "CANCELLED"),
            (2, "UNKNOWN"),
            (5, "NOT_FOUND"),
            (9, "FAILED_PRECONDITION"),
            (14, "UNAVAILABLE"),
            (16, "UNAUTHENTICATED"),
            (17, "UNKNOWN"),
            (-1, "UNKNOWN"),
        ];
        for (n, want) in cases {
            assert_eq!(code_label(tonic::Code::from_i32(n)), want, "{n}");
        }
        assert_eq!(code_label(tonic::Code::from_bytes(b"5")), "NOT_FOUND");
        assert_eq!(code_label(tonic::Code::from_bytes(b"x")), "UNKNOWN");
        assert_eq!(reset_code(0x8), tonic::Code::Cancelled);
        assert_eq!(reset_code(0x7), tonic::Code::Unavailable);
        assert_eq!(reset_code(0x2), tonic::Code::Internal);
    }

    fn note(what: &'static str, detail: &str) -> Note {
        Note {
            pod: "default/p".into(),
            container: "c".into(),
            what,
            detail: detail.into(),
        }
    }

    #[test]
    fn stop_reasons() {
        let cases = [
            ("job complete: stopping sidecar", "", Some("job_complete")),
            ("teardown: stopping sidecar", "", Some("pod_teardown")),
            (
                "sidecar stop released",
                "normal containers and later sidecars have exited; held 2s, grace left 8s",
                Some("after_apps"),
            ),
            (
                "sidecar stop released",
                "grace period ran out; held 30s, grace left 2s",
                Some("grace_ran_out"),
            ),
            (
                "sidecar stop released",
                "no sign of pod shutdown: a single-container stop; held 2s, grace left 28s",
                Some("single_container"),
            ),
            (
                "sidecar stop released",
                "it exited meanwhile; held 1s, grace left 9s",
                Some("already_exited"),
            ),
            ("sidecar stop released", "something new", Some("other")),
            ("sidecar preStop released", "grace period ran out", None),
            ("teardown: stopping normal container", "", None),
            ("start deferred", "", None),
        ];
        for (what, detail, want) in cases {
            assert_eq!(stop_reason(&note(what, detail)), want, "{what}: {detail}");
        }
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn records_and_encodes() {
        let m = Metrics::new();
        let start = "runtime.v1.RuntimeService/StartContainer";
        m.call(
            &format!("/{start}"),
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        m.call(
            &format!("/{start}"),
            tonic::Code::Ok,
            Duration::from_millis(30),
        );
        m.call("/x.Y/Z", tonic::Code::NotFound, Duration::from_micros(50));
        m.decision(&note("start deferred", "sidecar proxy is not created yet"));
        m.decision(&note("job complete: stopping sidecar", ""));
        m.readiness_check(&ReadyCheck::Tcp { port: 1 }, false);
        m.readiness_check(&ReadyCheck::Tcp { port: 1 }, true);
        m.state_write_error();
        m.runtime_reachable();
        m.runtime_unreachable();
        m.runtime_unreachable();
        m.runtime_reachable();
        m.runtime_reachable();
        let text = m.encode();
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(
            get(&format!(
                "sidecar_shim_calls_total{{method=\"{start}\",code=\"OK\"}}"
            )),
            2.0
        );
        assert_eq!(
            get("sidecar_shim_calls_total{method=\"other\",code=\"NOT_FOUND\"}"),
            1.0
        );
        assert_eq!(
            get(&format!(
                "sidecar_shim_call_duration_seconds_bucket{{le=\"0.005\",method=\"{start}\"}}"
            )),
            1.0
        );
        assert_eq!(
            get(&format!(
                "sidecar_shim_call_duration_seconds_count{{method=\"{start}\"}}"
            )),
            2.0
        );
        assert_eq!(get("sidecar_shim_deferred_starts_total"), 1.0);
        assert_eq!(
            get("sidecar_shim_sidecar_stops_total{reason=\"job_complete\"}"),
            1.0
        );
        assert_eq!(
            get("sidecar_shim_lifecycle_decisions_total{decision=\"start deferred\"}"),
            1.0
        );
        assert_eq!(
            get("sidecar_shim_readiness_checks_total{check=\"tcp\",result=\"not_ready\"}"),
            1.0
        );
        assert_eq!(get("sidecar_shim_state_write_errors_total"), 1.0);
        assert_eq!(get("sidecar_shim_runtime_reconnects_total"), 1.0);
        for call in HELD_CALLS {
            assert_eq!(
                get(&format!("sidecar_shim_held_calls{{call=\"{call}\"}}")),
                0.0
            );
        }
        assert!(text.contains("# UNIT sidecar_shim_hold_duration_seconds seconds"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(Metrics::disabled().encode(), "");
    }

    #[tokio::test]
    async fn holds_count_only_calls_that_waited() {
        let m = Metrics::new();
        let held = |m: &Metrics| {
            sample(
                &m.encode(),
                "sidecar_shim_held_calls{call=\"StartContainer\"}",
            )
        };
        let count = |m: &Metrics| {
            sample(
                &m.encode(),
                "sidecar_shim_hold_duration_seconds_count{call=\"StartContainer\"}",
            )
        };
        // Decided before the wait began: not a hold.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        tx.send(1).unwrap();
        assert_eq!(m.hold("StartContainer", rx).await, Ok(1));
        assert_eq!(count(&m), Some(0.0));

        // Waited: in the gauge while waiting, observed once answered.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut wait = m.hold("StartContainer", rx);
        assert!(futures_poll(&mut wait).is_pending());
        assert_eq!(held(&m), Some(1.0));
        tx.send(2).unwrap();
        assert_eq!(wait.await, Ok(2));
        assert_eq!(held(&m), Some(0.0));
        assert_eq!(count(&m), Some(1.0));

        // Given up while waiting: also observed, and out of the gauge.
        let (_tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut wait = m.hold("StartContainer", rx);
        assert!(futures_poll(&mut wait).is_pending());
        assert_eq!(held(&m), Some(1.0));
        drop(wait);
        assert_eq!(held(&m), Some(0.0));
        assert_eq!(count(&m), Some(2.0));

        // Disabled: just the wait.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        tx.send(3).unwrap();
        assert_eq!(Metrics::disabled().hold("StartContainer", rx).await, Ok(3));
    }

    /// Poll a future once.
    fn futures_poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        Pin::new(f).poll(&mut Context::from_waker(waker))
    }
}
