//! The state directory under faults: corrupt files are dropped for their
//! pod alone, and a full or read-only directory never stops the shim, which
//! catches up once writes work again.
//!
//! What matters to a user is checked where the user would see it: a Job pod
//! whose sidecar the shim stopped must read as exited 0 through the shim
//! (kubelet would otherwise read 143 and fail the pod), before and after the
//! shim restarts; containerd is asked directly for what really happened.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use k8s_cri::v1::{ContainerStatus, ContainerStatusRequest, VersionRequest};
use support::kubelet::*;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A Job pod: a sidecar that exits 143 on SIGTERM and a main container that
/// exits 0 after half a second.
fn job(name: &str) -> PodDef {
    PodDef::job(name)
        .annotation("sidecar-shim.io/sidecars", "proxy")
        .annotation("sidecar-shim.io/restart-policy", "Never")
        .container(ContainerDef::new(
            "proxy",
            sh("trap 'exit 143' TERM; while :; do sleep 3600 & wait $!; done"),
        ))
        .container(ContainerDef::new("main", sh("sleep 0.5; exit 0")))
}

struct Env {
    kubelet: Kubelet,
    shim: ShimProcess,
    containerd: PrivateContainerd,
    state: PathBuf,
}

impl Env {
    async fn start() -> Result<Env> {
        let containerd = PrivateContainerd::start().await?;
        let state = ShimProcess::default_state_dir(&containerd.dir().join("shim.sock"));
        Env::with(containerd, state).await
    }

    async fn with(containerd: PrivateContainerd, state: PathBuf) -> Result<Env> {
        let listen = containerd.dir().join("shim.sock");
        let shim = start_shim(&listen, &containerd, &state).await?;
        let kubelet = Kubelet::new(&listen, &containerd.pod_log_root());
        Ok(Env {
            kubelet,
            shim,
            containerd,
            state,
        })
    }

    /// kill -9 the shim (unless it is dead already) and start a new one on
    /// the same state directory; waits for its reconcile.
    async fn restart_shim(&mut self) -> Result<()> {
        if matches!(self.shim.try_status(), Ok(None)) {
            self.shim.kill9().await?;
        }
        self.shim = start_shim(self.shim.listen(), &self.containerd, &self.state).await?;
        let log = self.shim.log_path().to_path_buf();
        wait_for(TIMEOUT, "the new shim to reconcile", || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // The log is appended to: count this shim's lines only.
                let last = text.rsplit("=== sidecar-shim").next().unwrap_or("");
                last.contains("reconciled with the runtime")
            }
        })
        .await
    }

    /// This shim's log lines (the file holds every shim's).
    fn log(&self) -> String {
        let text = self.shim.log();
        text.rsplit("=== sidecar-shim")
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn record_path(&self, pod: &PodHandle) -> PathBuf {
        self.state
            .join("pods")
            .join(format!("{}.json", pod.sandbox_id()))
    }

    /// The sidecar's exit as kubelet reads it through the shim, and as
    /// containerd has it.
    async fn proxy_exit(&self, pod: &PodHandle) -> Result<(i32, i32)> {
        let id = pod.container_ids("proxy").pop().context("no proxy")?;
        let status = |mut rt: k8s_cri::v1::runtime_service_client::RuntimeServiceClient<
            tonic::transport::Channel,
        >,
                      id: String| async move {
            rt.container_status(ContainerStatusRequest {
                container_id: id,
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no status")
        };
        let read: ContainerStatus = status(self.shim.cri().0, id.clone()).await?;
        let truth: ContainerStatus = status(self.containerd.cri().0, id).await?;
        Ok((read.exit_code, truth.exit_code))
    }
}

async fn start_shim(
    listen: &Path,
    containerd: &PrivateContainerd,
    state: &Path,
) -> Result<ShimProcess> {
    let state = state.display().to_string();
    ShimProcess::start(
        listen,
        containerd.socket(),
        &["--state-dir", &state, "--metrics-listen", "127.0.0.1:0"],
    )
    .await
}

/// `sidecar_shim_state_write_errors_total` as the shim's metrics listener
/// (on loopback, at the address it logged) reports it.
async fn state_write_errors_metric(shim: &ShimProcess) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MARK: &str = "serving Prometheus metrics on http://";
    let log = shim.log();
    let line = log
        .rsplit("=== sidecar-shim")
        .next()
        .unwrap_or("")
        .lines()
        .find(|l| l.contains(MARK))
        .context("no metrics address in the log")?
        .to_string();
    let rest = &line[line.find(MARK).expect("found") + MARK.len()..];
    let addr: std::net::SocketAddr = rest.split("/metrics").next().unwrap_or_default().parse()?;
    ensure!(addr.ip().is_loopback(), "metrics on {addr}");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut body)).await??;
    body.lines()
        .find_map(|l| l.strip_prefix("sidecar_shim_state_write_errors_total "))
        .context("no sidecar_shim_state_write_errors_total")?
        .trim()
        .parse()
        .context("not a number")
}

