//! Pod annotations and labels into a checked [`PodSpec`], and the container
//! annotations kubelet writes that the lifecycle needs ([`parse_pre_stop`],
//! [`grace_period`]).
//!
//! A pod opts in with annotations (they arrive verbatim in
//! `PodSandboxConfig.annotations`, and again in every `CreateContainer`'s
//! `sandbox_config`):
//!
//! | annotation | value | default |
//! |---|---|---|
//! | `sidecar-shim.io/sidecars` | container names of the sidecars, comma separated, in start order: `istio-proxy,log-shipper` | absent: the pod is not managed, unless a [`Preset`] applies |
//! | `sidecar-shim.io/ready.<container>` | that sidecar's readiness check: `running`, `tcp://:PORT`, `http://:PORT/PATH`, `exec:["cmd","arg"]` | `running` |
//! | `sidecar-shim.io/restart-policy` | `Never`, `OnFailure` or `Always`, as in the pod spec (the CRI does not carry it) | see [`Restart`] |
//! | `sidecar-shim.io/ready-timeout` | how long a container waits for its sidecars to be ready: `90s`, `500ms`, `2m`, `1m30s`; more than 0, at most 110s | [`Defaults::ready_timeout`] |
//! | `sidecar-shim.io/on-ready-timeout` | `fail` (the container is not started) or `start` (it is started anyway) | [`Defaults::on_ready_timeout`] |
//!
//! Mesh presets ([`Preset`], off unless [`Defaults::presets`] lists them)
//! manage pods that carry no `sidecar-shim.io/sidecars` annotation but were
//! injected by a service mesh: a pod with Istio's `sidecar.istio.io/status`
//! gets `istio-proxy` as its sidecar, ready on `http://:15021/healthz/ready`;
//! a pod with Linkerd's `linkerd.io/proxy-version` gets `linkerd-proxy`,
//! ready on `http://:4191/ready`; a pod with both gets both, Istio's first.
//! Explicit annotations win: with `sidecar-shim.io/sidecars` set no preset
//! applies, and when a preset applies the other `sidecar-shim.io/` keys work
//! as usual on its sidecars (`sidecar-shim.io/ready.istio-proxy` replaces the
//! preset's check).
//!
//! Everything is checked strictly: an unknown key under `sidecar-shim.io/` (a
//! typo), a malformed value, a readiness check for a container that is not a
//! sidecar, or any of these keys without `sidecar-shim.io/sidecars` is a
//! [`SpecError`] naming the key and the value, so that a mistake is reported
//! instead of silently doing nothing. Surrounding whitespace in values is
//! ignored (YAML block scalars add a trailing newline); spelling and case are
//! not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{parse_duration, ConfigError};

/// The prefix of every annotation the shim reads from a pod.
pub const PREFIX: &str = "sidecar-shim.io/";
/// The sidecars of the pod, in start order.
pub const SIDECARS: &str = "sidecar-shim.io/sidecars";
/// The prefix of the per-sidecar readiness check keys (`ready.<container>`).
pub const READY_PREFIX: &str = "sidecar-shim.io/ready.";
/// The pod's restart policy, which the CRI does not carry.
pub const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";
/// How long a container waits for its sidecars to be ready.
pub const READY_TIMEOUT: &str = "sidecar-shim.io/ready-timeout";
/// What happens when the ready timeout passes.
pub const ON_READY_TIMEOUT: &str = "sidecar-shim.io/on-ready-timeout";

/// A service mesh whose injected proxy the shim can manage without
/// `sidecar-shim.io/` annotations, when the config file enables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// `istio`: pods with `sidecar.istio.io/status` get `istio-proxy`.
    Istio,
    /// `linkerd`: pods with `linkerd.io/proxy-version` get `linkerd-proxy`.
    Linkerd,
}

impl Preset {
    /// Every preset, in the start order of their sidecars when several apply.
    pub const ALL: [Preset; 2] = [Preset::Istio, Preset::Linkerd];

    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Istio => "istio",
            Preset::Linkerd => "linkerd",
        }
    }

    /// The pod annotation the mesh's injector sets, which makes the preset
    /// apply.
    pub fn marker(self) -> &'static str {
        match self {
            Preset::Istio => "sidecar.istio.io/status",
            Preset::Linkerd => "linkerd.io/proxy-version",
        }
    }

    /// The container name of the injected proxy.
    pub fn container(self) -> &'static str {
        match self {
            Preset::Istio => "istio-proxy",
            Preset::Linkerd => "linkerd-proxy",
        }
    }

    /// The proxy's readiness check (its own readiness endpoint).
    pub fn ready_check(self) -> ReadyCheck {
        match self {
            Preset::Istio => ReadyCheck::Http {
                port: 15021,
                path: "/healthz/ready".to_owned(),
            },
            Preset::Linkerd => ReadyCheck::Http {
                port: 4191,
                path: "/ready".to_owned(),
            },
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The presets that give this pod its sidecars, in start order (Istio
/// first): those enabled in `defaults` whose marker annotation the pod has.
/// Empty when the pod has a `sidecar-shim.io/sidecars` annotation, which
/// always wins.
pub fn applied_presets(annotations: &HashMap<String, String>, defaults: &Defaults) -> Vec<Preset> {
    if annotations.contains_key(SIDECARS) {
        return Vec::new();
    }
    Preset::ALL
        .into_iter()
        .filter(|p| defaults.presets.contains(p) && annotations.contains_key(p.marker()))
        .collect()
}

/// The longest ready timeout a pod may ask for.
///
/// A container waiting for its sidecars has its `StartContainer` held by the
/// shim, and kubelet gives up on a `StartContainer` after its
/// runtime-request-timeout (2 minutes by default; see
/// shared/kubelet-cri.md, "Client deadlines"). The held call must be answered
/// before that, with time left for the start itself (the runtime's
/// `StartContainer`, which takes a while on a loaded node) and for the answer
/// to reach kubelet: 110 s leaves 10 s of the 120. Longer waits would make
/// kubelet see a deadline error instead of the shim's answer, and retry.
pub const MAX_READY_TIMEOUT: Duration = Duration::from_secs(110);

/// Sandbox labels that mark a pod created by the Job controller (the newer
/// and the legacy label; either is enough).
pub const JOB_NAME_LABELS: [&str; 2] = ["batch.kubernetes.io/job-name", "job-name"];

/// kubelet's container annotation holding the container's preStop handler:
/// the JSON encoding of a Kubernetes `LifecycleHandler` (kubelet's
/// `pkg/kubelet/kuberuntime/labels.go`, `newContainerAnnotations`:
/// `json.Marshal(container.Lifecycle.PreStop)`).
pub const PRE_STOP_HANDLER: &str = "io.kubernetes.container.preStopHandler";
/// kubelet's container annotation with the pod's
/// `terminationGracePeriodSeconds` (an integer, set when the pod spec has
/// it, which the API server defaults to 30).
pub const TERMINATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";

/// How a sidecar's readiness is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyCheck {
    /// `running`: the sidecar is ready as soon as it runs.
    Running,
    /// `tcp://:PORT`: a TCP connection to 127.0.0.1:PORT in the pod's
    /// network namespace succeeds.
    Tcp { port: u16 },
    /// `http://:PORT/PATH`: `GET PATH` on 127.0.0.1:PORT in the pod's network
    /// namespace answers with a 2xx or 3xx status. `path` starts with `/`.
    Http { port: u16, path: String },
    /// `exec:["cmd","arg",...]`: the command, run in the sidecar through the
    /// runtime, exits 0. Never empty.
    Exec { command: Vec<String> },
}

impl fmt::Display for ReadyCheck {
    /// The annotation value that parses back into this check.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadyCheck::Running => f.write_str("running"),
            ReadyCheck::Tcp { port } => write!(f, "tcp://:{port}"),
            ReadyCheck::Http { port, path } => write!(f, "http://:{port}{path}"),
            ReadyCheck::Exec { command } => {
                let json = serde_json::to_string(command).map_err(|_| fmt::Error)?;
                write!(f, "exec:{json}")
            }
        }
    }
}

