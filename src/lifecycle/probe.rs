//! Readiness checks of sidecars ([`ReadyCheck`]), one attempt per [`check`]
//! call; the caller decides how often to try.
//!
//! * `tcp` and `http` connect to 127.0.0.1 inside the pod's network namespace
//!   (found with [`pod_netns`]), never to any other address. Each attempt runs
//!   on a fresh OS thread that enters the namespace with `setns(2)` (only that
//!   thread moves), does blocking I/O with timeouts, sends its [`Outcome`]
//!   back and exits. A thread that entered a namespace is never reused, which
//!   is why this is not tokio's `spawn_blocking` pool: a pooled thread would
//!   carry the pod's namespace into unrelated work. Entering a namespace
//!   needs CAP_SYS_ADMIN: the shim runs as root, as kubelet and containerd do.
//! * `exec` runs the command in the sidecar through the runtime's `ExecSync`.
//! * `running` asks the runtime's `ContainerStatus`.
//!
//! Failures of any kind (the namespace is gone, the container does not exist,
//! the connection is refused, the runtime errs) are [`Outcome::NotReady`] with
//! a reason for logs and for the error a held call returns; nothing here
//! panics.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerState, ContainerStatusRequest, ExecSyncRequest, NamespaceMode, PodSandboxStatusRequest,
};
use nix::sched::CloneFlags;
use serde::Deserialize;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::spec::ReadyCheck;

/// The time one attempt of a check may take: the TCP connect, then the HTTP
/// exchange, and the `timeout` of an exec check's `ExecSync` (whole seconds).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The client deadline of the runtime calls a check makes (on top of the
/// exec timeout for `ExecSync`): a runtime that does not answer makes the
/// attempt NotReady instead of stalling whoever waits for it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A namespace thread answers within about 2 × [`ATTEMPT_TIMEOUT`] (connect,
/// then the exchange); this bounds the wait for it in any case (opening a
/// namespace file cannot hang, but nothing is lost by not trusting that).
const THREAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// How much of a failing exec check's output goes into the reason.
const MAX_OUTPUT_IN_REASON: usize = 200;

/// Where a check runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The pod's network namespace (a file such as /var/run/netns/cni-… or
    /// /proc/PID/ns/net), None for host-network pods: then tcp and http
    /// checks use the host's loopback.
    pub netns: Option<PathBuf>,
    /// The sidecar's container id (exec and running checks).
    pub container_id: String,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready,
    /// Why not, for logs and for the error a held call returns.
    NotReady(String),
}

impl Outcome {
    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Ready)
    }
}

/// One attempt of `check` against `target`.
pub async fn check(
    check: &ReadyCheck,
    target: &Target,
    runtime: &mut RuntimeServiceClient<Channel>,
) -> Outcome {
    match check {
        ReadyCheck::Running => running(runtime, &target.container_id).await,
        ReadyCheck::Tcp { port } => tcp(target.netns.clone(), *port).await,
        ReadyCheck::Http { port, path } => http(target.netns.clone(), *port, path.clone()).await,
        ReadyCheck::Exec { command } => exec(runtime, &target.container_id, command).await,
    }
}

/// The network namespace of a pod sandbox, as a file this process can open:
/// `Ok(None)` for a host-network pod.
///
/// From `PodSandboxStatus` with `verbose: true`: containerd (1.6 on) answers
/// `info["info"]`, a JSON document with the sandbox's `pid` and its OCI
/// `runtimeSpec`, whose `linux.namespaces` entry of type `network` has the
/// namespace's `path` (see shared/kubelet-cri.md). That path is used when it
/// is a namespace file as seen from here; when it is not (no path, or the
/// runtime mounted it in a mount namespace the shim does not share, as the
/// tests' private containerd does), `/proc/<sandbox pid>/ns/net`, the same
/// namespace while the sandbox runs.
pub async fn pod_netns(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod_sandbox_id: &str,
) -> anyhow::Result<Option<PathBuf>> {
    let mut request = tonic::Request::new(PodSandboxStatusRequest {
        pod_sandbox_id: pod_sandbox_id.to_owned(),
        verbose: true,
    });
    request.set_timeout(CALL_TIMEOUT);
    let response = runtime
        .pod_sandbox_status(request)
        .await
        .with_context(|| format!("PodSandboxStatus {pod_sandbox_id}"))?
        .into_inner();
    let network_mode = response
        .status
        .as_ref()
        .and_then(|s| s.linux.as_ref())
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .map(|o| o.network);
    if network_mode == Some(NamespaceMode::Node as i32) {
        return Ok(None);
    }
    let info = response.info.get("info").with_context(|| {
        format!(
            "PodSandboxStatus {pod_sandbox_id} (verbose) has no info[\"info\"]: \
             the runtime does not say where the pod's network namespace is"
        )
    })?;
    let info: SandboxInfo = serde_json::from_str(info).with_context(|| {
        format!("PodSandboxStatus {pod_sandbox_id}: info[\"info\"] is not the expected JSON")
    })?;
    info.netns()
        .with_context(|| format!("pod sandbox {pod_sandbox_id}"))
}