/// A state file as written: header `sidecar-shim-state 1 crc32=X len=N`
/// and a body of N bytes whose CRC-32 is X. (Checked here, not with the
/// shim's own decoder.)
fn valid_record(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .context("no header")?;
    let header = std::str::from_utf8(&bytes[..nl])?;
    let body = &bytes[nl + 1..];
    let words: Vec<&str> = header.split(' ').collect();
    ensure!(
        words.len() == 4 && words[0] == "sidecar-shim-state" && words[1] == "1",
        "header {header:?}"
    );
    let crc = u32::from_str_radix(words[2].trim_start_matches("crc32="), 16)?;
    let len: usize = words[3].trim_start_matches("len=").parse()?;
    ensure!(body.len() == len, "{} bytes, header says {len}", body.len());
    ensure!(crc32fast::hash(body) == crc, "checksum mismatch");
    let _: serde_json::Value = serde_json::from_slice(body).context("body is not JSON")?;
    Ok(())
}

/// Every pod Succeeded and reads its sidecar as exit 0 (containerd: 143).
async fn jobs_done(env: &Env, pods: &[&PodHandle]) -> Result<()> {
    for pod in pods {
        pod.wait_phase(Phase::Succeeded, TIMEOUT)
            .await
            .with_context(|| pod.summary())?;
        let (read, truth) = env.proxy_exit(pod).await?;
        ensure!(
            (read, truth) == (0, 143),
            "{}: proxy reads exit {read}, containerd has {truth}",
            pod.name()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_files_are_dropped_for_their_pod_only() -> Result<()> {
    let mut env = Env::start().await?;
    let good = env.kubelet.run_pod(job("good")).await?;
    let truncated = env.kubelet.run_pod(job("truncated")).await?;
    let garbage = env.kubelet.run_pod(job("garbage")).await?;
    let flipped = env.kubelet.run_pod(job("flipped")).await?;
    let all = [&good, &truncated, &garbage, &flipped];
    jobs_done(&env, &all).await?;
    for pod in all {
        valid_record(&env.record_path(pod))?;
    }

    // The shim dies; meanwhile its files are damaged three ways.
    env.shim.kill9().await?;
    let t = env.record_path(&truncated);
    let len = std::fs::metadata(&t)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)?
        .set_len(len / 2)?;
    std::fs::write(
        env.record_path(&garbage),
        b"\x00\xffnot a state file at all\n\x01\x02",
    )?;
    let f = env.record_path(&flipped);
    let mut bytes = std::fs::read(&f)?;
    let at = bytes.len() - 3;
    bytes[at] ^= 0x01;
    std::fs::write(&f, bytes)?;

    env.restart_shim().await?;
    let log = env.log();
    for pod in [&truncated, &garbage, &flipped] {
        ensure!(
            log.lines()
                .any(|l| l.contains("state file dropped") && l.contains(pod.sandbox_id())),
            "no warning naming {} ({}) in\n{log}",
            pod.name(),
            pod.sandbox_id()
        );
    }
    ensure!(log.contains("restored=1 dropped=3"), "{log}");
    // The shim serves; the good pod keeps what the shim promised it, the
    // damaged ones lost it (their sidecars read as containerd has them).
    env.shim.cri().0.version(VersionRequest::default()).await?;
    ensure!(
        env.proxy_exit(&good).await? == (0, 143),
        "good pod lost its state"
    );
    for pod in [&truncated, &garbage, &flipped] {
        ensure!(
            env.proxy_exit(pod).await? == (143, 143),
            "{}: unexpected exit rewrite",
            pod.name()
        );
        // Rebuilt from the runtime and written anew.
        valid_record(&env.record_path(pod))?;
    }
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir))?;
        Ok(Tmpfs { dir })
    }

    /// Fill it up: a file that takes every free block.
    fn fill(&self) -> Result<()> {
        let out = Command::new("dd")
            .args(["if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", self.dir.join("filler").display()))
            .output()?;
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("No space left"),
            "dd did not fill the tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn remount(&self, opt: &str) -> Result<()> {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `sidecar-shim status --output json` against the shim's admin socket:
/// (exit code, the report's `store`).
async fn store_status(shim: &ShimProcess) -> Result<(Option<i32>, serde_json::Value)> {
    let admin = shim.admin_socket();
    let out = tokio::process::Command::new(ShimProcess::binary())
        .args(["status", "--output", "json", "--admin"])
        .arg(&admin)
        .output()
        .await?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "status output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code(), report["store"].clone()))
}

/// Lines of this shim's log at ERROR about state writes.
fn write_errors(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("cannot write the state"))
        .count()
}

