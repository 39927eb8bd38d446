//! Shared support for the integration tests and benchmarks: a private
//! containerd, CRI clients over Unix sockets (with a chosen HTTP/2
//! `:authority`), CRI config builders for the busybox test image, polling
//! helpers and the `sidecar-shim` process; the kubelet simulator
//! (`kubelet`), the demo's scenarios (`demo`) and their SVG timelines
//! (`timeline`); a client that behaves like grpc-go's at the HTTP/2 level
//! (`grpc_go`); a real one-node Kubernetes from `hack/cluster` (`cluster`).
//!
//! Use it from an integration test with `mod support;`.
//!
//! Environment:
//! - `SIDECAR_SHIM_TEST_IMAGES`: directory with `pause.tar` and `busybox.tar`
//!   (built by `hack/build-images`, which `hack/test` runs). When unset, or the
//!   archives are missing, they are built into `target/test-images` under a
//!   file lock.
//! - `SIDECAR_SHIM_KEEP_TEST_DIRS=1`: keep each test's temporary directory
//!   (containerd log, config, shim log) instead of removing it.
//! - `SIDECAR_SHIM_TEST_RUST_LOG`: `RUST_LOG` for spawned shims (default `debug`).
//! - `SIDECAR_SHIM_CONTAINERD`: which containerd [`PrivateContainerd`] runs:
//!   `1.6` (default, Debian's), `1.7` or `2.3` (see `hack/containerd`).
//! - `SIDECAR_SHIM_TEST_BIN`: the shim binary to spawn instead of this
//!   build's (to show that a test fails on an older build).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod cluster;
pub mod demo;
pub mod grpc_go;
pub mod h2raw;
pub mod kubelet;
pub mod registry;
pub mod timeline;

/// The pause image the private containerd uses as its sandbox image.
pub const PAUSE_IMAGE: &str = "localhost/sidecar-shim/pause:test";
/// Busybox (static) with applet symlinks under /bin; default command `sh`.
pub const BUSYBOX_IMAGE: &str = "localhost/sidecar-shim/busybox:test";
/// Directory holding `pause.tar` and `busybox.tar`.
pub const IMAGES_ENV: &str = "SIDECAR_SHIM_TEST_IMAGES";
/// Set to 1 to keep test directories.
pub const KEEP_ENV: &str = "SIDECAR_SHIM_KEEP_TEST_DIRS";
/// `RUST_LOG` for spawned shims.
pub const SHIM_LOG_ENV: &str = "SIDECAR_SHIM_TEST_RUST_LOG";
/// Which containerd the tests run against: 1.6 (default), 1.7 or 2.3.
pub const CONTAINERD_ENV: &str = "SIDECAR_SHIM_CONTAINERD";

/// Prefix of the per-test directories under /tmp (short, for socket paths).
const DIR_PREFIX: &str = "sshim-";
/// In a test directory: the owner's lock (see [`lock_owner`]).
const OWNER_LOCK: &str = "owner.lock";
/// Generous: a loaded 2-core CI machine runs several test processes at once.
const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(60);
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(100);

/// The repository root (where `Cargo.toml` and `hack/` are).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A script under `hack/`.
pub fn hack(script: &str) -> PathBuf {
    repo_root().join("hack").join(script)
}

/// Cargo's target directory (respects `CARGO_TARGET_DIR` at build time).
pub fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