/// The parts of containerd's verbose sandbox info used here.
#[derive(Debug, Deserialize)]
struct SandboxInfo {
    #[serde(default)]
    pid: u32,
    #[serde(rename = "runtimeSpec")]
    runtime_spec: Option<RuntimeSpec>,
}

#[derive(Debug, Deserialize)]
struct RuntimeSpec {
    linux: Option<LinuxSpec>,
}

#[derive(Debug, Deserialize)]
struct LinuxSpec {
    #[serde(default)]
    namespaces: Vec<NamespaceSpec>,
}

#[derive(Debug, Deserialize)]
struct NamespaceSpec {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

impl SandboxInfo {
    fn netns(&self) -> anyhow::Result<Option<PathBuf>> {
        let spec = self
            .runtime_spec
            .as_ref()
            .context("the sandbox info has no runtimeSpec")?;
        let namespaces = spec.linux.as_ref().map(|l| l.namespaces.as_slice());
        let Some(network) = namespaces
            .unwrap_or_default()
            .iter()
            .find(|n| n.kind == "network")
        else {
            // Without a network namespace of its own the sandbox shares the
            // host's: a host-network pod.
            return Ok(None);
        };
        let mut tried = Vec::new();
        if !network.path.is_empty() {
            let path = PathBuf::from(&network.path);
            match is_namespace_file(&path) {
                Ok(()) => return Ok(Some(path)),
                Err(why) => tried.push(format!("{}: {why}", path.display())),
            }
        }
        if self.pid > 0 {
            let path = PathBuf::from(format!("/proc/{}/ns/net", self.pid));
            match is_namespace_file(&path) {
                Ok(()) => return Ok(Some(path)),
                Err(why) => tried.push(format!("{}: {why}", path.display())),
            }
        } else {
            tried.push("no sandbox pid".to_owned());
        }
        bail!(
            "no usable network namespace ({})",
            if tried.is_empty() {
                "no path, no pid".to_owned()
            } else {
                tried.join("; ")
            }
        )
    }
}

/// Is `path` a namespace file (on nsfs) from this process's point of view? A
/// bind mount made in another mount namespace shows here as the empty file
/// it was mounted on.
fn is_namespace_file(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let stat = nix::sys::statfs::fstatfs(&file).map_err(|e| e.to_string())?;
    if stat.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err("not a namespace file (mounted in another mount namespace?)".to_owned());
    }
    Ok(())
}

async fn running(runtime: &mut RuntimeServiceClient<Channel>, container_id: &str) -> Outcome {
    let mut request = tonic::Request::new(ContainerStatusRequest {
        container_id: container_id.to_owned(),
        verbose: false,
    });
    request.set_timeout(CALL_TIMEOUT);
    let status = match runtime.container_status(request).await {
        Ok(response) => response.into_inner().status,
        Err(e) => {
            return Outcome::NotReady(format!(
                "ContainerStatus {container_id}: {:?}: {}",
                e.code(),
                e.message()
            ))
        }
    };
    let Some(status) = status else {
        return Outcome::NotReady(format!(
            "ContainerStatus {container_id}: the runtime sent no status"
        ));
    };
    match ContainerState::try_from(status.state) {
        Ok(ContainerState::ContainerRunning) => Outcome::Ready,
        Ok(ContainerState::ContainerExited) => Outcome::NotReady(format!(
            "container {container_id} has exited (code {}{})",
            status.exit_code,
            if status.reason.is_empty() {
                String::new()
            } else {
                format!(", {}", status.reason)
            }
        )),
        Ok(state) => Outcome::NotReady(format!(
            "container {container_id} is not running: {}",
            state.as_str_name()
        )),
        Err(_) => Outcome::NotReady(format!(
            "container {container_id} is in an unknown state {}",
            status.state
        )),
    }
}