/// A pod's restart policy, spelled as in the pod spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

/// Where the restart policy came from, which decides when a normal
/// container's exit is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Restart {
    /// The `sidecar-shim.io/restart-policy` annotation.
    Explicit(RestartPolicy),
    /// No annotation, but the sandbox labels mark a Job pod
    /// ([`JOB_NAME_LABELS`]): exit 0 is terminal; a non-zero exit is terminal
    /// once kubelet has not created a new attempt within
    /// [`Defaults::failed_exit_window`] (a Job's pods are `Never` or
    /// `OnFailure`, and only the latter restarts failed containers).
    JobDefault,
    /// No annotation, not a Job pod: treated as `Always` (no Job completion).
    Default,
}

/// What happens when a container's sidecars are not ready within the ready
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReadyTimeout {
    /// `fail`: the container's start fails with an error naming the sidecar.
    Fail,
    /// `start`: the container is started anyway.
    Start,
}

/// A managed pod's checked sidecar settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Container names of the sidecars, in start order (and reverse stop
    /// order). Distinct, valid DNS-1123 labels, at least one.
    pub sidecars: Vec<String>,
    /// The readiness check of every sidecar (exactly the keys of `sidecars`).
    pub ready: BTreeMap<String, ReadyCheck>,
    pub restart: Restart,
    /// More than zero, at most [`MAX_READY_TIMEOUT`] when it came from the
    /// annotation.
    pub ready_timeout: Duration,
    pub on_ready_timeout: OnReadyTimeout,
}

impl PodSpec {
    /// Is the container with this name a sidecar?
    pub fn is_sidecar(&self, name: &str) -> bool {
        self.sidecar_index(name).is_some()
    }

    /// The sidecar's position in start order, or None for a normal container.
    pub fn sidecar_index(&self, name: &str) -> Option<usize> {
        self.sidecars.iter().position(|s| s == name)
    }
}

/// Values used when a pod has no annotation for them (from the config file).
///
/// They are taken as they are: whoever builds them checks them (for the ready
/// timeout, with [`check_ready_timeout`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Defaults {
    /// 90 s.
    pub ready_timeout: Duration,
    /// [`OnReadyTimeout::Fail`].
    pub on_ready_timeout: OnReadyTimeout,
    /// How long a failed normal container of a Job pod without a
    /// restart-policy annotation may wait for kubelet to restart it before
    /// its exit counts as terminal ([`Restart::JobDefault`]): 30 s, enough
    /// for kubelet's first crash-loop backoff (10 s) plus a sync.
    pub failed_exit_window: Duration,
    /// The mesh presets enabled on this node: none.
    pub presets: Vec<Preset>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            ready_timeout: Duration::from_secs(90),
            on_ready_timeout: OnReadyTimeout::Fail,
            failed_exit_window: Duration::from_secs(30),
            presets: Vec::new(),
        }
    }
}

