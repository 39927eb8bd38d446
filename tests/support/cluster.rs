//! A real one-node Kubernetes for end-to-end tests: `hack/cluster up` in a
//! temporary directory (kubelet through the shim under test, or with
//! [`Mode::Direct`] straight at containerd), `kubectl` with parsed JSON,
//! conditions polled until a deadline, `hack/cluster down` on drop.
//!
//! Every error a [`Cluster`] returns from [`Cluster::wait_for`] or
//! [`Cluster::fail`] carries what the API says about the pods and events and
//! the last lines of kubelet's, the shim's and containerd's logs.
//!
//! The cluster runs in `/tmp/sshk-XXXXXX/c` (`/tmp/sshk-XXXXXX/owner.lock`
//! is held while the [`Cluster`] lives): a cluster whose test process died
//! without cleaning up is taken down by the next [`Cluster::up`].
//! `SIDECAR_SHIM_KEEP_TEST_DIRS=1` keeps the directory (logs, state) after
//! `hack/cluster down --keep`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_cri::v1::{
    ContainerFilter, ContainerStatusRequest, ListContainersRequest, ListPodSandboxRequest,
    PodSandboxFilter,
};
use serde_json::Value;

use super::{abandoned, hack, lock_owner, tail, test_images, ShimProcess, IMAGES_ENV, KEEP_ENV};

/// Prefix of the clusters' directories under /tmp (short: socket paths).
const DIR_PREFIX: &str = "sshk-";
/// `hack/cluster up`'s own deadline for the node to get Ready, generous for
/// a loaded 2-core machine (it takes about 4 s on a quiet one).
const UP_TIMEOUT_SECS: u32 = 120;
/// How often [`Cluster::wait_for`] asks again (each ask is a kubectl run).
const POLL: Duration = Duration::from_millis(250);

/// What kubelet's runtime endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// kubelet → sidecar-shim (this build's binary) → containerd.
    Shim,
    /// kubelet → containerd, no shim: the baseline.
    Direct,
}

/// A running one-node cluster (see the module docs).
pub struct Cluster {
    mode: Mode,
    /// `/tmp/sshk-XXXXXX`: the owner's files and the cluster's directory.
    base: Option<tempfile::TempDir>,
    /// The cluster's directory, `hack/cluster --dir`.
    dir: PathBuf,
    up_took: Duration,
    /// Held until after `drop` took the cluster down.
    _owner_lock: fs::File,
}

impl Cluster {
    /// `hack/cluster up` in a new temporary directory; returns once the
    /// node is Ready and pods can be created.
    pub fn up(mode: Mode) -> Result<Self> {
        Self::up_with(mode, &[])
    }