/// The directory with the test image archives, building them on first use
/// (`hack/build-images` under `flock`, so parallel test processes don't race;
/// the script itself skips the build when the archives are up to date).
pub fn test_images() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_test_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_test_images() -> Result<PathBuf> {
    let dir = match std::env::var_os(IMAGES_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => target_dir().join("test-images"),
    };
    if dir.join("pause.tar").is_file()
        && dir.join("busybox.tar").is_file()
        && std::env::var_os(IMAGES_ENV).is_some()
    {
        return Ok(dir);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = Command::new("flock")
        .arg(dir.join(".lock"))
        .arg(hack("build-images"))
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .context("running flock hack/build-images (is util-linux installed?)")?;
    if !out.status.success() {
        bail!(
            "hack/build-images {} failed ({}):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// Is there a live (non-zombie) process with this pid?
/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_script(args: &[&std::ffi::OsStr], images: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new(hack("containerd"));
    cmd.args(args).stdin(Stdio::null());
    if let Some(images) = images {
        cmd.env(IMAGES_ENV, images);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running hack/containerd {args:?}"))?;
    if !out.status.success() {
        bail!(
            "hack/containerd {:?} failed ({}):\n{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Try to take an exclusive `flock` on `file` without blocking: `Ok(true)`
/// if taken (held until the file is closed), `Ok(false)` if another open file
/// description holds it.
fn try_lock_exclusive(file: &fs::File) -> io::Result<bool> {
    use nix::libc;
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a descriptor this File owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// The owner's lock on its test directory: an exclusive `flock` on
/// `DIR/owner.lock`, taken before `DIR/owner.pid` is written and held as long
/// as the [`PrivateContainerd`] lives. The kernel drops it when the owner's
/// process dies however it dies, and it cannot be mistaken for someone else's
/// the way a recycled pid can (nor does it depend on seeing the owner's pid
/// namespace).
fn lock_owner(dir: &Path) -> Result<fs::File> {
    let path = dir.join(OWNER_LOCK);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    if !try_lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))? {
        bail!("{} is locked by someone else", path.display());
    }
    Ok(file)
}

/// Is the test directory `dir` (with an `owner.pid`) abandoned: its owner
/// gone without cleaning up? If so, returns what keeps other reapers off it
/// while it is reaped (the owner's lock, now ours).
///
/// A directory with `owner.lock` is abandoned exactly when nobody holds that
/// lock. One without (made by an older copy of this file) is abandoned when
/// `owner.pid` names no live process; a recycled pid keeps it, which errs on
/// the safe side.
fn abandoned(dir: &Path, owner: u32) -> Option<Option<fs::File>> {
    match fs::File::open(dir.join(OWNER_LOCK)) {
        Ok(file) => match try_lock_exclusive(&file) {
            Ok(true) => Some(Some(file)),
            _ => None,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => (!pid_alive(owner)).then_some(None),
        Err(_) => None,
    }
}

/// Test directories whose owning process died without cleaning up (a test
/// killed by a timeout, say): stop what runs there and remove them. Only
/// directories with our prefix, an `owner.pid`, no `keep` marker and an owner
/// that is gone (see [`abandoned`]). Stopping is safe even if this judged
/// wrongly: `hack/containerd stop` only touches the directory's own
/// namespace and runc containers, recognised by more than recorded pids.
fn reap_stale_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let dir = entry.path();
            if dir.join("keep").exists() {
                continue;
            }
            // Written after the owner took its lock: without it the
            // directory may be just being set up.
            let Ok(owner) = fs::read_to_string(dir.join("owner.pid")) else {
                continue;
            };
            let Ok(owner) = owner.trim().parse::<u32>() else {
                continue;
            };
            let Some(_lock) = abandoned(&dir, owner) else {
                continue;
            };
            let _ = run_script(&["stop".as_ref(), dir.as_os_str()], None);
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

/// A private containerd for one test: its own root, state, sockets, CNI
/// network and mount namespace in a temporary directory under /tmp (see
/// `hack/containerd`), with the test images imported into namespace k8s.io.
///
/// Dropping it removes all pod sandboxes through CRI, stops containerd, kills
/// anything left (shims, containers) and removes the directory.
pub struct PrivateContainerd {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// What containerd answered to CRI `Version` (e.g. `v2.3.4`), once it
    /// has.
    version: String,
    /// Held until after `drop` has stopped everything and removed the
    /// directory (fields are dropped after `Drop::drop` runs).
    _owner_lock: fs::File,
}

impl PrivateContainerd {
    /// Start a private containerd and wait until CRI answers `Version`.
    pub async fn start() -> Result<Self> {
        let started = Instant::now();
        let images = tokio::task::spawn_blocking(test_images).await??;
        tokio::task::spawn_blocking(reap_stale_dirs).await?;
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in("/tmp")
            .context("creating a temporary directory under /tmp")?;
        let path = dir.path().to_path_buf();
        let owner_lock = lock_owner(&path)?;
        fs::write(path.join("owner.pid"), std::process::id().to_string())?;
        let mut me = PrivateContainerd {
            socket: path.join("containerd.sock"),
            path,
            dir: Some(dir),
            child: None,
            version: String::new(),
            _owner_lock: owner_lock,
        };
        let p = me.path.clone();
        tokio::task::spawn_blocking(move || run_script(&["prepare".as_ref(), p.as_os_str()], None))
            .await??;
        me.spawn()?;
        me.wait_ready(CONTAINERD_START_TIMEOUT).await?;
        let ready = started.elapsed();
        let p = me.path.clone();
        tokio::task::spawn_blocking(move || {
            run_script(
                &["import".as_ref(), p.as_os_str(), images.as_os_str()],
                Some(&images),
            )
        })
        .await??;
        eprintln!(
            "private containerd {} ({CONTAINERD_ENV}={}) at {}: answering after {:?}, images imported after {:?}",
            me.version,
            me.selected_version(),
            me.socket.display(),
            ready,
            started.elapsed()
        );
        Ok(me)
    }

    /// The version containerd reports over CRI (`runtime_version`: `v1.7.34`,
    /// `v2.3.4`, Debian's `1.6.20~ds1`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The version `hack/containerd` was asked for and configured (`1.6`,
    /// `1.7` or `2.3`; `DIR/containerd.version`).
    pub fn selected_version(&self) -> String {
        fs::read_to_string(self.path.join("containerd.version"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| "1.6".into())
    }

    /// The containerd gRPC (and CRI) socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temporary directory everything lives in; tests may put their own
    /// files (shim sockets, logs) here.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// containerd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("containerd.log")
    }

    /// Root directory for pod log directories.
    pub fn pod_log_root(&self) -> PathBuf {
        self.path.join("pod-logs")
    }

    /// The containerd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Is containerd running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// CRI clients for this containerd (`:authority` `localhost`).
    pub fn cri(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        cri_client(&self.socket)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(hack("containerd"))
            .arg("run")
            .arg(&self.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning hack/containerd run")?;
        // hack/containerd execs (through nsenter) into containerd, so this is
        // containerd's pid; `hack/containerd stop` reads it too.
        fs::write(self.path.join("containerd.pid"), child.id().to_string())?;
        self.child = Some(child);
        Ok(())
    }

    /// Poll CRI `Version` until it answers, containerd exits, or the timeout.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut delay = POLL_MIN;
        let mut last_err = String::from("socket not created yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "containerd exited during startup ({status}); log {}:\n{}",
                        self.log_path().display(),
                        tail(&self.log_path(), 30)
                    );
                }
            } else {
                bail!("containerd is not running");
            }
            if self.socket.exists() {
                // A fresh client each time: a channel whose first connection
                // failed should not be reused.
                let (mut rt, _) = cri_client(&self.socket);
                let call = rt.version(VersionRequest {
                    version: "v1".into(),
                });
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(answer)) => {
                        self.version = answer.into_inner().runtime_version;
                        return Ok(());
                    }
                    Ok(Err(status)) => last_err = status.to_string(),
                    Err(_) => last_err = "Version timed out".into(),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer CRI Version within {timeout:?} (last: {last_err}); log {}:\n{}",
                    self.log_path().display(),
                    tail(&self.log_path(), 30)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    /// SIGKILL containerd and wait for it to exit. Its shims and containers
    /// keep running (as when containerd crashes); `restart` picks them up.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("containerd is not running")?;
        child.kill().context("killing containerd")?;
        Ok(child.wait()?)
    }

    /// SIGSTOP containerd: it takes calls (the kernel queues them) and
    /// answers none, until it is killed.
    pub fn freeze(&self) -> Result<()> {
        let child = self.child.as_ref().context("containerd is not running")?;
        send_signal(child.id(), nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGTERM containerd and wait (at most `timeout`, then SIGKILL) for it
    /// to exit. Containers keep running.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("containerd is not running")?;
        send_signal(child.id(), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        let mut delay = POLL_MIN;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                child.kill()?;
                return Ok(child.wait()?);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    /// Start containerd again on the same root, state and socket (after
    /// `kill` or `terminate`; if it still runs it is terminated first), in
    /// the same mount namespace so it reconnects to running shims. Waits
    /// until CRI answers.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.terminate(Duration::from_secs(10))?;
        }
        self.child = None;
        let p = self.path.clone();
        tokio::task::spawn_blocking(move || run_script(&["prepare".as_ref(), p.as_os_str()], None))
            .await??;
        self.spawn()?;
        self.wait_ready(CONTAINERD_START_TIMEOUT).await
    }

    /// containerd's own status of a container (never through a shim): the
    /// source of truth the tests judge the shim by.
    pub async fn container_status(&self, id: &str) -> Result<k8s_cri::v1::ContainerStatus> {
        container_status(&self.cri().0, id)
            .await
            .context("asking containerd directly")
    }

    /// Stop and remove every pod sandbox (which stops and removes their
    /// containers too).
    pub async fn remove_all_pods(&self) -> Result<()> {
        let (mut rt, _) = self.cri();
        remove_all_pods(&mut rt).await
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if self.is_running() {
            // CRI calls need a runtime of their own: we may be inside one
            // (and may not block it) or in none.
            let socket = self.socket.clone();
            let cleanup = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let (mut client, _) = cri_client(&socket);
                    tokio::time::timeout(Duration::from_secs(20), remove_all_pods(&mut client))
                        .await
                        .ok()
                })
            })
            .join();
            if !matches!(cleanup, Ok(Some(Ok(())))) {
                eprintln!(
                    "private containerd {}: could not remove all pods through CRI before stopping",
                    self.path.display()
                );
            }
        }
        if let Err(e) = run_script(&["stop".as_ref(), self.path.as_os_str()], None) {
            eprintln!("{e:#}");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if panicking {
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.log_path().display(),
                tail(&self.log_path(), 40)
            );
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
                let path = dir.keep();
                let _ = fs::write(path.join("keep"), "");
                eprintln!("kept test directory {}", path.display());
            } else if let Err(e) = dir.close() {
                eprintln!("removing {}: {e}", self.path.display());
            }
        }
    }
}

fn send_signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .with_context(|| format!("sending {signal} to {pid}"))
}

// ---------------------------------------------------------------------------
// CRI clients

/// Maximum gRPC message size for test clients (kubelet uses 16 MiB).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// CRI clients over the Unix socket `socket`, sending `:authority: localhost`
/// (what current kubelets send). The channel connects lazily, on first use;
/// must be called inside a tokio runtime.
pub fn cri_client(socket: &Path) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    cri_client_with_authority(socket, "localhost")
}