async fn exec(
    runtime: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
    command: &[String],
) -> Outcome {
    let mut request = tonic::Request::new(ExecSyncRequest {
        container_id: container_id.to_owned(),
        cmd: command.to_vec(),
        timeout: ATTEMPT_TIMEOUT.as_secs() as i64,
    });
    request.set_timeout(ATTEMPT_TIMEOUT + CALL_TIMEOUT);
    match runtime.exec_sync(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.exit_code == 0 {
                return Outcome::Ready;
            }
            let output = first_line(&response.stderr)
                .or_else(|| first_line(&response.stdout))
                .map(|line| format!(": {line}"))
                .unwrap_or_default();
            Outcome::NotReady(format!(
                "exec {command:?} exited with code {}{output}",
                response.exit_code
            ))
        }
        Err(e) => Outcome::NotReady(format!(
            "exec {command:?} in container {container_id}: {:?}: {}",
            e.code(),
            e.message()
        )),
    }
}

/// The first non-blank line of a command's output, shortened.
fn first_line(output: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut short: String = line.chars().take(MAX_OUTPUT_IN_REASON).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    Some(short)
}

async fn tcp(netns: Option<PathBuf>, port: u16) -> Outcome {
    in_netns(netns, move || match connect(port) {
        Ok(_) => Outcome::Ready,
        Err(why) => Outcome::NotReady(format!("tcp://:{port}: {why}")),
    })
    .await
}

async fn http(netns: Option<PathBuf>, port: u16, path: String) -> Outcome {
    in_netns(netns, move || match http_get(port, &path) {
        Ok(code) if (200..400).contains(&code) => Outcome::Ready,
        Ok(code) => Outcome::NotReady(format!("http://:{port}{path}: HTTP status {code}")),
        Err(why) => Outcome::NotReady(format!("http://:{port}{path}: {why}")),
    })
    .await
}

/// Run `attempt` on a new thread inside the network namespace `netns` (the
/// process's own when None) and wait for its outcome.
async fn in_netns<F>(netns: Option<PathBuf>, attempt: F) -> Outcome
where
    F: FnOnce() -> Outcome + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("sidecar-shim-probe".to_owned())
        .spawn(move || {
            let outcome = match enter_netns(netns.as_deref()) {
                Ok(()) => attempt(),
                Err(why) => Outcome::NotReady(why),
            };
            let _ = tx.send(outcome);
            // The thread ends here, and its namespace with it.
        });
    if let Err(e) = spawned {
        return Outcome::NotReady(format!("cannot start a probe thread: {e}"));
    }
    match tokio::time::timeout(THREAD_TIMEOUT, rx).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Outcome::NotReady("the probe thread ended without an outcome".to_owned()),
        Err(_) => Outcome::NotReady(format!(
            "the probe thread did not answer within {THREAD_TIMEOUT:?}"
        )),
    }
}

/// Move the calling thread into the network namespace at `netns`.
fn enter_netns(netns: Option<&Path>) -> Result<(), String> {
    let Some(path) = netns else {
        return Ok(());
    };
    let file = File::open(path)
        .map_err(|e| format!("opening network namespace {}: {e}", path.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
        format!(
            "entering network namespace {}: {}",
            path.display(),
            e.desc()
        )
    })
}

/// Connect to 127.0.0.1:`port` (the only address a check ever connects to).
fn connect(port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("connecting to {addr}: timed out after {ATTEMPT_TIMEOUT:?}")
        }
        _ => format!("connecting to {addr}: {e}"),
    })
}