/// A pod annotation with a value the shim does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}={value:?}: {reason}")]
pub struct SpecError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl SpecError {
    fn new(key: &str, value: &str, reason: impl Into<String>) -> Self {
        SpecError {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The sidecar spec of a pod from its sandbox's annotations and labels:
/// `Ok(None)` when the pod is not managed (no `sidecar-shim.io/` annotation
/// at all, and no enabled [`Preset`] applies). Errors are reported for the keys in sorted order, so the same
/// annotations always give the same error.
pub fn parse(
    annotations: &HashMap<String, String>,
    labels: &HashMap<String, String>,
    defaults: &Defaults,
) -> Result<Option<PodSpec>, SpecError> {
    let mut ours: Vec<(&str, &str)> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    ours.sort_unstable();

    let presets = applied_presets(annotations, defaults);
    let (sidecars, listed_in) = match annotations.get(SIDECARS) {
        Some(value) => (
            parse_sidecars(value).map_err(|reason| SpecError::new(SIDECARS, value, reason))?,
            format!("{SIDECARS} ({value:?})"),
        ),
        None if !presets.is_empty() => {
            let names: Vec<&str> = presets.iter().map(|p| p.container()).collect();
            (
                names.iter().map(|n| (*n).to_owned()).collect(),
                format!("the mesh presets ({:?})", names.join(",")),
            )
        }
        None => {
            return match ours.first() {
                None => Ok(None),
                Some((key, value)) => Err(SpecError::new(
                    key,
                    value,
                    format!(
                        "set but no {SIDECARS} annotation: list the pod's sidecar containers there"
                    ),
                )),
            };
        }
    };

    let mut ready = BTreeMap::new();
    let mut restart = None;
    let mut ready_timeout = defaults.ready_timeout;
    let mut on_ready_timeout = defaults.on_ready_timeout;
    for (key, raw) in ours {
        let value = raw.trim();
        let err = |reason: String| SpecError::new(key, raw, reason);
        match &key[PREFIX.len()..] {
            "sidecars" => {}
            "restart-policy" => restart = Some(parse_restart_policy(value).map_err(err)?),
            "ready-timeout" => ready_timeout = parse_ready_timeout(value).map_err(err)?,
            "on-ready-timeout" => on_ready_timeout = parse_on_ready_timeout(value).map_err(err)?,
            name => match name.strip_prefix("ready.") {
                Some(container) => {
                    if !sidecars.iter().any(|s| s == container) {
                        return Err(err(format!(
                            "{container:?} is not a sidecar: a readiness check is only for \
                             containers listed in {listed_in}"
                        )));
                    }
                    ready.insert(container.to_owned(), parse_ready_check(value).map_err(err)?);
                }
                None => {
                    return Err(err(format!(
                        "unknown {PREFIX} annotation; the known ones are sidecars, \
                         ready.<container>, restart-policy, ready-timeout and on-ready-timeout"
                    )))
                }
            },
        }
    }
    // An explicit ready.<container> annotation beats the preset's check.
    for preset in &presets {
        ready
            .entry(preset.container().to_owned())
            .or_insert_with(|| preset.ready_check());
    }
    for sidecar in &sidecars {
        ready.entry(sidecar.clone()).or_insert(ReadyCheck::Running);
    }
    let restart = match restart {
        Some(policy) => Restart::Explicit(policy),
        None if JOB_NAME_LABELS.iter().any(|l| labels.contains_key(*l)) => Restart::JobDefault,
        None => Restart::Default,
    };
    Ok(Some(PodSpec {
        sidecars,
        ready,
        restart,
        ready_timeout,
        on_ready_timeout,
    }))
}

fn parse_sidecars(value: &str) -> Result<Vec<String>, String> {
    let mut sidecars: Vec<String> = Vec::new();
    for (i, entry) in value.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            return Err(format!(
                "entry {} is empty; list container names separated by commas, as in \
                 \"istio-proxy,log-shipper\"",
                i + 1
            ));
        }
        if let Err(why) = check_dns1123_label(entry) {
            return Err(format!("{entry:?} is not a container name: {why}"));
        }
        if sidecars.iter().any(|s| s == entry) {
            return Err(format!("{entry:?} is listed twice"));
        }
        sidecars.push(entry.to_owned());
    }
    Ok(sidecars)
}

/// Container names are DNS-1123 labels: at most 63 characters of `a-z`,
/// `0-9` and `-`, starting and ending with a letter or digit.
fn check_dns1123_label(name: &str) -> Result<(), &'static str> {
    const RULE: &str = "a container name is at most 63 lowercase letters, digits and '-', \
                        starting and ending with a letter or digit";
    let bytes = name.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.len() > 63
        || !bytes.iter().all(|b| alnum(b) || *b == b'-')
        || !bytes.first().is_some_and(alnum)
        || !bytes.last().is_some_and(alnum)
    {
        return Err(RULE);
    }
    Ok(())
}

fn parse_restart_policy(value: &str) -> Result<RestartPolicy, String> {
    match value {
        "Never" => Ok(RestartPolicy::Never),
        "OnFailure" => Ok(RestartPolicy::OnFailure),
        "Always" => Ok(RestartPolicy::Always),
        _ => Err("expected Never, OnFailure or Always, spelled as in the pod spec".to_owned()),
    }
}

fn parse_on_ready_timeout(value: &str) -> Result<OnReadyTimeout, String> {
    match value {
        "fail" => Ok(OnReadyTimeout::Fail),
        "start" => Ok(OnReadyTimeout::Start),
        _ => Err("expected fail or start".to_owned()),
    }
}

fn parse_ready_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_duration(value).map_err(|e| match e {
        ConfigError::InvalidDuration { reason, .. } => reason,
        other => other.to_string(),
    })?;
    check_ready_timeout(timeout)?;
    Ok(timeout)
}

/// A ready timeout must be more than zero and at most [`MAX_READY_TIMEOUT`]
/// (a held `StartContainer` must be answered before kubelet's deadline).
pub fn check_ready_timeout(timeout: Duration) -> Result<(), String> {
    if timeout.is_zero() {
        return Err("must be more than 0".to_owned());
    }
    if timeout > MAX_READY_TIMEOUT {
        return Err(format!(
            "at most {}s: a container's StartContainer is held while it waits, and kubelet \
             gives up on a StartContainer after 2 minutes",
            MAX_READY_TIMEOUT.as_secs()
        ));
    }
    Ok(())
}

/// Parses a readiness check as written in a `sidecar-shim.io/ready.<name>`
/// annotation (already trimmed).
pub fn parse_ready_check(value: &str) -> Result<ReadyCheck, String> {
    if value == "running" {
        return Ok(ReadyCheck::Running);
    }
    if let Some(rest) = value.strip_prefix("tcp://") {
        let port = parse_port_authority(rest, "tcp://:PORT")?;
        return Ok(ReadyCheck::Tcp { port });
    }
    if let Some(rest) = value.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let port = parse_port_authority(authority, "http://:PORT/PATH")?;
        if let Some(bad) = path.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "the path may only hold printable ASCII characters without spaces \
                 (percent-encode others), found {bad:?}"
            ));
        }
        return Ok(ReadyCheck::Http {
            port,
            path: path.to_owned(),
        });
    }
    if let Some(rest) = value.strip_prefix("exec:") {
        let command: Vec<String> = serde_json::from_str(rest).map_err(|e| {
            format!(
                "exec: needs a JSON array of strings, as in exec:[\"sh\",\"-c\",\"test -f /tmp/ready\"]: {e}"
            )
        })?;
        match command.first() {
            None => return Err("the exec command is empty".to_owned()),
            Some(program) if program.is_empty() => {
                return Err("the exec command's program (its first element) is empty".to_owned())
            }
            Some(_) => {}
        }
        return Ok(ReadyCheck::Exec { command });
    }
    Err(
        "unknown readiness check; expected running, tcp://:PORT, http://:PORT/PATH or \
         exec:[\"cmd\",\"arg\",...]"
            .to_owned(),
    )
}