/// CRI clients whose HTTP/2 `:authority` is exactly `authority`, for example
/// `localhost` or a percent-encoded socket path like
/// `%2Frun%2Fsidecar-shim%2Fsidecar-shim.sock` (what older kubelets and
/// crictl 1.26 send).
///
/// An authority that `http::Uri` accepts is set through tonic's endpoint. One
/// it refuses (a `%` outside userinfo or an IPv6 zone, as in the percent-
/// encoded path) cannot be carried by `http::Uri` at all, so the client is
/// built with a placeholder and its connection rewrites the `:authority` of
/// every outgoing HEADERS block on the wire (see [`AuthorityRewriter`]).
pub fn cri_client_with_authority(
    socket: &Path,
    authority: &str,
) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    let channel = channel_with_authority(socket, authority);
    (
        RuntimeServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        ImageServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
    )
}

/// A lazily connecting gRPC channel to a Unix socket with the given
/// `:authority` (see [`cri_client_with_authority`]).
pub fn channel_with_authority(socket: &Path, authority: &str) -> Channel {
    let path = socket.to_path_buf();
    if authority.parse::<http::uri::Authority>().is_ok() {
        Endpoint::from_shared(format!("http://{authority}"))
            .expect("an authority http accepts makes a valid endpoint")
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
    } else {
        let authority = Bytes::copy_from_slice(authority.as_bytes());
        Endpoint::from_static("http://authority-placeholder.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let path = path.clone();
                let authority = authority.clone();
                async move {
                    let stream = UnixStream::connect(path).await?;
                    Ok::<_, io::Error>(TokioIo::new(AuthorityRewriter::new(stream, authority)))
                }
            }),
        )
    }
}

