//! `sidecar-shim status`: asks the running shim's admin API for its health
//! and the pods it manages, and prints a table (or JSON).
//!
//! Exit status: 0 when the shim reports itself healthy, 1 when it answers
//! but is unhealthy, 2 when the admin socket cannot be reached (or does not
//! answer, or the --config file cannot be read).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::proto;
use crate::config::{Cli, Config, FileConfig, OutputFormat, StatusArgs, DEFAULT_ADMIN_LISTEN};

/// How long each admin call may take (Health includes the runtime's
/// Version call, itself bounded by [`super::RUNTIME_CHECK_TIMEOUT`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the shim could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read the config file: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot reach the admin socket {}: {source}{}", path.display(), hint(source))]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin socket {} does not speak gRPC: {source}", path.display())]
    Handshake {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the shim at {} did not answer {call}: {status}", path.display())]
    Call {
        path: PathBuf,
        call: &'static str,
        status: tonic::Status,
    },
    #[error("the shim at {} did not answer {call} within {CALL_TIMEOUT:?}", path.display())]
    Timeout { path: PathBuf, call: &'static str },
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            " (is sidecar-shim running? Its admin socket is its --admin-listen, by default \
             admin.sock next to its CRI socket; pass that path with --admin, or the shim's \
             config file with --config)"
        }
        std::io::ErrorKind::PermissionDenied => " (the admin socket is root-only: run as root)",
        std::io::ErrorKind::ConnectionRefused => {
            " (nothing serves it: a socket left behind by a shim that is not running)"
        }
        _ => "",
    }
}