/// `:PORT` (an empty host): checks only ever connect to the pod's own
/// loopback address, so naming a host is a mistake (it would be ignored).
fn parse_port_authority(authority: &str, form: &str) -> Result<u16, String> {
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(format!("missing :PORT; write {form}"));
    };
    if !host.is_empty() {
        return Err(format!(
            "no host allowed (found {host:?}): checks only connect to 127.0.0.1 in the pod's \
             network namespace; write {form}"
        ));
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the port {port:?} is not a number; write {form}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("the port {port} is out of range 1..65535")),
    }
}

/// A container's preStop hook, as far as the lifecycle cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreStop {
    /// An exec hook: kubelet runs this command through the CRI's `ExecSync`.
    Exec(Vec<String>),
    /// An HTTP hook: kubelet runs it itself, the CRI never sees it.
    Http,
    /// A sleep hook: kubelet sleeps itself, the CRI never sees it.
    Sleep(Duration),
    /// Something else, or an annotation that does not parse.
    Other,
}

/// The JSON kubelet writes (the fields of `v1.LifecycleHandler` that matter
/// here; `exec.command` is `omitempty`, `sleep.seconds` is an int64).
#[derive(Deserialize)]
struct LifecycleHandler {
    exec: Option<ExecAction>,
    #[serde(rename = "httpGet")]
    http_get: Option<serde_json::Value>,
    sleep: Option<SleepAction>,
}