/// A client-side HTTP/2 connection wrapper that replaces the `:authority` of
/// every request header block written through it.
///
/// It parses the client's frames after the connection preface; for each
/// HEADERS (+ CONTINUATION) block it decodes the HPACK block (its decoder
/// mirrors the client's encoder), replaces `:authority`, and re-encodes the
/// whole block as literals without indexing, so the server's HPACK dynamic
/// table is never used by this side and its table-size settings don't matter.
/// All other frames and everything read pass through unchanged. Padding and
/// priority fields of HEADERS frames are dropped.
pub struct AuthorityRewriter<S> {
    inner: S,
    authority: Bytes,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_done: bool,
    pending: Option<PendingHeaders>,
    decoder: loona_hpack::Decoder<'static>,
}

struct PendingHeaders {
    stream_id: u32,
    end_stream: bool,
    block: Vec<u8>,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The initial SETTINGS_MAX_FRAME_SIZE; we never send bigger frames.
const MAX_FRAME: usize = 16_384;

impl<S> AuthorityRewriter<S> {
    pub fn new(inner: S, authority: Bytes) -> Self {
        AuthorityRewriter {
            inner,
            authority,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_done: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
        }
    }

    fn process(&mut self) -> io::Result<()> {
        if !self.preface_done {
            if self.inbuf.len() < H2_PREFACE.len() {
                return Ok(());
            }
            if &self.inbuf[..H2_PREFACE.len()] != H2_PREFACE {
                return Err(io::Error::other("not an HTTP/2 client connection preface"));
            }
            self.out.extend_from_slice(H2_PREFACE);
            self.inbuf.drain(..H2_PREFACE.len());
            self.preface_done = true;
        }
        let mut at = 0;
        while self.inbuf.len() - at >= 9 {
            let h = &self.inbuf[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if self.inbuf.len() - at < 9 + len {
                break;
            }
            let (ty, flags) = (h[3], h[4]);
            let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = at..at + 9 + len;
            at += 9 + len;
            let payload = &self.inbuf[frame.start + 9..frame.end];
            match ty {
                FRAME_HEADERS => {
                    let mut p = payload;
                    let mut pad = 0;
                    if flags & FLAG_PADDED != 0 {
                        pad = usize::from(*p.first().ok_or_else(bad_frame)?);
                        p = &p[1..];
                    }
                    if flags & FLAG_PRIORITY != 0 {
                        p = p.get(5..).ok_or_else(bad_frame)?;
                    }
                    let fragment = p.get(..p.len().wrapping_sub(pad)).ok_or_else(bad_frame)?;
                    let pending = PendingHeaders {
                        stream_id,
                        end_stream: flags & FLAG_END_STREAM != 0,
                        block: fragment.to_vec(),
                    };
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_headers(pending)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                FRAME_CONTINUATION => {
                    let mut pending = self.pending.take().ok_or_else(bad_frame)?;
                    pending.block.extend_from_slice(payload);
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_headers(pending)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                _ => {
                    let bytes = &self.inbuf[frame];
                    self.out.extend_from_slice(bytes);
                }
            }
        }
        self.inbuf.drain(..at);
        Ok(())
    }

    fn emit_headers(&mut self, pending: PendingHeaders) -> io::Result<()> {
        let headers = self.decoder.decode(&pending.block).map_err(|e| {
            io::Error::other(format!("HPACK decoding of the client's headers: {e}"))
        })?;
        let mut block = Vec::with_capacity(pending.block.len() + self.authority.len());
        for (name, value) in &headers {
            let value: &[u8] = if name == b":authority" {
                &self.authority
            } else {
                value
            };
            // Literal Header Field without Indexing -- New Name (RFC 7541
            // 6.2.2), no Huffman coding.
            block.push(0);
            loona_hpack::encoder::encode_integer_into(name.len(), 7, 0, &mut block)?;
            block.extend_from_slice(name);
            loona_hpack::encoder::encode_integer_into(value.len(), 7, 0, &mut block)?;
            block.extend_from_slice(value);
        }
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let mut flags = 0;
            if first && pending.end_stream {
                flags |= FLAG_END_STREAM;
            }
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let ty = if first {
                FRAME_HEADERS
            } else {
                FRAME_CONTINUATION
            };
            let len = chunk.len();
            self.out.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                ty,
                flags,
            ]);
            self.out.extend_from_slice(&pending.stream_id.to_be_bytes());
            self.out.extend_from_slice(chunk);
            first = false;
        }
        if block.is_empty() {
            // An empty header block still needs its HEADERS frame.
            let flags = FLAG_END_HEADERS
                | if pending.end_stream {
                    FLAG_END_STREAM
                } else {
                    0
                };
            self.out.extend_from_slice(&[0, 0, 0, FRAME_HEADERS, flags]);
            self.out.extend_from_slice(&pending.stream_id.to_be_bytes());
        }
        Ok(())
    }
}

fn bad_frame() -> io::Error {
    io::Error::other("malformed HTTP/2 frame from the client")
}

impl<S: AsyncWrite + Unpin> AuthorityRewriter<S> {
    fn poll_drain(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewriter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRewriter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Backpressure: don't queue without bound.
        if this.out.len() - this.out_pos >= 64 * 1024 {
            ready!(this.poll_drain(cx))?;
        }
        this.inbuf.extend_from_slice(buf);
        this.process()?;
        // Send what we can now; the rest goes on the caller's poll_flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// CRI configs and helpers

/// A unique-enough pod uid for this test process.
pub fn unique_uid(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{n}-{nanos:08x}", std::process::id())
}

/// A kubelet-like pod sandbox config in namespace `default`: metadata with a
/// unique uid, kubelet's labels, hostname = name, a log directory
/// `log_root/<namespace>_<name>_<uid>` (created here), pod network/IPC
/// namespaces and per-container PID namespaces. Adjust fields as needed.
pub fn pod_sandbox_config(name: &str, log_root: &Path) -> PodSandboxConfig {
    pod_sandbox_config_in(name, "default", log_root)
}

/// [`pod_sandbox_config`] in the given Kubernetes namespace.
pub fn pod_sandbox_config_in(name: &str, namespace: &str, log_root: &Path) -> PodSandboxConfig {
    let uid = unique_uid(name);
    let log_directory = log_root.join(format!("{namespace}_{name}_{uid}"));
    fs::create_dir_all(&log_directory)
        .unwrap_or_else(|e| panic!("creating {}: {e}", log_directory.display()));
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            namespace.to_string(),
        ),
        ("io.kubernetes.pod.uid".to_string(), uid.clone()),
    ]);
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid,
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        labels,
        annotations: HashMap::new(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespaces kubelet asks for, for a pod and each of its containers,
/// when the pod sets none of `hostNetwork`, `hostPID`, `hostIPC` and
/// `shareProcessNamespace`: the pod's network and IPC, a PID namespace per
/// container.
pub fn kubelet_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: k8s_cri::v1::NamespaceMode::Pod as i32,
        pid: k8s_cri::v1::NamespaceMode::Container as i32,
        ipc: k8s_cri::v1::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A container config for the busybox test image running `command` (empty:
/// the image's `sh`), logging to `<name>/0.log` in the pod's log directory,
/// with kubelet's container-name label. It names no namespaces, so
/// containerd puts it in the pod's PID namespace (as kubelet asks only for
/// a pod with `shareProcessNamespace`; see [`kubelet_namespaces`]).
pub fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("io.kubernetes.container.name".to_string(), name.to_string())]),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// The ContainerConfig kubelet sends for the first attempt of container
/// `name` in the pod `pod` (for tests that make CRI calls themselves
/// instead of running the kubelet simulator): [`container_config`] with
/// kubelet's pod labels and the annotations the shim reads (restart count,
/// the pod's termination grace period in seconds).
pub fn kubelet_container_config(
    pod: &PodSandboxConfig,
    name: &str,
    command: Vec<String>,
    grace_secs: u64,
) -> ContainerConfig {
    let mut config = container_config(name, &[]);
    config.command = command;
    for key in [
        "io.kubernetes.pod.name",
        "io.kubernetes.pod.namespace",
        "io.kubernetes.pod.uid",
    ] {
        if let Some(v) = pod.labels.get(key) {
            config.labels.insert(key.to_string(), v.clone());
        }
    }
    config.annotations = HashMap::from([
        (
            "io.kubernetes.container.restartCount".to_string(),
            "0".to_string(),
        ),
        (
            "io.kubernetes.container.terminationMessagePath".to_string(),
            "/dev/termination-log".to_string(),
        ),
        (
            "io.kubernetes.pod.terminationGracePeriod".to_string(),
            grace_secs.to_string(),
        ),
    ]);
    config
}

/// `sh -c SCRIPT` as a container command.
pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// RunPodSandbox; returns the sandbox id.
pub async fn run_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
) -> Result<String> {
    let resp = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?;
    Ok(resp.into_inner().pod_sandbox_id)
}