/// `GET path` over HTTP/1.0 on 127.0.0.1:`port`; the status code.
fn http_get(port: u16, path: &str) -> Result<u16, String> {
    let mut stream = connect(port)?;
    let deadline = Instant::now() + ATTEMPT_TIMEOUT;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: sidecar-shim\r\n\r\n");
    stream
        .set_write_timeout(Some(ATTEMPT_TIMEOUT))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < MAX_STATUS_LINE {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no status line within {ATTEMPT_TIMEOUT:?}"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("reading the answer: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no status line within {ATTEMPT_TIMEOUT:?}"))
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    parse_status_line(&buf)
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`), from the
/// start of an answer.
fn parse_status_line(answer: &[u8]) -> Result<u16, String> {
    if answer.is_empty() {
        return Err("the connection closed without an answer".to_owned());
    }
    let end = answer
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(answer.len());
    let line = String::from_utf8_lossy(&answer[..end]);
    let line = line.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let shown: String = line.chars().take(80).collect();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("not an HTTP status line: {shown:?}"));
    }
    code.parse()
        .map_err(|_| format!("not an HTTP status line: {shown:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// A one-connection HTTP server on the host loopback: answers `answer`
    /// (or nothing, holding the connection, when None) and hands back what
    /// it received.
    fn serve_once(answer: Option<&'static str>) -> (u16, mpsc::Receiver<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            match answer {
                Some(a) => {
                    let _ = conn.write_all(a.as_bytes());
                }
                None => std::thread::sleep(Duration::from_secs(3)),
            }
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
        });
        (port, rx)
    }

    /// A port on the host loopback that nothing listens on (bound, then
    /// released).
    fn closed_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    }

    fn not_ready(outcome: Outcome) -> String {
        match outcome {
            Outcome::NotReady(why) => why,
            Outcome::Ready => panic!("expected NotReady"),
        }
    }

    #[tokio::test]
    async fn http_sends_a_minimal_request_and_reads_the_status() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
            ("HTTP/1.0 204 No Content\r\n\r\n", true),
            ("HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", true),
            ("HTTP/1.1 399 Whatever\r\n\r\n", true),
            ("HTTP/1.1 404 Not Found\r\n\r\n", false),
            ("HTTP/1.1 500 Internal Server Error\r\n\r\n", false),
            ("HTTP/1.1 199 Early\r\n\r\n", false),
            ("SSH-2.0-OpenSSH\r\n", false),
            ("", false),
        ];
        for (answer, ready) in cases {
            let (port, got) = serve_once(Some(answer));
            let outcome = http(None, port, "/healthz?x=1".into()).await;
            assert_eq!(outcome.is_ready(), ready, "{answer:?}: {outcome:?}");
            assert_eq!(
                got.recv_timeout(Duration::from_secs(10)).unwrap(),
                "GET /healthz?x=1 HTTP/1.0\r\nHost: localhost\r\nUser-Agent: sidecar-shim\r\n\r\n"
            );
            if !ready {
                let why = not_ready(outcome);
                assert!(
                    why.starts_with(&format!("http://:{port}/healthz?x=1: ")),
                    "{why}"
                );
            }
        }
    }

    #[tokio::test]
    async fn http_reasons() {
        let (port, _got) = serve_once(Some("HTTP/1.1 404 Not Found\r\n\r\n"));
        let why = not_ready(http(None, port, "/missing".into()).await);
        assert_eq!(why, format!("http://:{port}/missing: HTTP status 404"));

        let (port, _got) = serve_once(Some(""));
        let why = not_ready(http(None, port, "/".into()).await);
        assert!(why.contains("closed without an answer"), "{why}");

        let (port, _got) = serve_once(Some("garbage\n"));
        let why = not_ready(http(None, port, "/".into()).await);
        assert!(
            why.contains("not an HTTP status line: \"garbage\""),
            "{why}"
        );

        // A server that accepts but never answers: NotReady after about a
        // second, not a hang.
        let (port, _got) = serve_once(None);
        let started = Instant::now();
        let why = not_ready(http(None, port, "/".into()).await);
        assert!(why.contains("no status line within 1s"), "{why}");
        assert!(
            started.elapsed() < THREAD_TIMEOUT,
            "{:?}",
            started.elapsed()
        );

        let port = closed_port();
        let why = not_ready(http(None, port, "/".into()).await);
        assert!(
            why.contains(&format!("connecting to 127.0.0.1:{port}")),
            "{why}"
        );
    }

    #[tokio::test]
    async fn tcp_on_the_host_loopback() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(tcp(None, port).await, Outcome::Ready);
        drop(listener);
        let why = not_ready(tcp(None, port).await);
        assert!(
            why.starts_with(&format!("tcp://:{port}: connecting to 127.0.0.1:{port}: ")),
            "{why}"
        );
    }

    #[tokio::test]
    async fn bad_namespaces_are_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let why = not_ready(tcp(Some(missing.clone()), 1).await);
        assert!(
            why.starts_with(&format!("opening network namespace {}", missing.display())),
            "{why}"
        );
        // An empty file, as a netns bind mount made in another mount
        // namespace looks from here.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let why = not_ready(http(Some(plain.clone()), 1, "/".into()).await);
        assert!(
            why.starts_with(&format!("entering network namespace {}", plain.display())),
            "{why}"
        );
        assert!(is_namespace_file(&plain).is_err());
        assert!(is_namespace_file(&missing).is_err());
    }

    #[test]
    fn status_lines() {
        let ok = [
            ("HTTP/1.1 200 OK\r\n", 200),
            ("HTTP/1.0 301 Moved Permanently\n", 301),
            ("HTTP/1.1 204\r\n", 204),
            ("HTTP/1.1 503 Service Unavailable", 503),
        ];
        for (line, code) in ok {
            assert_eq!(parse_status_line(line.as_bytes()), Ok(code), "{line:?}");
        }
        for line in [
            "",
            "HTTP/1.1",
            "HTTP/1.1 20 OK",
            "HTTP/1.1 abc OK",
            "ICY 200 OK",
            "\u{0}\u{1}",
        ] {
            assert!(parse_status_line(line.as_bytes()).is_err(), "{line:?}");
        }
    }

    #[test]
    fn first_lines() {
        assert_eq!(first_line(b""), None);
        assert_eq!(first_line(b"\n  \n"), None);
        assert_eq!(first_line(b"\n oops \nmore"), Some("oops".into()));
        let long = "x".repeat(500);
        let short = first_line(long.as_bytes()).unwrap();
        assert_eq!(short.chars().count(), MAX_OUTPUT_IN_REASON + 1);
        assert!(short.ends_with('…'));
        assert_eq!(first_line(&[0xff, b'a']), Some("\u{fffd}a".into()));
    }

    fn info(json: &str) -> SandboxInfo {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn netns_from_sandbox_info() {
        let me = std::process::id();
        let own = format!("/proc/{me}/ns/net");
        // A namespace file at the path: used as it is.
        let i = info(&format!(
            r#"{{"pid":{me},"runtimeSpec":{{"linux":{{"namespaces":[{{"type":"pid"}},{{"type":"network","path":"/proc/self/ns/net"}}]}}}}}}"#
        ));
        assert_eq!(i.netns().unwrap(), Some("/proc/self/ns/net".into()));
        // No path, or a path that is not a namespace from here: the pid's.
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("cni-x");
        std::fs::write(&plain, "").unwrap();
        for ns in [
            r#"{"type":"network"}"#.to_owned(),
            format!(r#"{{"type":"network","path":"{}"}}"#, plain.display()),
            r#"{"type":"network","path":"/nonexistent/netns"}"#.to_owned(),
        ] {
            let i = info(&format!(
                r#"{{"pid":{me},"runtimeSpec":{{"linux":{{"namespaces":[{ns}]}}}}}}"#
            ));
            assert_eq!(i.netns().unwrap(), Some(PathBuf::from(&own)), "{ns}");
        }
        // No network namespace entry: the host's network.
        let i = info(r#"{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"ipc"}]}}}"#);
        assert_eq!(i.netns().unwrap(), None);
        let i = info(r#"{"pid":1,"runtimeSpec":{"linux":{}}}"#);
        assert_eq!(i.netns().unwrap(), None);
        // Nothing usable.
        let i = info(&format!(
            r#"{{"runtimeSpec":{{"linux":{{"namespaces":[{{"type":"network","path":"{}"}}]}}}}}}"#,
            plain.display()
        ));
        let err = format!("{:#}", i.netns().unwrap_err());
        assert!(err.contains("no usable network namespace"), "{err}");
        assert!(err.contains("no sandbox pid"), "{err}");
        let err = info(r#"{"pid":1}"#).netns().unwrap_err().to_string();
        assert!(err.contains("no runtimeSpec"), "{err}");
    }
}