#[derive(Deserialize)]
struct ExecAction {
    command: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct SleepAction {
    seconds: i64,
}

/// The preStop hook from kubelet's container annotations
/// ([`PRE_STOP_HANDLER`]): None when the container has none, `Some(Other)`
/// when the annotation does not parse or holds a handler kubelet does not run
/// (`tcpSocket`, or no handler). When several handlers are set (the API
/// server rejects that), the one kubelet's handler runner picks wins: exec,
/// then httpGet, then sleep.
pub fn parse_pre_stop(annotations: &HashMap<String, String>) -> Option<PreStop> {
    let raw = annotations.get(PRE_STOP_HANDLER)?;
    let Ok(handler) = serde_json::from_str::<LifecycleHandler>(raw) else {
        return Some(PreStop::Other);
    };
    Some(if let Some(exec) = handler.exec {
        match exec.command {
            Some(command) if !command.is_empty() => PreStop::Exec(command),
            _ => PreStop::Other,
        }
    } else if handler.http_get.is_some_and(|h| !h.is_null()) {
        PreStop::Http
    } else if let Some(sleep) = handler.sleep {
        match u64::try_from(sleep.seconds) {
            Ok(secs) => PreStop::Sleep(Duration::from_secs(secs)),
            Err(_) => PreStop::Other,
        }
    } else {
        PreStop::Other
    })
}

/// The pod's termination grace period from kubelet's container annotations
/// ([`TERMINATION_GRACE_PERIOD`], whole seconds); None when missing,
/// negative or not a number.
pub fn grace_period(annotations: &HashMap<String, String>) -> Option<Duration> {
    let secs: i64 = annotations.get(TERMINATION_GRACE_PERIOD)?.parse().ok()?;
    u64::try_from(secs).ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse_with(pairs: &[(&str, &str)]) -> Result<Option<PodSpec>, SpecError> {
        parse(&map(pairs), &HashMap::new(), &Defaults::default())
    }

    fn spec(pairs: &[(&str, &str)]) -> PodSpec {
        match parse_with(pairs) {
            Ok(Some(spec)) => spec,
            other => panic!("{pairs:?}: {other:?}"),
        }
    }

    #[test]
    fn unmanaged_pods() {
        assert_eq!(parse_with(&[]), Ok(None));
        assert_eq!(
            parse_with(&[
                ("example.com/sidecars", "x"),
                ("sidecar-shim.io", "x"),
                ("SIDECAR-SHIM.IO/sidecars", "x"),
            ]),
            Ok(None)
        );
    }

    #[test]
    fn defaults() {
        let s = spec(&[(SIDECARS, "proxy")]);
        assert_eq!(
            s,
            PodSpec {
                sidecars: vec!["proxy".into()],
                ready: BTreeMap::from([("proxy".into(), ReadyCheck::Running)]),
                restart: Restart::Default,
                ready_timeout: Duration::from_secs(90),
                on_ready_timeout: OnReadyTimeout::Fail,
            }
        );
        let custom = Defaults {
            ready_timeout: Duration::from_secs(7),
            on_ready_timeout: OnReadyTimeout::Start,
            failed_exit_window: Duration::from_secs(1),
            presets: Vec::new(),
        };
        let s = parse(&map(&[(SIDECARS, "proxy")]), &HashMap::new(), &custom)
            .unwrap()
            .unwrap();
        assert_eq!(s.ready_timeout, Duration::from_secs(7));
        assert_eq!(s.on_ready_timeout, OnReadyTimeout::Start);
    }

    #[test]
    fn mesh_presets() {
        const ISTIO: (&str, &str) = (
            "sidecar.istio.io/status",
            "{\"containers\":[\"istio-proxy\"]}",
        );
        const LINKERD: (&str, &str) = ("linkerd.io/proxy-version", "stable-2.14.10");
        let istio_ready = || ReadyCheck::Http {
            port: 15021,
            path: "/healthz/ready".into(),
        };
        let linkerd_ready = || ReadyCheck::Http {
            port: 4191,
            path: "/ready".into(),
        };
        let both = vec![Preset::Linkerd, Preset::Istio];
        type Case = (
            &'static str,
            Vec<Preset>,
            Vec<(&'static str, &'static str)>,
            Option<Vec<(&'static str, ReadyCheck)>>,
        );
        let cases: Vec<Case> = vec![
            (
                "istio pod",
                both.clone(),
                vec![ISTIO, ("app", "web")],
                Some(vec![("istio-proxy", istio_ready())]),
            ),
            (
                "linkerd pod",
                vec![Preset::Linkerd],
                vec![LINKERD],
                Some(vec![("linkerd-proxy", linkerd_ready())]),
            ),
            (
                "both meshes: Istio's proxy first, whatever the config order",
                both.clone(),
                vec![LINKERD, ISTIO],
                Some(vec![
                    ("istio-proxy", istio_ready()),
                    ("linkerd-proxy", linkerd_ready()),
                ]),
            ),
            (
                "both annotations, only linkerd enabled",
                vec![Preset::Linkerd],
                vec![LINKERD, ISTIO],
                Some(vec![("linkerd-proxy", linkerd_ready())]),
            ),
            ("presets off: unmanaged", vec![], vec![ISTIO, LINKERD], None),
            (
                "istio preset enabled, linkerd pod: unmanaged",
                vec![Preset::Istio],
                vec![LINKERD],
                None,
            ),
            (
                "presets on, no mesh annotation",
                both.clone(),
                vec![("app", "web")],
                None,
            ),
            (
                "explicit sidecars win",
                both.clone(),
                vec![ISTIO, (SIDECARS, "log-shipper")],
                Some(vec![("log-shipper", ReadyCheck::Running)]),
            ),
            (
                "explicit sidecars naming the proxy get no preset check",
                both.clone(),
                vec![ISTIO, (SIDECARS, "istio-proxy")],
                Some(vec![("istio-proxy", ReadyCheck::Running)]),
            ),
            (
                "explicit ready check beats the preset's",
                both.clone(),
                vec![ISTIO, ("sidecar-shim.io/ready.istio-proxy", "tcp://:15090")],
                Some(vec![("istio-proxy", ReadyCheck::Tcp { port: 15090 })]),
            ),
        ];
        for (name, presets, pairs, want) in cases {
            let defaults = Defaults {
                presets,
                ..Defaults::default()
            };
            let got = parse(&map(&pairs), &HashMap::new(), &defaults)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = want.map(|w| {
                (
                    w.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>(),
                    w.into_iter()
                        .map(|(n, c)| (n.to_string(), c))
                        .collect::<BTreeMap<_, _>>(),
                )
            });
            assert_eq!(got.map(|s| (s.sidecars, s.ready)), want, "{name}");
        }
    }

    #[test]
    fn mesh_presets_with_other_keys() {
        let defaults = Defaults {
            presets: vec![Preset::Istio],
            ..Defaults::default()
        };
        let a = map(&[
            ("sidecar.istio.io/status", "{}"),
            (RESTART_POLICY, "Never"),
            (READY_TIMEOUT, "30s"),
        ]);
        let s = parse(&a, &HashMap::new(), &defaults).unwrap().unwrap();
        assert_eq!(s.restart, Restart::Explicit(RestartPolicy::Never));
        assert_eq!(s.ready_timeout, Duration::from_secs(30));
        // Keys are still checked strictly, against the preset's sidecars.
        let a = map(&[
            ("sidecar.istio.io/status", "{}"),
            ("sidecar-shim.io/ready.app", "running"),
        ]);
        let err = parse(&a, &HashMap::new(), &defaults).unwrap_err();
        assert_eq!(err.key, "sidecar-shim.io/ready.app");
        assert!(
            err.reason.contains("mesh presets (\"istio-proxy\")"),
            "{err}"
        );
        let a = map(&[("sidecar.istio.io/status", "{}"), (READY_TIMEOUT, "5m")]);
        assert_eq!(
            parse(&a, &HashMap::new(), &defaults).unwrap_err().key,
            READY_TIMEOUT
        );
        // Without the preset the same keys are the usual error.
        let err = parse(&a, &HashMap::new(), &Defaults::default()).unwrap_err();
        assert!(err.reason.contains("set but no"), "{err}");
        // Preset names and checks round trip through the config spelling.
        for p in Preset::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
            assert_eq!(
                parse_ready_check(&p.ready_check().to_string()),
                Ok(p.ready_check())
            );
        }
    }

    #[test]
    fn sidecar_lists() {
        let ok: &[(&str, &[&str])] = &[
            ("proxy", &["proxy"]),
            ("istio-proxy,log-shipper", &["istio-proxy", "log-shipper"]),
            (" b , a ", &["b", "a"]),
            ("a\n", &["a"]),
            ("0", &["0"]),
            ("a-b-9", &["a-b-9"]),
            (&"x".repeat(63), &[&"x".repeat(63)]),
        ];
        for (value, want) in ok {
            let s = spec(&[(SIDECARS, value)]);
            assert_eq!(s.sidecars, want.to_vec(), "{value:?}");
            assert_eq!(s.ready.len(), want.len());
            for (i, name) in want.iter().enumerate() {
                assert_eq!(s.sidecar_index(name), Some(i));
                assert!(s.is_sidecar(name));
            }
            assert!(!s.is_sidecar("app"));
            assert_eq!(s.sidecar_index("app"), None);
        }
        let too_long = "x".repeat(64);
        let bad = [
            ("", "entry 1 is empty"),
            ("  ", "entry 1 is empty"),
            ("a,,b", "entry 2 is empty"),
            ("a,", "entry 2 is empty"),
            (",a", "entry 1 is empty"),
            ("a,a", "\"a\" is listed twice"),
            ("a, b ,b", "\"b\" is listed twice"),
            ("Proxy", "\"Proxy\" is not a container name"),
            ("-a", "not a container name"),
            ("a-", "not a container name"),
            ("a_b", "not a container name"),
            ("a.b", "not a container name"),
            ("a b", "not a container name"),
            ("é", "not a container name"),
            (too_long.as_str(), "not a container name"),
        ];
        for (value, want) in bad {
            let err = parse_with(&[(SIDECARS, value)]).expect_err(value);
            assert_eq!(err.key, SIDECARS);
            assert_eq!(err.value, value);
            let msg = err.to_string();
            assert!(msg.contains(want), "{value:?}: {msg}");
            assert!(
                msg.starts_with(&format!("annotation {SIDECARS}={value:?}: ")),
                "{msg}"
            );
        }
    }

    #[test]
    fn ready_checks() {
        let ok = [
            ("running", ReadyCheck::Running),
            (" running\n", ReadyCheck::Running),
            ("tcp://:15021", ReadyCheck::Tcp { port: 15021 }),
            ("tcp://:1", ReadyCheck::Tcp { port: 1 }),
            ("tcp://:65535", ReadyCheck::Tcp { port: 65535 }),
            (
                "http://:8080",
                ReadyCheck::Http {
                    port: 8080,
                    path: "/".into(),
                },
            ),
            (
                "http://:8080/",
                ReadyCheck::Http {
                    port: 8080,
                    path: "/".into(),
                },
            ),
            (
                "http://:15021/healthz/ready?full=1",
                ReadyCheck::Http {
                    port: 15021,
                    path: "/healthz/ready?full=1".into(),
                },
            ),
            (
                r#"exec:["cat","/tmp/ready"]"#,
                ReadyCheck::Exec {
                    command: vec!["cat".into(), "/tmp/ready".into()],
                },
            ),
            (
                r#"exec: [ "sh", "-c", "test -f \"/x y\"" ]"#,
                ReadyCheck::Exec {
                    command: vec!["sh".into(), "-c".into(), "test -f \"/x y\"".into()],
                },
            ),
            (
                r#"exec:["true"]"#,
                ReadyCheck::Exec {
                    command: vec!["true".into()],
                },
            ),
        ];
        for (value, want) in ok {
            let s = spec(&[
                (SIDECARS, "proxy,logs"),
                ("sidecar-shim.io/ready.logs", value),
            ]);
            assert_eq!(s.ready["logs"], want, "{value:?}");
            assert_eq!(s.ready["proxy"], ReadyCheck::Running);
            // Display gives back an equivalent annotation value.
            assert_eq!(parse_ready_check(&want.to_string()), Ok(want), "{value:?}");
        }
        let bad = [
            ("", "unknown readiness check"),
            ("Running", "unknown readiness check"),
            ("ready", "unknown readiness check"),
            ("https://:443/", "unknown readiness check"),
            ("TCP://:80", "unknown readiness check"),
            ("grpc://:80", "unknown readiness check"),
            ("tcp://", "missing :PORT"),
            ("tcp://8080", "missing :PORT"),
            ("tcp://:", "the port \"\" is not a number"),
            ("tcp://:http", "the port \"http\" is not a number"),
            ("tcp://:+80", "the port \"+80\" is not a number"),
            ("tcp://:80/", "the port \"80/\" is not a number"),
            ("tcp://:0", "out of range 1..65535"),
            ("tcp://:65536", "out of range 1..65535"),
            ("tcp://:99999999999", "out of range 1..65535"),
            (
                "tcp://localhost:80",
                "no host allowed (found \"localhost\")",
            ),
            ("tcp://127.0.0.1:80", "no host allowed"),
            ("tcp://10.0.0.1:80", "no host allowed"),
            ("tcp://[::1]:80", "no host allowed"),
            ("tcp://user@:80", "no host allowed"),
            ("http://", "missing :PORT"),
            ("http://localhost:8080/", "no host allowed"),
            ("http://example.com/", "missing :PORT"),
            ("http://:0/", "out of range"),
            ("http://:8080?x=1", "not a number"),
            ("http://:8080/a b", "printable ASCII"),
            ("http://:8080/a\r\nX-Injected: 1", "printable ASCII"),
            ("http://:8080/é", "printable ASCII"),
            ("exec:", "JSON array of strings"),
            ("exec:cat /tmp/ready", "JSON array of strings"),
            ("exec:\"cat\"", "JSON array of strings"),
            ("exec:[1,2]", "JSON array of strings"),
            ("exec:[\"a\"] x", "JSON array of strings"),
            ("exec:[]", "the exec command is empty"),
            ("exec:[\"\"]", "program (its first element) is empty"),
        ];
        for (value, want) in bad {
            let key = "sidecar-shim.io/ready.proxy";
            let err = parse_with(&[(SIDECARS, "proxy"), (key, value)]).expect_err(value);
            assert_eq!(err.key, key, "{value:?}");
            assert_eq!(err.value, value, "{value:?}");
            let msg = err.to_string();
            assert!(msg.contains(want), "{value:?}: {msg}");
            assert!(
                msg.starts_with(&format!("annotation {key}={value:?}: ")),
                "{msg}"
            );
        }
    }

    #[test]
    fn ready_check_for_a_container_that_is_not_a_sidecar() {
        let cases = [
            ("sidecar-shim.io/ready.app", "\"app\" is not a sidecar"),
            ("sidecar-shim.io/ready.", "\"\" is not a sidecar"),
            ("sidecar-shim.io/ready.Proxy", "\"Proxy\" is not a sidecar"),
        ];
        for (key, want) in cases {
            let err = parse_with(&[(SIDECARS, "proxy"), (key, "running")]).expect_err(key);
            assert_eq!((err.key.as_str(), err.value.as_str()), (key, "running"));
            assert!(err.reason.contains(want), "{key}: {err}");
            assert!(err.reason.contains("\"proxy\""), "names the list: {err}");
        }
    }

    #[test]
    fn restart_policies() {
        let job = map(&[("batch.kubernetes.io/job-name", "pi")]);
        let legacy_job = map(&[("job-name", "pi")]);
        let plain = map(&[("app", "web")]);
        let cases = [
            (
                Some("Never"),
                &plain,
                Restart::Explicit(RestartPolicy::Never),
            ),
            (
                Some("OnFailure"),
                &plain,
                Restart::Explicit(RestartPolicy::OnFailure),
            ),
            (
                Some("Always"),
                &job,
                Restart::Explicit(RestartPolicy::Always),
            ),
            (
                Some(" Never "),
                &job,
                Restart::Explicit(RestartPolicy::Never),
            ),
            (None, &job, Restart::JobDefault),
            (None, &legacy_job, Restart::JobDefault),
            (None, &plain, Restart::Default),
        ];
        for (value, labels, want) in cases {
            let mut a = map(&[(SIDECARS, "proxy")]);
            if let Some(v) = value {
                a.insert(RESTART_POLICY.into(), v.into());
            }
            let s = parse(&a, labels, &Defaults::default()).unwrap().unwrap();
            assert_eq!(s.restart, want, "{value:?} {labels:?}");
        }
        for value in ["never", "NEVER", "on-failure", "Onfailure", "", "Sometimes"] {
            let err = parse_with(&[(SIDECARS, "proxy"), (RESTART_POLICY, value)]).expect_err(value);
            assert_eq!(
                (err.key.as_str(), err.value.as_str()),
                (RESTART_POLICY, value)
            );
            assert!(
                err.to_string()
                    .contains("expected Never, OnFailure or Always"),
                "{err}"
            );
        }
    }

    #[test]
    fn ready_timeouts() {
        let ok = [
            ("90s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1m30s", Duration::from_secs(90)),
            ("1m50s", Duration::from_secs(110)),
            ("110s", Duration::from_secs(110)),
            ("1ms", Duration::from_millis(1)),
            (" 5s\n", Duration::from_secs(5)),
        ];
        for (value, want) in ok {
            let s = spec(&[(SIDECARS, "proxy"), (READY_TIMEOUT, value)]);
            assert_eq!(s.ready_timeout, want, "{value:?}");
        }
        let bad = [
            ("0s", "more than 0"),
            ("0ms", "more than 0"),
            ("110001ms", "at most 110s"),
            ("2m", "at most 110s"),
            ("1h", "at most 110s"),
            ("90", "missing unit"),
            ("1.5s", "fractions"),
            ("-1s", "expected a number"),
            ("", "empty"),
            ("soon", "expected a number"),
            ("99999999999999999999s", "too large"),
        ];
        for (value, want) in bad {
            let err = parse_with(&[(SIDECARS, "proxy"), (READY_TIMEOUT, value)]).expect_err(value);
            assert_eq!(
                (err.key.as_str(), err.value.as_str()),
                (READY_TIMEOUT, value)
            );
            let msg = err.to_string();
            assert!(msg.contains(want), "{value:?}: {msg}");
            assert!(
                msg.starts_with(&format!("annotation {READY_TIMEOUT}={value:?}: ")),
                "{msg}"
            );
        }
        assert!(check_ready_timeout(Duration::from_secs(90)).is_ok());
        assert!(check_ready_timeout(Duration::ZERO).is_err());
        assert!(check_ready_timeout(MAX_READY_TIMEOUT).is_ok());
        assert!(check_ready_timeout(MAX_READY_TIMEOUT + Duration::from_millis(1)).is_err());
    }

    #[test]
    fn on_ready_timeouts() {
        for (value, want) in [
            ("fail", OnReadyTimeout::Fail),
            ("start", OnReadyTimeout::Start),
            ("start\n", OnReadyTimeout::Start),
        ] {
            let s = spec(&[(SIDECARS, "proxy"), (ON_READY_TIMEOUT, value)]);
            assert_eq!(s.on_ready_timeout, want, "{value:?}");
        }
        for value in ["Fail", "START", "ignore", ""] {
            let err =
                parse_with(&[(SIDECARS, "proxy"), (ON_READY_TIMEOUT, value)]).expect_err(value);
            assert_eq!(
                (err.key.as_str(), err.value.as_str()),
                (ON_READY_TIMEOUT, value)
            );
            assert!(err.to_string().contains("expected fail or start"), "{err}");
        }
    }

    #[test]
    fn unknown_keys() {
        for key in [
            "sidecar-shim.io/sidecar",
            "sidecar-shim.io/readytimeout",
            "sidecar-shim.io/ready",
            "sidecar-shim.io/Ready.proxy",
            "sidecar-shim.io/restartPolicy",
            "sidecar-shim.io/",
            "sidecar-shim.io/sidecars/x",
        ] {
            let err = parse_with(&[(SIDECARS, "proxy"), (key, "x")]).expect_err(key);
            assert_eq!((err.key.as_str(), err.value.as_str()), (key, "x"));
            assert!(
                err.reason.contains("unknown sidecar-shim.io/ annotation"),
                "{err}"
            );
        }
    }

    #[test]
    fn keys_without_a_sidecar_list() {
        let cases = [
            vec![("sidecar-shim.io/ready.x", "running")],
            vec![(RESTART_POLICY, "Never"), ("other.io/a", "b")],
            vec![(READY_TIMEOUT, "10s")],
            vec![(ON_READY_TIMEOUT, "start")],
            vec![("sidecar-shim.io/sidecarz", "proxy")],
        ];
        for pairs in cases {
            let err = parse_with(&pairs).expect_err("no sidecars");
            let (key, value) = pairs[0];
            assert_eq!((err.key.as_str(), err.value.as_str()), (key, value));
            assert!(
                err.to_string()
                    .contains("set but no sidecar-shim.io/sidecars annotation"),
                "{err}"
            );
        }
        // With several, the first in sorted order is named, every time.
        let err = parse_with(&[
            ("sidecar-shim.io/ready.x", "running"),
            (ON_READY_TIMEOUT, "start"),
            (READY_TIMEOUT, "10s"),
        ])
        .unwrap_err();
        assert_eq!(err.key, ON_READY_TIMEOUT);
    }

    #[test]
    fn full_spec() {
        let a = map(&[
            (SIDECARS, "istio-proxy,log-shipper"),
            (
                "sidecar-shim.io/ready.istio-proxy",
                "http://:15021/healthz/ready",
            ),
            (RESTART_POLICY, "OnFailure"),
            (READY_TIMEOUT, "1m"),
            (ON_READY_TIMEOUT, "start"),
            ("example.com/other", "ignored"),
        ]);
        let labels = map(&[("job-name", "pi"), ("io.kubernetes.pod.name", "pi-x")]);
        let s = parse(&a, &labels, &Defaults::default()).unwrap().unwrap();
        assert_eq!(
            s,
            PodSpec {
                sidecars: vec!["istio-proxy".into(), "log-shipper".into()],
                ready: BTreeMap::from([
                    (
                        "istio-proxy".into(),
                        ReadyCheck::Http {
                            port: 15021,
                            path: "/healthz/ready".into()
                        }
                    ),
                    ("log-shipper".into(), ReadyCheck::Running),
                ]),
                restart: Restart::Explicit(RestartPolicy::OnFailure),
                ready_timeout: Duration::from_secs(60),
                on_ready_timeout: OnReadyTimeout::Start,
            }
        );
        // Persisted as JSON by a later issue: round trips.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PodSpec>(&json).unwrap(), s);
    }

    #[test]
    fn pre_stop_handlers() {
        let cases: &[(Option<&str>, Option<PreStop>)] = &[
            (None, None),
            (
                Some(r#"{"exec":{"command":["sh","-c","sleep 1"]}}"#),
                Some(PreStop::Exec(vec![
                    "sh".into(),
                    "-c".into(),
                    "sleep 1".into(),
                ])),
            ),
            (
                Some(
                    r#"{"httpGet":{"path":"/x","port":8080,"host":"","scheme":"HTTP","httpHeaders":[{"name":"a","value":"b"}]}}"#,
                ),
                Some(PreStop::Http),
            ),
            (
                Some(r#"{"httpGet":{"port":"http","scheme":"HTTP"}}"#),
                Some(PreStop::Http),
            ),
            (
                Some(r#"{"sleep":{"seconds":5}}"#),
                Some(PreStop::Sleep(Duration::from_secs(5))),
            ),
            (
                Some(r#"{"sleep":{"seconds":0}}"#),
                Some(PreStop::Sleep(Duration::ZERO)),
            ),
            (Some(r#"{"sleep":{"seconds":-1}}"#), Some(PreStop::Other)),
            (Some(r#"{"sleep":{}}"#), Some(PreStop::Other)),
            (Some(r#"{"tcpSocket":{"port":80}}"#), Some(PreStop::Other)),
            (Some(r#"{"exec":{}}"#), Some(PreStop::Other)),
            (Some(r#"{"exec":{"command":[]}}"#), Some(PreStop::Other)),
            (Some(r#"{"exec":{"command":"ls"}}"#), Some(PreStop::Other)),
            (Some("{}"), Some(PreStop::Other)),
            (Some("null"), Some(PreStop::Other)),
            (Some(""), Some(PreStop::Other)),
            (Some("not json"), Some(PreStop::Other)),
            (Some(r#"{"httpGet":null}"#), Some(PreStop::Other)),
            // kubelet's handler runner checks exec, then httpGet, then sleep.
            (
                Some(r#"{"sleep":{"seconds":1},"httpGet":{"port":1},"exec":{"command":["a"]}}"#),
                Some(PreStop::Exec(vec!["a".into()])),
            ),
            (
                Some(r#"{"sleep":{"seconds":1},"httpGet":{"port":1}}"#),
                Some(PreStop::Http),
            ),
        ];
        for (value, want) in cases {
            let mut a = map(&[("io.kubernetes.container.hash", "1")]);
            if let Some(v) = value {
                a.insert(PRE_STOP_HANDLER.into(), v.to_string());
            }
            assert_eq!(&parse_pre_stop(&a), want, "{value:?}");
        }
    }

    #[test]
    fn grace_periods() {
        let cases = [
            (None, None),
            (Some("30"), Some(Duration::from_secs(30))),
            (Some("0"), Some(Duration::ZERO)),
            (Some("3600"), Some(Duration::from_secs(3600))),
            (Some("-1"), None),
            (Some("30s"), None),
            (Some(""), None),
            (Some("1.5"), None),
            (Some("99999999999999999999"), None),
        ];
        for (value, want) in cases {
            let mut a = map(&[("io.kubernetes.pod.deletionGracePeriod", "5")]);
            if let Some(v) = value {
                a.insert(TERMINATION_GRACE_PERIOD.into(), v.into());
            }
            assert_eq!(grace_period(&a), want, "{value:?}");
        }
    }

    /// Keys that reach every branch of the parser, and arbitrary ones.
    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(SIDECARS.to_owned()),
            Just(RESTART_POLICY.to_owned()),
            Just(READY_TIMEOUT.to_owned()),
            Just(ON_READY_TIMEOUT.to_owned()),
            "[a-c]{0,3}".prop_map(|n| format!("{READY_PREFIX}{n}")),
            ".{0,12}".prop_map(|s| format!("{PREFIX}{s}")),
            ".{0,20}",
        ]
    }

    /// Values near the valid ones, and arbitrary ones.
    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-c ,]{0,8}",
            "(tcp|http)://[a-z:]{0,3}[0-9]{0,6}(/.{0,5})?",
            "exec:.{0,16}",
            r#"exec:\[("[a-z]{0,3}",?){0,3}\]"#,
            "[0-9]{0,4}(h|m|s|ms|x)?[0-9]{0,3}(s|ms)?",
            "(Never|OnFailure|Always|fail|start|running)",
            ".{0,24}",
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            annotations in proptest::collection::hash_map(key_strategy(), value_strategy(), 0..8),
            job in any::<bool>(),
        ) {
            let labels = if job { map(&[("job-name", "j")]) } else { HashMap::new() };
            match parse(&annotations, &labels, &Defaults::default()) {
                Ok(None) => prop_assert!(!annotations.keys().any(|k| k.starts_with(PREFIX))),
                Ok(Some(spec)) => {
                    prop_assert!(!spec.sidecars.is_empty());
                    let names: Vec<&String> = spec.ready.keys().collect();
                    let mut sorted: Vec<&String> = spec.sidecars.iter().collect();
                    sorted.sort();
                    prop_assert_eq!(names, sorted);
                    prop_assert!(!spec.ready_timeout.is_zero());
                    prop_assert!(spec.ready_timeout <= MAX_READY_TIMEOUT);
                }
                Err(e) => {
                    prop_assert!(annotations.contains_key(&e.key));
                    prop_assert_eq!(&annotations[&e.key], &e.value);
                }
            }
        }

        #[test]
        fn container_annotations_never_panic(value in ".{0,40}|\\{\"(exec|sleep|httpGet)\":.{0,30}\\}") {
            let a = HashMap::from([
                (PRE_STOP_HANDLER.to_owned(), value.clone()),
                (TERMINATION_GRACE_PERIOD.to_owned(), value),
            ]);
            prop_assert!(parse_pre_stop(&a).is_some());
            let _ = grace_period(&a);
        }

        #[test]
        fn ready_checks_round_trip(check in prop_oneof![
            Just(ReadyCheck::Running),
            (1..=u16::MAX).prop_map(|port| ReadyCheck::Tcp { port }),
            (1..=u16::MAX, "(/[!-~]{0,10}){1,3}").prop_map(|(port, path)| ReadyCheck::Http { port, path }),
            proptest::collection::vec(".{0,8}", 1..4)
                .prop_filter("program", |c| !c[0].is_empty())
                .prop_map(|command| ReadyCheck::Exec { command }),
        ]) {
            prop_assert_eq!(parse_ready_check(&check.to_string()), Ok(check));
        }
    }
}