/// CreateContainer + StartContainer; returns the container id.
pub async fn start_container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
    pod_config: &PodSandboxConfig,
    config: &ContainerConfig,
) -> Result<String> {
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    Ok(id)
}

/// ContainerStatus of one container, as whatever `rt` talks to (the shim
/// or containerd) answers it.
pub async fn container_status(
    rt: &RuntimeServiceClient<Channel>,
    container_id: &str,
) -> Result<k8s_cri::v1::ContainerStatus> {
    rt.clone()
        .container_status(ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        })
        .await
        .with_context(|| format!("ContainerStatus {container_id}"))?
        .into_inner()
        .status
        .context("ContainerStatus without status")
}

/// The h2 error a call ended with, if it ended with one (tonic keeps it
/// among the status's sources).
pub fn h2_error(status: &tonic::Status) -> Option<&h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = e.source();
    }
    None
}

/// A status's state (UNKNOWN for a value this build does not know).
pub fn state_of(s: &k8s_cri::v1::ContainerStatus) -> ContainerState {
    ContainerState::try_from(s.state).unwrap_or(ContainerState::ContainerUnknown)
}

/// The container's state.
pub async fn container_state(
    rt: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
) -> Result<ContainerState> {
    Ok(state_of(&container_status(rt, container_id).await?))
}