async fn faulty_dir_keeps_the_shim_working(fault: &str) -> Result<()> {
    let containerd = PrivateContainerd::start().await?;
    let base = containerd.dir().join("state-fs");
    let fs = Tmpfs::mount(base.clone(), "256k")?;
    let state = base.join("state");
    // The tmpfs goes first (a lazy unmount), then the shim and containerd,
    // whose directory holds the mount point.
    let mut both = (fs, Env::with(containerd, state).await?);
    let (fs, env) = (&both.0, &mut both.1);
    match fault {
        "full" => fs.fill()?,
        _ => fs.remount("ro")?,
    }

    // Pods run and complete as if nothing were wrong.
    let a = env.kubelet.run_pod(job("during-a")).await?;
    let b = env.kubelet.run_pod(job("during-b")).await?;
    jobs_done(env, &[&a, &b]).await?;
    ensure!(
        !env.record_path(&a).exists() && !env.record_path(&b).exists(),
        "a record was written to a {fault} directory"
    );
    let errors = write_errors(&env.log());
    ensure!(errors >= 1, "no error logged:\n{}", env.log());
    // Many writes failed (each pod changes state several times), but they
    // are logged at most once per 30 s.
    ensure!(errors <= 2, "{errors} error lines: not rate-limited");
    // The status says so, and calls the shim unhealthy.
    let (code, store) = store_status(&env.shim).await?;
    ensure!(
        code == Some(1)
            && store["writable"] == false
            && store["failed_writes"].as_u64() > Some(errors as u64)
            && store["pending"].as_u64() >= Some(2),
        "status exit {code:?}, store {store:#}"
    );
    // The metrics count every failure.
    let counted = state_write_errors_metric(&env.shim).await?;
    ensure!(
        counted >= store["failed_writes"].as_f64().unwrap_or(f64::MAX),
        "metrics counted {counted} failed writes, status {store:#}"
    );

    // Writes work again: the shim catches up on its own.
    match fault {
        "full" => std::fs::remove_file(base.join("filler"))?,
        _ => fs.remount("rw")?,
    }
    wait_for(TIMEOUT, "the records to be written", || {
        let (pa, pb) = (env.record_path(&a), env.record_path(&b));
        async move { valid_record(&pa).is_ok() && valid_record(&pb).is_ok() }
    })
    .await?;
    ensure!(
        env.log().contains("state writes work again"),
        "{}",
        env.log()
    );
    wait_for(TIMEOUT, "the status to say writable", || async {
        store_status(&env.shim)
            .await
            .is_ok_and(|(code, s)| code == Some(0) && s["writable"] == true && s["pending"] == 0)
    })
    .await?;
    // What it wrote is what it knew: a new shim reads it back and keeps
    // the sidecars' exit rewrite.
    env.restart_shim().await?;
    ensure!(env.log().contains("restored=2 dropped=0"), "{}", env.log());
    for pod in [&a, &b] {
        ensure!(
            env.proxy_exit(pod).await? == (0, 143),
            "{} lost its state",
            pod.name()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_state_directory_keeps_the_shim_working_and_it_catches_up() -> Result<()> {
    faulty_dir_keeps_the_shim_working("full").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_state_directory_keeps_the_shim_working_and_it_catches_up() -> Result<()> {
    faulty_dir_keeps_the_shim_working("ro").await
}