    /// [`Self::up`] with more `hack/cluster up` arguments (`--runtime 2.3`,
    /// `--kubelet-feature-gates EventedPLEG=true`).
    pub fn up_with(mode: Mode, args: &[&str]) -> Result<Self> {
        let images = test_images()?;
        reap_stale_clusters();
        let base = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in("/tmp")
            .context("creating a temporary directory under /tmp")?;
        let owner_lock = lock_owner(base.path())?;
        fs::write(
            base.path().join("owner.pid"),
            std::process::id().to_string(),
        )?;
        let dir = base.path().join("c");
        let mut cmd = Command::new(hack("cluster"));
        cmd.arg("up")
            .arg("--dir")
            .arg(&dir)
            .args(["--timeout", &UP_TIMEOUT_SECS.to_string()])
            .env(IMAGES_ENV, &images)
            .env("SIDECAR_SHIM_BIN", ShimProcess::binary())
            .stdin(Stdio::null());
        if mode == Mode::Direct {
            cmd.arg("--direct");
        }
        cmd.args(args);
        let started = Instant::now();
        let out = cmd.output().context("running hack/cluster up")?;
        let up_took = started.elapsed();
        let cluster = Cluster {
            mode,
            base: Some(base),
            dir,
            up_took,
            _owner_lock: owner_lock,
        };
        if !out.status.success() {
            // Dropping `cluster` takes down whatever did start.
            return Err(cluster.fail(&format!(
                "hack/cluster up failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        eprintln!(
            "cluster ({mode:?}) in {}: node Ready, `hack/cluster up` took {up_took:.1?}",
            cluster.dir.display()
        );
        Ok(cluster)
    }

    /// Two clusters brought up at once, one through the shim and one with
    /// kubelet straight at containerd: `(shim, direct)`.
    pub fn up_pair() -> Result<(Self, Self)> {
        let direct = std::thread::spawn(|| Cluster::up(Mode::Direct));
        let shim = Cluster::up(Mode::Shim);
        let direct = direct
            .join()
            .map_err(|_| anyhow!("bringing up the direct cluster panicked"))?;
        Ok((shim?, direct?))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The cluster's directory (`hack/cluster --dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long `hack/cluster up` took.
    pub fn up_took(&self) -> Duration {
        self.up_took
    }

    /// A component's log: `kubelet`, `sidecar-shim`, `containerd`, `etcd`,
    /// `kube-apiserver`, `kube-controller-manager`, `kube-scheduler`.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.join("log").join(format!("{component}.log"))
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The shim's admin socket (`sidecar-shim status --admin`).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.dir.join("bin/kubectl"));
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--request-timeout=20s")
            .stdin(Stdio::null());
        cmd
    }

    fn run_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        let out = if let Some(input) = stdin {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().context("spawning kubectl")?;
            child
                .stdin
                .take()
                .context("kubectl's stdin")?
                .write_all(input.as_bytes())?;
            child.wait_with_output()?
        } else {
            cmd.output().context("running kubectl")?
        };
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// `kubectl ARGS...`: its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.run_kubectl(args, None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl ARGS... -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.run_kubectl(&all, None)?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("kubectl {}: output is not JSON", all.join(" ")))
    }

    /// `kubectl apply -f -` with these manifests. Applying is idempotent,
    /// so an apiserver that timed out inside (an admission step on a
    /// machine loaded by other tests: "resource quota evaluation timed
    /// out") is asked again, a few times.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.run_kubectl(&["apply", "-f", "-"], Some(yaml)) {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 4 && apiserver_timed_out(&e.to_string()) => {
                    eprintln!("kubectl apply, attempt {attempt}: {e}; applying again");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `kubectl apply -f FILE`; FILE relative to the repository root.
    pub fn apply_file(&self, file: &str) -> Result<()> {
        let path = super::repo_root().join(file);
        let path = path.to_str().context("manifest path is not UTF-8")?;
        self.run_kubectl(&["apply", "-f", path], None)?;
        Ok(())
    }

    /// The pods with this label selector (`kubectl get pods -l SELECTOR`).
    pub fn pods(&self, selector: &str) -> Result<Vec<Value>> {
        let list = self.kubectl_json(&["get", "pods", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Poll `f` every 250 ms until it returns `Ok(Some(value))`. Fails after
    /// `timeout` (with the last error `f` returned, if any) or at once when
    /// `f` returns an error that [`Cluster::fail`] made; either way the
    /// error carries the cluster's diagnostics.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err: Option<anyhow::Error> = None;
        loop {
            match f() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) if e.is::<Fatal>() => return Err(e),
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let last = last_err
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default();
                return Err(self.fail(&format!(
                    "timed out after {timeout:?} waiting for {what}{last}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// An error saying `msg`, with the cluster's diagnostics attached; when
    /// returned from a [`Cluster::wait_for`] closure it ends the wait.
    pub fn fail(&self, msg: &str) -> anyhow::Error {
        anyhow::Error::new(Fatal(format!("{msg}\n{}", self.diagnostics())))
    }

    /// What a user would look at: pods, events, the GOAWAYs kubelet got, and
    /// the last lines of kubelet's, the shim's and containerd's logs.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let mut section = |title: &str, body: String| {
            out.push_str(&format!("--- {title} ---\n{}\n", body.trim_end()));
        };
        section(
            "kubectl get pods -o wide",
            self.kubectl(&["get", "pods", "-o", "wide"])
                .unwrap_or_else(|e| format!("{e:#}")),
        );
        section(
            "kubectl get events",
            self.kubectl(&["get", "events", "--sort-by=.lastTimestamp"])
                .unwrap_or_else(|e| format!("{e:#}")),
        );
        section(
            "pod statuses",
            self.kubectl_json(&["get", "pods"])
                .map(|list| {
                    list["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}: phase {} containers {}",
                                p["metadata"]["name"],
                                p["status"]["phase"],
                                p["status"]["containerStatuses"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_else(|e| format!("{e:#}")),
        );
        section(
            "GOAWAY too_many_pings in kubelet's log",
            self.too_many_pings().to_string(),
        );
        let mut logs = vec!["kubelet", "containerd"];
        if self.mode == Mode::Shim {
            logs.insert(1, "sidecar-shim");
        }
        for component in logs {
            let path = self.log_path(component);
            section(
                &format!("last lines of {}", path.display()),
                tail(&path, 40),
            );
        }
        out
    }

    /// How many times kubelet's log says it got GOAWAY ENHANCE_YOUR_CALM
    /// "too_many_pings" (the HTTP/2 keepalive issue through the shim).
    pub fn too_many_pings(&self) -> usize {
        fs::read_to_string(self.log_path("kubelet"))
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains("GoAway") && l.contains("too_many_pings"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let keep = std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
        let Some(base) = self.base.take() else {
            return;
        };
        // `down` removes the cluster's directory itself, and refuses to if
        // anything is still mounted under it: then nothing is removed here
        // either.
        let mut down_ok = true;
        if self.dir.join("cluster.env").is_file() {
            let mut cmd = Command::new(hack("cluster"));
            cmd.arg("down").arg("--dir").arg(&self.dir);
            if keep {
                cmd.arg("--keep");
            }
            let started = Instant::now();
            match cmd.stdin(Stdio::null()).output() {
                Ok(out) if out.status.success() => {
                    eprintln!(
                        "cluster in {}: `hack/cluster down` took {:.1?}",
                        self.dir.display(),
                        started.elapsed()
                    );
                }
                Ok(out) => {
                    down_ok = false;
                    eprintln!(
                        "hack/cluster down --dir {} failed ({}):\n{}",
                        self.dir.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Err(e) => {
                    down_ok = false;
                    eprintln!("running hack/cluster down: {e}");
                }
            }
        }
        if keep || !down_ok {
            let path = base.keep();
            let _ = fs::write(path.join("keep"), "");
            eprintln!("kept cluster directory {}", self.dir.display());
        } else if let Err(e) = base.close() {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

impl Cluster {
    /// Where the node's `path` is on this machine: the cluster's node shares
    /// the host's file system except for the private directories of its
    /// mount namespace; `/var/log` there is `DIR/containerd/var-log`
    /// (hostPath volumes under /var/log land there).
    pub fn node_path(&self, path: &str) -> PathBuf {
        match path.strip_prefix("/var/log/") {
            Some(rest) => self.dir.join("containerd/var-log").join(rest),
            None => PathBuf::from(path),
        }
    }

    /// What the containers of the pod with this uid recorded (the
    /// manifests' `/record`: the node's /var/log/sidecar-shim-e2e/UID).
    pub fn records(&self, pod_uid: &str) -> Records {
        Records::read(&self.node_path(&format!("{RECORDS_DIR}/{pod_uid}")))
    }

    /// The record directories of every pod that had one, by pod uid.
    pub fn all_records(&self) -> BTreeMap<String, Records> {
        let root = self.node_path(RECORDS_DIR);
        let mut all = BTreeMap::new();
        for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            all.insert(uid, Records::read(&entry.path()));
        }
        all
    }

    /// A pod by name (`kubectl get pod NAME`).
    pub fn pod(&self, name: &str) -> Result<Value> {
        self.kubectl_json(&["get", "pod", name])
    }

    /// `hack/cluster restart COMPONENT --signal SIGNAL`: returns once the
    /// component serves again.
    pub fn restart(&self, component: &str, signal: &str) -> Result<Duration> {
        let started = Instant::now();
        let out = Command::new(hack("cluster"))
            .args(["restart", component, "--signal", signal, "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .context("running hack/cluster restart")?;
        if !out.status.success() {
            return Err(self.fail(&format!(
                "hack/cluster restart {component} --signal {signal} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(started.elapsed())
    }

    /// containerd's own socket (not kubelet's endpoint when that is the shim).
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// The pod's sandboxes and containers as containerd has them, asked over
    /// the CRI straight (never through the shim, whose answers may be
    /// rewritten): every container ever created for the pod, oldest first.
    pub fn runtime_pod(&self, pod_uid: &str) -> Result<RuntimePod> {
        let socket = self.containerd_socket();
        let uid = pod_uid.to_owned();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (mut client, _) = super::cri_client(&socket);
            let labels: std::collections::HashMap<String, String> =
                [("io.kubernetes.pod.uid".to_owned(), uid.clone())].into();
            let sandboxes = client
                .list_pod_sandbox(ListPodSandboxRequest {
                    filter: Some(PodSandboxFilter {
                        label_selector: labels.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .context("ListPodSandbox (containerd)")?
                .into_inner()
                .items;
            let listed = client
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        label_selector: labels,
                        ..Default::default()
                    }),
                })
                .await
                .context("ListContainers (containerd)")?
                .into_inner()
                .containers;
            let mut containers = Vec::new();
            for c in listed {
                let status = match client
                    .container_status(ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: false,
                    })
                    .await
                {
                    Ok(s) => s.into_inner().status,
                    // Removed between the list and now.
                    Err(e) if e.code() == tonic::Code::NotFound => continue,
                    Err(e) => return Err(anyhow!("ContainerStatus {} (containerd): {e}", c.id)),
                };
                let Some(s) = status else { continue };
                let state = super::state_of(&s);
                let meta = s.metadata.clone().unwrap_or_default();
                containers.push(RuntimeContainer {
                    id: s.id.clone(),
                    name: meta.name,
                    attempt: meta.attempt,
                    state: state
                        .as_str_name()
                        .trim_start_matches("CONTAINER_")
                        .to_owned(),
                    created: nanos(s.created_at),
                    started: nanos(s.started_at),
                    finished: nanos(s.finished_at),
                    exit_code: s.exit_code,
                });
            }
            containers.sort_by_key(|c| c.created);
            Ok(RuntimePod {
                sandbox_created: sandboxes
                    .iter()
                    .map(|s| nanos(s.created_at))
                    .min()
                    .flatten(),
                sandboxes: sandboxes.len(),
                containers,
            })
        })
    }

    /// The annotations containerd has for a container (what kubelet sent
    /// in CreateContainer), asked straight.
    pub fn runtime_annotations(&self, container_id: &str) -> Result<BTreeMap<String, String>> {
        let socket = self.containerd_socket();
        let id = container_id.to_owned();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (client, _) = super::cri_client(&socket);
            let status = super::container_status(&client, &id).await?;
            Ok(status.annotations.into_iter().collect())
        })
    }

    /// The failed CRI calls in kubelet's log (klog error lines naming
    /// `remote_runtime.go` or `from runtime service failed`), grouped by
    /// what failed with ids, uids and numbers taken out, with their counts.
    pub fn kubelet_cri_errors(&self) -> BTreeMap<String, usize> {
        self.kubelet_cri_errors_since(0)
    }

    /// [`Cluster::kubelet_cri_errors`] from byte `offset` of kubelet's log
    /// on (see [`Cluster::kubelet_log_len`]).
    pub fn kubelet_cri_errors_since(&self, offset: u64) -> BTreeMap<String, usize> {
        let log = fs::read(self.log_path("kubelet")).unwrap_or_default();
        let from = (offset as usize).min(log.len());
        cri_errors(&String::from_utf8_lossy(&log[from..]))
    }

    /// How many containers containerd was sent RemoveContainer once, twice,
    /// ...: calls -> containers (from containerd's own log, which has a line
    /// for every RemoveContainer it is sent and one for its outcome).
    pub fn runtime_removals(&self) -> BTreeMap<usize, usize> {
        let log = fs::read_to_string(self.log_path("containerd")).unwrap_or_default();
        removals(&log)
    }

    /// kubelet's StopContainer calls that containerd failed with "failed to
    /// kill container ...: ttrpc: closed", by container id, each with whether
    /// containerd's own log shows the container's task go away ("shim
    /// disconnected") within [`KILL_RACE`] of that stop's SIGKILL ("Kill
    /// container", sent when the stop's timeout ran out): the container
    /// exited just as containerd killed it, and the kill found its shim gone.
    pub fn kill_races(&self) -> Vec<(String, bool)> {
        let (kubelet, containerd) = self.kubelet_and_containerd_logs();
        kill_races(&kubelet, &containerd)
    }

    /// kubelet's ContainerStatus calls that failed NotFound, per container:
    /// (id, how many, whether containerd's log has kubelet's removal of it
    /// succeeding). kubelet reads the containers it has just removed once or
    /// twice more (its PLEG and its removal's own lookups), with or without
    /// the shim; a container the shim kept listing after its removal would
    /// be read again every relist.
    pub fn reads_after_removal(&self) -> Vec<(String, usize, bool)> {
        let (kubelet, containerd) = self.kubelet_and_containerd_logs();
        reads_after_removal(&kubelet, &containerd)
    }

    fn kubelet_and_containerd_logs(&self) -> (String, String) {
        let read = |c: &str| fs::read_to_string(self.log_path(c)).unwrap_or_default();
        (read("kubelet"), read("containerd"))
    }

    /// The length of kubelet's log now, for [`Cluster::kubelet_cri_errors_since`].
    pub fn kubelet_log_len(&self) -> u64 {
        fs::metadata(self.log_path("kubelet")).map_or(0, |m| m.len())
    }
}

/// Under the node's /var/log: the manifests' record directories.
pub const RECORDS_DIR: &str = "/var/log/sidecar-shim-e2e";

/// Whether kubectl's error is the apiserver giving up on a step of its own
/// (worth asking again), not a refusal of the manifests.
fn apiserver_timed_out(error: &str) -> bool {
    error.contains("InternalError") && error.contains("timed out")
        || error.contains("the server was unable to return a response in the time allotted")
        || error.contains("context deadline exceeded")
}

/// How close a task's end and containerd's SIGKILL must be to count as one
/// race (see [`Cluster::kill_races`]).
pub const KILL_RACE: f64 = 1.0;

/// See [`Cluster::kill_races`].
pub fn kill_races(kubelet_log: &str, containerd_log: &str) -> Vec<(String, bool)> {
    let failed = kubelet_log.lines().filter(|l| {
        l.contains("\"StopContainer from runtime service failed\"")
            && l.contains("failed to kill container")
            && l.contains("ttrpc: closed")
    });
    let mut out = Vec::new();
    for line in failed {
        let Some((_, rest)) = line.split_once("containerID=\"") else {
            continue;
        };
        let id = rest.split('"').next().unwrap_or_default();
        let times = |needle: &str| -> Vec<f64> {
            containerd_log
                .lines()
                .filter(|l| l.contains(needle))
                .filter_map(containerd_time)
                .collect()
        };
        let kills = times(&format!("msg=\"Kill container \\\"{id}\\\"\""));
        let gone = times(&format!("msg=\"shim disconnected\" id={id}"));
        let raced = kills
            .iter()
            .any(|k| gone.iter().any(|g| (g - k).abs() <= KILL_RACE));
        out.push((id.to_string(), raced));
    }
    out
}

/// See [`Cluster::reads_after_removal`].
pub fn reads_after_removal(kubelet_log: &str, containerd_log: &str) -> Vec<(String, usize, bool)> {
    let mut reads: BTreeMap<&str, usize> = BTreeMap::new();
    let failed = kubelet_log.lines().filter(|l| {
        l.contains("\"ContainerStatus from runtime service failed\"")
            && l.contains("code = NotFound")
    });
    for line in failed {
        if let Some((_, rest)) = line.rsplit_once("containerID=\"") {
            *reads
                .entry(rest.split('"').next().unwrap_or_default())
                .or_default() += 1;
        }
    }
    reads
        .into_iter()
        .map(|(id, n)| {
            let done = format!("msg=\"RemoveContainer for \\\"{id}\\\" returns successfully\"");
            (id.to_string(), n, containerd_log.contains(&done))
        })
        .collect()
}

/// A containerd log line's `time="2026-12-06T06:39:28.521089880Z"` in
/// seconds (from an arbitrary origin; differences within a month are exact).
fn containerd_time(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once("time=\"")?;
    let stamp = rest.split('"').next()?;
    let (date, clock) = stamp.trim_end_matches('Z').split_once('T')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut parts = clock.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(day * 86400.0 + h * 3600.0 + m * 60.0 + s)
}

/// See [`Cluster::runtime_removals`].
pub fn removals(containerd_log: &str) -> BTreeMap<usize, usize> {
    let mut per_container: BTreeMap<&str, usize> = BTreeMap::new();
    for line in containerd_log.lines() {
        let Some((_, rest)) = line.split_once("msg=\"RemoveContainer for \\\"") else {
            continue;
        };
        // The request, not its `... returns successfully` or failure line.
        let Some((id, "\"")) = rest.split_once("\\\"") else {
            continue;
        };
        *per_container.entry(id).or_default() += 1;
    }
    let mut histogram = BTreeMap::new();
    for calls in per_container.into_values() {
        *histogram.entry(calls).or_default() += 1;
    }
    histogram
}

/// See [`Cluster::kubelet_cri_errors`].
pub fn cri_errors(log: &str) -> BTreeMap<String, usize> {
    let mut classes = BTreeMap::new();
    for line in log.lines() {
        if !line.starts_with('E') {
            continue;
        }
        if !(line.contains("remote_runtime.go") || line.contains("from runtime service failed")) {
            continue;
        }
        // `E1205 20:53:16.052828  1234 file.go:42] "message" key=value...`
        let Some((_, rest)) = line.split_once("] ") else {
            continue;
        };
        let file = line
            .split_whitespace()
            .nth(3)
            .and_then(|f| f.split(':').next())
            .unwrap_or("?");
        classes
            .entry(format!("{file}: {}", normalize(rest)))
            .and_modify(|n| *n += 1)
            .or_insert(1);
    }
    classes
}

/// A log message with what differs from one pod or container to the next
/// (hex ids, uids, pod names' random suffixes, numbers) replaced, cut to its
/// first 240 characters.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let w = std::mem::take(word);
        let hexish = w.len() >= 8 && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        let numeric = w.chars().any(|c| c.is_ascii_digit());
        if hexish {
            out.push_str("<id>");
        } else if numeric {
            out.push('N');
        } else {
            out.push_str(&w);
        }
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.chars().take(240).collect()
}

/// A CRI timestamp (nanoseconds since the epoch, 0 for none).
fn nanos(ns: i64) -> Option<i64> {
    (ns > 0).then_some(ns)
}

/// A pod as containerd has it (see [`Cluster::runtime_pod`]).
#[derive(Debug, Clone)]
pub struct RuntimePod {
    pub sandboxes: usize,
    pub sandbox_created: Option<i64>,
    pub containers: Vec<RuntimeContainer>,
}

impl RuntimePod {
    /// The containers named `name`, oldest first.
    pub fn named(&self, name: &str) -> Vec<&RuntimeContainer> {
        self.containers.iter().filter(|c| c.name == name).collect()
    }

    /// The one container named `name`.
    pub fn one(&self, name: &str) -> Result<&RuntimeContainer> {
        match self.named(name).as_slice() {
            [c] => Ok(c),
            other => bail!(
                "containerd has {} containers named {name} for the pod: {other:?}",
                other.len()
            ),
        }
    }
}

/// One container as containerd has it; times are CRI nanoseconds.
#[derive(Debug, Clone)]
pub struct RuntimeContainer {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    /// CREATED, RUNNING, EXITED or UNKNOWN.
    pub state: String,
    pub created: Option<i64>,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub exit_code: i32,
}

/// What the containers of one pod wrote down: per container, its
/// `UPTIME EVENT [DETAIL]` lines (the manifests' `r` function), and any other
/// file of the directory (the proxy's request log) as text.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub containers: BTreeMap<String, Vec<Record>>,
    pub files: BTreeMap<String, String>,
}

/// One line of a container's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `/proc/uptime` when written (10 ms steps, truncated).
    pub at: f64,
    pub event: String,
    pub detail: String,
}

impl Records {
    fn read(dir: &Path) -> Self {
        let mut records = Records::default();
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            if name.contains('.') {
                records.files.insert(name, text);
                continue;
            }
            let lines = text
                .lines()
                .filter_map(|l| {
                    let mut parts = l.splitn(3, ' ');
                    let at = parts.next()?.parse().ok()?;
                    Some(Record {
                        at,
                        event: parts.next()?.to_owned(),
                        detail: parts.next().unwrap_or("").to_owned(),
                    })
                })
                .collect();
            records.containers.insert(name, lines);
        }
        records
    }

    /// The lines of `container` (none if it wrote nothing).
    pub fn of(&self, container: &str) -> &[Record] {
        self.containers
            .get(container)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// When `container` first wrote `event`.
    pub fn first(&self, container: &str, event: &str) -> Option<f64> {
        self.of(container)
            .iter()
            .find(|r| r.event == event)
            .map(|r| r.at)
    }

    /// When `container` first wrote `event`, or an error saying it never
    /// did.
    pub fn at(&self, container: &str, event: &str) -> anyhow::Result<f64> {
        self.first(container, event)
            .ok_or_else(|| anyhow::anyhow!("no {container} {event} record"))
    }

    /// How many times `container` wrote `event`.
    pub fn count(&self, container: &str, event: &str) -> usize {
        self.of(container)
            .iter()
            .filter(|r| r.event == event)
            .count()
    }

    /// `container`'s events in order, e.g. `["start", "connected"]`.
    pub fn events(&self, container: &str) -> Vec<&str> {
        self.of(container)
            .iter()
            .map(|r| r.event.as_str())
            .collect()
    }
}

impl std::fmt::Display for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, lines) in &self.containers {
            let text: Vec<String> = lines
                .iter()
                .map(|r| {
                    format!("{:.2} {} {}", r.at, r.event, r.detail)
                        .trim_end()
                        .to_owned()
                })
                .collect();
            writeln!(f, "  {name}: {}", text.join(" | "))?;
        }
        for (name, text) in &self.files {
            writeln!(f, "  {name}: {} lines", text.lines().count())?;
        }
        Ok(())
    }
}

/// `/proc/uptime` (CLOCK_BOOTTIME, the containers' records' clock) at the
/// wall-clock time `unix_nanos` (a CRI timestamp).
pub fn uptime_of(unix_nanos: i64) -> f64 {
    let (real, boot) = clocks();
    boot + (unix_nanos as f64 / 1e9 - real)
}

/// `/proc/uptime` now, to the nanosecond.
pub fn uptime_now() -> f64 {
    clocks().1
}

/// CLOCK_REALTIME and CLOCK_BOOTTIME read back to back, in seconds.
fn clocks() -> (f64, f64) {
    use nix::libc;
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    (read(libc::CLOCK_REALTIME), read(libc::CLOCK_BOOTTIME))
}

/// An error that ends a [`Cluster::wait_for`] at once.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Clusters whose test process died without taking them down (killed by a
/// timeout, say): `hack/cluster down` and remove. Only directories with our
/// prefix, an `owner.pid`, no `keep` marker and nobody holding the owner's
/// lock.
fn reap_stale_clusters() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let base = entry.path();
            if base.join("keep").exists() {
                continue;
            }
            let Some(owner) = fs::read_to_string(base.join("owner.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let Some(_lock) = abandoned(&base, owner) else {
                continue;
            };
            let dir = base.join("c");
            if dir.join("cluster.env").is_file() {
                let _ = Command::new(hack("cluster"))
                    .arg("down")
                    .arg("--dir")
                    .arg(&dir)
                    .arg("--keep")
                    .stdin(Stdio::null())
                    .output();
            }
            let _ = fs::remove_dir_all(&base);
        }
    });
}

/// The condition `kind` of a Job (or Pod) object, if it is there and True.
pub fn condition_true(obj: &Value, kind: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

/// The status of container `name` in a Pod object (regular containers).
pub fn container_status<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// A pod's name, for messages.
pub fn pod_name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or("?")
}

/// The status of init container `name` in a Pod object.
pub fn init_container_status<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["status"]["initContainerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// A pod's uid.
pub fn pod_uid(pod: &Value) -> &str {
    pod["metadata"]["uid"].as_str().unwrap_or("?")
}

/// The document of `manifest` (a multi-document YAML text) whose
/// `metadata.name` is `name`.
pub fn manifest_doc(manifest: &str, name: &str) -> Result<String> {
    let wanted = format!("\nmetadata:\n  name: {name}\n");
    manifest
        .split("\n---\n")
        .find(|doc| format!("\n{doc}").contains(&wanted))
        .map(|doc| format!("{}\n", doc.trim_end()))
        .with_context(|| format!("no document named {name}"))
}