/// Output of [`exec_sync`].
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// ExecSync with a timeout in seconds (0: none).
pub async fn exec_sync(
    rt: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
    cmd: &[&str],
    timeout_secs: i64,
) -> Result<ExecOutput> {
    let resp = rt
        .exec_sync(ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    Ok(ExecOutput {
        exit_code: resp.exit_code,
        stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
    })
}

/// Stop and remove every pod sandbox (and so its containers).
pub async fn remove_all_pods(rt: &mut RuntimeServiceClient<Channel>) -> Result<()> {
    let pods = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items;
    for pod in pods {
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {}", pod.id))?;
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {}", pod.id))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Polling

/// Poll `cond` until it returns true; fail after `timeout`. Polls quickly at
/// first (10 ms), backing off to 100 ms. Clone clients into the closure:
/// `let c = rt.clone(); wait_for(t, "x", || { let mut c = c.clone(); async move { ... } })`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = POLL_MIN;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_MAX);
    }
}

/// Poll `f` until it returns `Ok(Some(value))`; fail after `timeout` with the
/// last error, if any.
pub async fn wait_for_value<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = POLL_MIN;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_MAX);
    }
}

// ---------------------------------------------------------------------------
// The shim process

/// A running `sidecar-shim` binary (the one cargo built for this test).
pub struct ShimProcess {
    child: Option<tokio::process::Child>,
    pid: u32,
    listen: PathBuf,
    admin: PathBuf,
    log_path: PathBuf,
}