/// Runs `sidecar-shim status`.
pub fn run(args: &StatusArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sidecar-shim status: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = admin_path(args).and_then(|path| runtime.block_on(fetch(&path)));
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("sidecar-shim status: {e}");
            return ExitCode::from(2);
        }
    };
    let out = match args.output {
        OutputFormat::Text => render_text(&report),
        OutputFormat::Json => {
            serde_json::to_string_pretty(&report).expect("the report serializes") + "\n"
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (| head) is not worth a panic.
    let _ = stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush());
    if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--admin`, else the config file's admin socket, else the default.
fn admin_path(args: &StatusArgs) -> Result<PathBuf, StatusError> {
    if let Some(path) = &args.admin {
        return Ok(path.clone());
    }
    match &args.config {
        Some(file) => {
            let file = FileConfig::load(file)?;
            Ok(Config::merge(&Cli::default(), Some(file))?.admin_listen)
        }
        None => Ok(PathBuf::from(DEFAULT_ADMIN_LISTEN)),
    }
}

/// Asks the shim at `path` for its health and its pods.
pub async fn fetch(path: &Path) -> Result<Report, StatusError> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| StatusError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let channel = super::channel_over(stream)
        .await
        .map_err(|source| StatusError::Handshake {
            path: path.to_owned(),
            source,
        })?;
    let mut client = proto::admin_client::AdminClient::new(channel);
    let mut other = client.clone();
    let (health, pods) = tokio::join!(
        tokio::time::timeout(CALL_TIMEOUT, client.health(proto::HealthRequest {})),
        tokio::time::timeout(CALL_TIMEOUT, other.list_pods(proto::ListPodsRequest {})),
    );
    let health = answer(path, "Health", health)?;
    let pods = answer(path, "ListPods", pods)?;
    Ok(Report::new(path, health, pods))
}

type Timed<T> = Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>;

fn answer<T>(path: &Path, call: &'static str, r: Timed<T>) -> Result<T, StatusError> {
    match r {
        Err(_) => Err(StatusError::Timeout {
            path: path.to_owned(),
            call,
        }),
        Ok(Err(status)) => Err(StatusError::Call {
            path: path.to_owned(),
            call,
            status,
        }),
        Ok(Ok(answer)) => Ok(answer.into_inner()),
    }
}

// ---------------------------------------------------------------------------
// The report (its JSON is `--output json`)

/// What `status` prints. Times are nanoseconds since the Unix epoch (as in
/// the CRI), ages and time left are seconds against the shim's clock.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub admin_socket: String,
    pub shim: Shim,
    pub runtime: Runtime,
    /// None: persistence is not configured.
    pub store: Option<Store>,
    pub pods: Vec<Pod>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shim {
    pub version: String,
    pub pid: u32,
    pub started_at_unix_nanos: i64,
    pub uptime_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    pub endpoint: String,
    pub reachable: bool,
    pub name: Option<String>,
    pub version: Option<String>,
    pub api_version: Option<String>,
    pub error: Option<String>,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Store {
    pub state_dir: String,
    pub writable: bool,
    pub failed_writes: u64,
    pub last_error: Option<String>,
    pub pending: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pod {
    pub sandbox_id: String,
    pub namespace: String,
    pub name: String,
    pub sidecars: Vec<String>,
    pub terminating: bool,
    pub job_complete: bool,
    /// Sidecars in start order first, then the others in creation order.
    pub containers: Vec<Container>,
    /// Every call held for the pod (StopPodSandbox has no container).
    pub held_calls: Vec<HeldCall>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// sidecar, normal or init.
    pub role: &'static str,
    /// For sidecars: position in start order, 0 first.
    pub sidecar_index: Option<u32>,
    /// created, deferred, starting, running, exited or never_started.
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// For sidecars only.
    pub ready: Option<bool>,
    pub ready_check: Option<String>,
    pub stopped_by_shim: bool,
    pub deferred: Option<Deferred>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deferred {
    pub since_unix_nanos: i64,
    pub deadline_unix_nanos: i64,
    pub for_seconds: f64,
    pub seconds_left: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldCall {
    /// start, stop, preStop or stopPod.
    pub kind: &'static str,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub since_unix_nanos: Option<i64>,
    pub held_seconds: Option<f64>,
    pub until_unix_nanos: Option<i64>,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn nonzero(t: i64) -> Option<i64> {
    (t != 0).then_some(t)
}

fn seconds(nanos: i64) -> f64 {
    // Milliseconds are plenty, and keep the JSON short.
    (nanos as f64 / 1e6).round() / 1e3
}

impl Report {
    fn new(path: &Path, h: proto::HealthResponse, l: proto::ListPodsResponse) -> Report {
        let rt = h.runtime.unwrap_or_default();
        let now = l.now_unix_nanos;
        Report {
            healthy: h.healthy,
            admin_socket: path.display().to_string(),
            shim: Shim {
                version: h.version,
                pid: h.pid,
                started_at_unix_nanos: h.started_at_unix_nanos,
                uptime_seconds: seconds(h.now_unix_nanos - h.started_at_unix_nanos),
            },
            runtime: Runtime {
                endpoint: rt.endpoint,
                reachable: rt.reachable,
                name: non_empty(rt.runtime_name),
                version: non_empty(rt.runtime_version),
                api_version: non_empty(rt.runtime_api_version),
                error: non_empty(rt.error),
                latency_ms: rt.latency_micros as f64 / 1e3,
            },
            store: h.store.map(|s| Store {
                state_dir: s.state_dir,
                writable: s.writable,
                failed_writes: s.failed_writes,
                last_error: non_empty(s.last_error),
                pending: s.pending,
            }),
            pods: l.pods.into_iter().map(|p| Pod::new(p, now)).collect(),
        }
    }
}

impl Pod {
    fn new(p: proto::Pod, now: i64) -> Pod {
        Pod {
            sandbox_id: p.sandbox_id,
            namespace: p.namespace,
            name: p.name,
            sidecars: p.sidecars,
            terminating: p.terminating,
            job_complete: p.job_complete,
            containers: p
                .containers
                .into_iter()
                .map(|c| container(c, now))
                .collect(),
            held_calls: p
                .held_calls
                .into_iter()
                .map(|h| {
                    let since = nonzero(h.since_unix_nanos);
                    HeldCall {
                        kind: match h.kind() {
                            proto::HeldKind::Start => "start",
                            proto::HeldKind::Stop => "stop",
                            proto::HeldKind::PreStop => "preStop",
                            proto::HeldKind::StopPod => "stopPod",
                            proto::HeldKind::Unspecified => "unknown",
                        },
                        container_id: non_empty(h.container_id),
                        container_name: non_empty(h.container_name),
                        since_unix_nanos: since,
                        held_seconds: since.map(|s| seconds(now - s)),
                        until_unix_nanos: nonzero(h.until_unix_nanos),
                    }
                })
                .collect(),
        }
    }
}

fn container(c: proto::Container, now: i64) -> Container {
    use proto::ContainerState as S;
    let state = c.state();
    let role = c.role();
    let sidecar = role == proto::Role::Sidecar;
    let ended = matches!(state, S::Exited | S::NeverStarted);
    Container {
        role: match role {
            proto::Role::Sidecar => "sidecar",
            proto::Role::Normal => "normal",
            proto::Role::Init => "init",
            proto::Role::Unspecified => "unknown",
        },
        sidecar_index: sidecar.then_some(c.sidecar_index),
        state: match state {
            S::Created => "created",
            S::Deferred => "deferred",
            S::Starting => "starting",
            S::Running => "running",
            S::Exited => "exited",
            S::NeverStarted => "never_started",
            S::Unspecified => "unknown",
        },
        exit_code: ended.then_some(c.exit_code),
        reason: non_empty(c.reason),
        message: non_empty(c.message),
        ready: sidecar.then_some(c.ready),
        ready_check: non_empty(c.ready_check),
        stopped_by_shim: c.stopped_by_shim,
        deferred: c.deferral.map(|d| Deferred {
            since_unix_nanos: d.since_unix_nanos,
            deadline_unix_nanos: d.deadline_unix_nanos,
            for_seconds: seconds(now - d.since_unix_nanos),
            seconds_left: seconds(d.deadline_unix_nanos - now),
        }),
        id: c.id,
        name: c.name,
    }
}

// ---------------------------------------------------------------------------
// Text

/// Column headings of the container table.
pub const COLUMNS: [&str; 9] = [
    "POD",
    "CONTAINER",
    "ID",
    "ROLE",
    "STATE",
    "READY",
    "HELD",
    "DEFERRED",
    "STOPPED BY SHIM",
];

/// The report as a health header and a table with one line per container.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let verdict = if r.healthy {
        "healthy".to_string()
    } else {
        let mut why = Vec::new();
        if !r.runtime.reachable {
            why.push("runtime unreachable");
        }
        if r.store.as_ref().is_some_and(|s| !s.writable) {
            why.push("state directory not writable");
        }
        format!("UNHEALTHY ({})", why.join(", "))
    };
    out += &format!(
        "sidecar-shim {}, pid {}, up {}: {verdict}\n",
        r.shim.version,
        r.shim.pid,
        duration(r.shim.uptime_seconds)
    );
    let rt = &r.runtime;
    if rt.reachable {
        out += &format!(
            "runtime:  {} reachable ({} {}, CRI {}, answered in {:.1} ms)\n",
            rt.endpoint,
            rt.name.as_deref().unwrap_or("?"),
            rt.version.as_deref().unwrap_or("?"),
            rt.api_version.as_deref().unwrap_or("?"),
            rt.latency_ms
        );
    } else {
        out += &format!(
            "runtime:  {} UNREACHABLE: {}\n",
            rt.endpoint,
            rt.error.as_deref().unwrap_or("no answer")
        );
    }
    out += &match &r.store {
        None => "state:    persistence not configured (lifecycle state is kept in memory)\n".into(),
        Some(s) => format!(
            "state:    {} {}, {} failed writes, {} pods pending{}\n",
            s.state_dir,
            if s.writable {
                "writable"
            } else {
                "NOT WRITABLE"
            },
            s.failed_writes,
            s.pending,
            s.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ),
    };
    let held: usize = r.pods.iter().map(|p| p.held_calls.len()).sum();
    let deferred = r
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| c.deferred.is_some())
        .count();
    let terminating = r.pods.iter().filter(|p| p.terminating).count();
    let jobs = r.pods.iter().filter(|p| p.job_complete).count();
    let mut pods = format!("{} managed", r.pods.len());
    if terminating > 0 || jobs > 0 {
        pods += &format!(" ({terminating} terminating, {jobs} job complete)");
    }
    out += &format!(
        "pods:     {pods}, {held} {} held, {deferred} {} deferred\n",
        plural(held, "call", "calls"),
        plural(deferred, "start", "starts")
    );
    if r.pods.is_empty() {
        return out;
    }
    out.push('\n');
    let mut rows: Vec<[String; 9]> = vec![COLUMNS.map(String::from)];
    for p in &r.pods {
        let pod = if p.namespace.is_empty() {
            p.name.clone()
        } else {
            format!("{}/{}", p.namespace, p.name)
        };
        for c in &p.containers {
            let held: Vec<String> = p
                .held_calls
                .iter()
                .filter(|h| h.container_id.as_deref() == Some(c.id.as_str()))
                .map(held_cell)
                .collect();
            rows.push([
                pod.clone(),
                c.name.clone(),
                c.id.chars().take(13).collect(),
                c.role.into(),
                state_cell(c),
                match c.ready {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                dash_if_empty(held.join(", ")),
                c.deferred
                    .as_ref()
                    .map(|d| {
                        format!(
                            "{} ago, {} left",
                            duration(d.for_seconds),
                            duration(d.seconds_left.max(0.0))
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                if c.stopped_by_shim { "yes" } else { "no" }.into(),
            ]);
        }
        for h in p.held_calls.iter().filter(|h| h.container_id.is_none()) {
            rows.push([
                pod.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                held_cell(h),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line += cell;
            } else {
                line += &format!("{cell:<w$}  ");
            }
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

fn state_cell(c: &Container) -> String {
    match (c.state, c.exit_code, &c.reason) {
        ("exited", Some(code), _) => format!("exited {code}"),
        ("never_started", Some(code), Some(reason)) => format!("never started {code} {reason}"),
        ("never_started", Some(code), None) => format!("never started {code}"),
        ("never_started", ..) => "never started".into(),
        (state, ..) => state.into(),
    }
}

fn held_cell(h: &HeldCall) -> String {
    match h.held_seconds {
        Some(s) => format!("{} {}", h.kind, duration(s)),
        None => h.kind.into(),
    }
}

/// 0.4s, 12.3s, 5m3s, 2h5m.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        let s = s as u64;
        format!("{}m{}s", s / 60, s % 60)
    } else {
        let s = s as u64;
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let now = 1_000_000_000_000_000_000i64;
        let s = 1_000_000_000i64;
        let health = proto::HealthResponse {
            healthy: true,
            runtime: Some(proto::RuntimeHealth {
                endpoint: "/run/containerd/containerd.sock".into(),
                reachable: true,
                runtime_name: "containerd".into(),
                runtime_version: "1.6.20".into(),
                runtime_api_version: "v1".into(),
                error: String::new(),
                latency_micros: 1200,
            }),
            store: None,
            version: "0.1.0".into(),
            pid: 42,
            started_at_unix_nanos: now - 303 * s,
            now_unix_nanos: now,
            managed_pods: 1,
            held_calls: 1,
        };
        let container = |id: &str, name: &str, role: proto::Role, state: proto::ContainerState| {
            proto::Container {
                id: id.into(),
                name: name.into(),
                role: role as i32,
                state: state as i32,
                ..Default::default()
            }
        };
        let pods = proto::ListPodsResponse {
            now_unix_nanos: now,
            pods: vec![
                proto::Pod {
                    sandbox_id: "s1".into(),
                    namespace: "default".into(),
                    name: "web".into(),
                    sidecars: vec!["proxy".into()],
                    containers: vec![
                        proto::Container {
                            ready: false,
                            ready_check: "tcp://:8080".into(),
                            ..container(
                                "0123456789abcdef",
                                "proxy",
                                proto::Role::Sidecar,
                                proto::ContainerState::Running,
                            )
                        },
                        proto::Container {
                            deferral: Some(proto::Deferral {
                                since_unix_nanos: now - 2 * s,
                                deadline_unix_nanos: now + 88 * s,
                            }),
                            ..container(
                                "fedcba9876543210",
                                "app",
                                proto::Role::Normal,
                                proto::ContainerState::Deferred,
                            )
                        },
                    ],
                    held_calls: vec![],
                    terminating: false,
                    job_complete: false,
                },
                proto::Pod {
                    sandbox_id: "s2".into(),
                    namespace: "batch".into(),
                    name: "job".into(),
                    sidecars: vec!["proxy".into()],
                    containers: vec![
                        proto::Container {
                            ready: true,
                            stopped_by_shim: true,
                            exit_code: 143,
                            ..container(
                                "aaaa",
                                "proxy",
                                proto::Role::Sidecar,
                                proto::ContainerState::Exited,
                            )
                        },
                        container(
                            "bbbb",
                            "app",
                            proto::Role::Normal,
                            proto::ContainerState::Running,
                        ),
                    ],
                    held_calls: vec![
                        proto::HeldCall {
                            kind: proto::HeldKind::Stop as i32,
                            container_id: "aaaa".into(),
                            container_name: "proxy".into(),
                            since_unix_nanos: now - s / 2,
                            until_unix_nanos: now + 10 * s,
                        },
                        proto::HeldCall {
                            kind: proto::HeldKind::StopPod as i32,
                            since_unix_nanos: now - s / 4,
                            ..Default::default()
                        },
                    ],
                    terminating: true,
                    job_complete: false,
                },
            ],
        };
        Report::new(Path::new("/run/sidecar-shim/admin.sock"), health, pods)
    }

    #[test]
    fn text_table() {
        let text = render_text(&report());
        let expected = "\
sidecar-shim 0.1.0, pid 42, up 5m3s: healthy
runtime:  /run/containerd/containerd.sock reachable (containerd 1.6.20, CRI v1, answered in 1.2 ms)
state:    persistence not configured (lifecycle state is kept in memory)
pods:     2 managed (1 terminating, 0 job complete), 2 calls held, 1 start deferred

POD          CONTAINER  ID             ROLE     STATE       READY  HELD          DEFERRED              STOPPED BY SHIM
default/web  proxy      0123456789abc  sidecar  running     no     -             -                     no
default/web  app        fedcba9876543  normal   deferred    -      -             2.0s ago, 1m28s left  no
batch/job    proxy      aaaa           sidecar  exited 143  yes    stop 0.5s     -                     yes
batch/job    app        bbbb           normal   running     -      -             -                     no
batch/job    -          -              -        -           -      stopPod 0.2s  -                     -
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn unhealthy_header_and_no_pods() {
        let mut r = report();
        r.healthy = false;
        r.runtime.reachable = false;
        r.runtime.error = Some("cannot connect: Connection refused (os error 111)".into());
        r.store = Some(Store {
            state_dir: "/var/lib/sidecar-shim".into(),
            writable: false,
            failed_writes: 3,
            last_error: Some("No space left on device".into()),
            pending: 2,
        });
        r.pods.clear();
        let text = render_text(&r);
        assert_eq!(
            text,
            "sidecar-shim 0.1.0, pid 42, up 5m3s: UNHEALTHY (runtime unreachable, state directory not writable)\n\
             runtime:  /run/containerd/containerd.sock UNREACHABLE: cannot connect: Connection refused (os error 111)\n\
             state:    /var/lib/sidecar-shim NOT WRITABLE, 3 failed writes, 2 pods pending, last error: No space left on device\n\
             pods:     0 managed, 0 calls held, 0 starts deferred\n"
        );
    }

    #[test]
    fn json_fields() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["healthy"], true);
        assert_eq!(v["store"], serde_json::Value::Null);
        assert_eq!(v["shim"]["uptime_seconds"], 303.0);
        let app = &v["pods"][0]["containers"][1];
        assert_eq!(app["state"], "deferred");
        assert_eq!(app["ready"], serde_json::Value::Null);
        assert_eq!(app["deferred"]["for_seconds"], 2.0);
        assert_eq!(app["deferred"]["seconds_left"], 88.0);
        let proxy = &v["pods"][1]["containers"][0];
        assert_eq!(proxy["state"], "exited");
        assert_eq!(proxy["exit_code"], 143);
        assert_eq!(proxy["sidecar_index"], 0);
        let held = &v["pods"][1]["held_calls"];
        assert_eq!(held[0]["kind"], "stop");
        assert_eq!(held[0]["held_seconds"], 0.5);
        assert_eq!(held[1]["kind"], "stopPod");
        assert_eq!(held[1]["container_id"], serde_json::Value::Null);
    }

    #[test]
    fn durations() {
        for (s, want) in [
            (0.04, "0.0s"),
            (0.46, "0.5s"),
            (12.34, "12.3s"),
            (303.0, "5m3s"),
            (7500.0, "2h5m"),
            (-1.0, "0.0s"),
        ] {
            assert_eq!(duration(s), want, "{s}");
        }
    }
}