impl ShimProcess {
    /// The shim binary under test.
    /// The shim binary: this build's, or the one `SIDECAR_SHIM_TEST_BIN`
    /// names (to run the tests against another build, e.g. an older one).
    pub fn binary() -> &'static Path {
        static BIN: OnceLock<PathBuf> = OnceLock::new();
        BIN.get_or_init(|| {
            std::env::var_os("SIDECAR_SHIM_TEST_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sidecar-shim")))
        })
    }

    /// Spawn `sidecar-shim --listen LISTEN --runtime-endpoint unix://RUNTIME
    /// EXTRA_ARGS...` with `RUST_LOG=debug` (or `$SIDECAR_SHIM_TEST_RUST_LOG`),
    /// stdout and stderr appended to `<listen without extension>.log` next to
    /// the socket, and wait until the listen socket accepts connections.
    /// Unless EXTRA_ARGS name one, the state directory is
    /// `<listen without extension>.state` next to the socket (never the
    /// system's).
    pub async fn start(listen: &Path, runtime_socket: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::start_with_env(listen, runtime_socket, extra_args, &[]).await
    }

    /// [`ShimProcess::start`] with extra environment variables (failpoints).
    pub async fn start_with_env(
        listen: &Path,
        runtime_socket: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log_path = listen.with_extension("log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(
            log,
            "=== sidecar-shim --listen {} --runtime-endpoint unix://{} {}",
            listen.display(),
            runtime_socket.display(),
            extra_args.join(" ")
        )?;
        let rust_log = std::env::var(SHIM_LOG_ENV).unwrap_or_else(|_| "debug".into());
        let mut cmd = tokio::process::Command::new(Self::binary());
        cmd.arg("--listen")
            .arg(listen)
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", runtime_socket.display()));
        if !extra_args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(Self::default_state_dir(listen));
        }
        // Its own admin socket, so that shims sharing a directory do not
        // take each other's (the binary's default is admin.sock next to
        // the CRI socket).
        let admin = match extra_args.iter().position(|a| *a == "--admin-listen") {
            Some(i) => PathBuf::from(extra_args.get(i + 1).copied().unwrap_or_default()),
            None => {
                let admin = listen.with_extension("admin.sock");
                cmd.arg("--admin-listen").arg(&admin);
                admin
            }
        };
        cmd.args(extra_args)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", Self::binary().display()))?;
        let pid = child.id().context("shim exited at once")?;
        let mut shim = ShimProcess {
            child: Some(child),
            pid,
            listen: listen.to_path_buf(),
            admin,
            log_path,
        };
        shim.wait_accepting(SHIM_START_TIMEOUT).await?;
        Ok(shim)
    }

    /// The state directory [`ShimProcess::start`] gives a shim on `listen`.
    pub fn default_state_dir(listen: &Path) -> PathBuf {
        listen.with_extension("state")
    }

    /// Wait until the listen socket accepts a connection (and the process
    /// still runs).
    pub async fn wait_accepting(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut delay = POLL_MIN;
        loop {
            let child = self.child.as_mut().context("shim is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "sidecar-shim exited during startup ({status}); log {}:\n{}",
                    self.log_path.display(),
                    tail(&self.log_path, 40)
                );
            }
            if UnixStream::connect(&self.listen).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sidecar-shim did not accept on {} within {timeout:?}; log {}:\n{}",
                    self.listen.display(),
                    self.log_path.display(),
                    tail(&self.log_path, 40)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn listen(&self) -> &Path {
        &self.listen
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The shim's admin socket: `--admin-listen` if the test gave one,
    /// else `<listen without extension>.admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin.clone()
    }

    /// What `sidecar-shim status --output json` reports through the admin
    /// socket now (whatever its exit code: a shim holding calls may report
    /// itself unhealthy). For waiting until the shim has got somewhere, a
    /// call held, say; judge outcomes from containerd, not from this.
    pub async fn status_json(&self) -> Result<serde_json::Value> {
        let out = tokio::process::Command::new(Self::binary())
            .arg("status")
            .arg("--admin")
            .arg(&self.admin)
            .args(["--output", "json"])
            .output()
            .await
            .context("running sidecar-shim status")?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status printed no JSON (exit {:?}): {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Everything the shim logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// CRI clients connected to the shim's socket.
    pub fn cri(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        cri_client(&self.listen)
    }

    /// Send a signal to the shim. Fails once it has been waited for: its
    /// pid may belong to some other process by then.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .context("the shim has exited and been waited for")?;
        send_signal(pid, signal)
    }

    /// Has it exited? (Reaps it if so.)
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("shim already waited for"),
        }
    }

    /// SIGKILL and wait.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("shim is not running")?;
        child.start_kill()?;
        Ok(child.wait().await?)
    }

    /// SIGTERM and wait for the exit status (at most 60 s).
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        self.terminate_within(Duration::from_secs(60)).await
    }

    /// SIGTERM and wait for the exit status; SIGKILL and fail after `timeout`.
    pub async fn terminate_within(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(timeout).await
    }

    /// Wait for the shim to exit by itself; SIGKILL and fail after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("shim is not running")?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "sidecar-shim did not exit within {timeout:?}; log {}:\n{}",
                    self.log_path.display(),
                    tail(&self.log_path, 40)
                )
            }
        }
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.try_wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- last lines of {} ---\n{}",
                    self.log_path.display(),
                    tail(&self.log_path, 40)
                );
            }
        }
    }
}
