//! `sidecar-shim check FILE|-`: reads Kubernetes manifests and reports, for
//! every pod template in them, how the shim will treat the pods made from it,
//! with the mistakes it can see before a pod ever runs.
//!
//! Manifests are parsed into [`serde_json::Value`] (schema-light: only the
//! fields that matter are read) and the annotations go through the daemon's
//! own parser ([`spec::parse`]), with the labels the pod will have at run time
//! (a Job's pods get the Job controller's labels).
//!
//! Findings have a severity: an `error` means the pod will not get the
//! lifecycle its author meant (the command exits 1); a `warning` means it
//! will, but with a cost or a surprise; an `info` explains a behaviour.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::{CheckArgs, Cli, Config, FileConfig, OutputFormat};
use crate::lifecycle::spec::{
    self, Defaults, OnReadyTimeout, PodSpec, Restart, RestartPolicy, JOB_NAME_LABELS,
    ON_READY_TIMEOUT, PREFIX, READY_PREFIX, READY_TIMEOUT, RESTART_POLICY, SIDECARS,
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One thing the check has to say about a pod template or a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable identifier, e.g. `unknown-sidecar`.
    pub code: &'static str,
    /// The container it is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Finding {
            severity,
            code,
            container: None,
            message: message.into(),
        }
    }

    fn on(mut self, container: &str) -> Self {
        self.container = Some(container.to_owned());
        self
    }
}

/// A container of the template, in spec order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerReport {
    pub name: String,
    /// `sidecar` or `app`.
    pub role: &'static str,
    /// 1-based position in the sidecars' start order (sidecars only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_order: Option<usize>,
}

/// A sidecar in start order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SidecarReport {
    pub name: String,
    /// The readiness check, as the annotation value that gives it.
    pub ready: String,
    /// `annotation`, `preset` or `default`.
    pub ready_source: &'static str,
    /// The mesh preset that made it a sidecar (`istio`, `linkerd`), when no
    /// `sidecar-shim.io/sidecars` annotation lists the pod's sidecars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<&'static str>,
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Setting {
    pub value: String,
    /// `annotation`, `default`, or for the restart policy `job-labels`.
    pub source: &'static str,
}

/// What the shim makes of the pods of one template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodReport {
    /// 1-based number of the YAML document.
    pub document: usize,
    /// Where the pod template is inside the document, e.g. `spec.template`.
    pub path: String,
    pub kind: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Does the shim manage these pods (valid `sidecar-shim.io/` annotations)?
    pub managed: bool,
    /// Regular containers in spec order (the order kubelet starts them in).
    pub containers: Vec<ContainerReport>,
    /// Init containers with `restartPolicy: Always`.
    pub native_sidecars: Vec<String>,
    /// Sidecars in start order (empty when not managed).
    pub sidecars: Vec<SidecarReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<Setting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<Setting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_ready_timeout: Option<Setting>,
    pub findings: Vec<Finding>,
}

/// A finding about a document rather than a pod template (YAML errors,
/// kinds without pods).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocumentFinding {
    pub document: usize,
    #[serde(flatten)]
    pub finding: Finding,
}

/// The whole check of one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The file name as given (`-` for standard input).
    pub source: String,
    pub pods: Vec<PodReport>,
    pub documents: Vec<DocumentFinding>,
    pub errors: usize,
    pub warnings: usize,
}

impl Report {
    /// Did any finding have [`Severity::Error`]?
    pub fn failed(&self) -> bool {
        self.errors > 0
    }

    fn all_findings(&self) -> impl Iterator<Item = &Finding> {
        self.pods
            .iter()
            .flat_map(|p| p.findings.iter())
            .chain(self.documents.iter().map(|d| &d.finding))
    }
}

/// Checks the manifests in `text`; `source` names them in the report.
pub fn check(text: &str, source: &str, defaults: &Defaults) -> Report {
    let mut report = Report {
        source: source.to_owned(),
        pods: Vec::new(),
        documents: Vec::new(),
        errors: 0,
        warnings: 0,
    };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        match <Value as serde::Deserialize>::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(value) => check_object(&value, document, "", defaults, &mut report),
            Err(e) => {
                report.documents.push(DocumentFinding {
                    document,
                    finding: Finding::new(
                        Severity::Error,
                        "yaml",
                        format!("not valid YAML for Kubernetes: {e}"),
                    ),
                });
                // The YAML stream cannot be followed past a syntax error.
                break;
            }
        }
    }
    report.errors = report
        .all_findings()
        .filter(|f| f.severity == Severity::Error)
        .count();
    report.warnings = report
        .all_findings()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    report
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn check_object(obj: &Value, document: usize, prefix: &str, d: &Defaults, report: &mut Report) {
    let doc_finding = |report: &mut Report, severity, code, message: String| {
        report.documents.push(DocumentFinding {
            document,
            finding: Finding::new(severity, code, message),
        })
    };
    if !obj.is_object() {
        doc_finding(
            report,
            Severity::Error,
            "not-an-object",
            format!("{prefix}not a mapping: a Kubernetes object must be one"),
        );
        return;
    }
    let kind = str_at(obj, &["kind"]).unwrap_or("");
    let (template_path, job): (&[&str], bool) = match kind {
        "Pod" => (&[], false),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "PodTemplate" => (&["spec", "template"], false),
        "Job" => (&["spec", "template"], true),
        "CronJob" => (&["spec", "jobTemplate", "spec", "template"], true),
        "List" => {
            match obj.get("items").and_then(Value::as_array) {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        check_object(item, document, &format!("{prefix}items[{i}]."), d, report);
                    }
                }
                None => doc_finding(
                    report,
                    Severity::Warning,
                    "no-items",
                    format!("{prefix}List without items"),
                ),
            }
            return;
        }
        "" => {
            doc_finding(
                report,
                Severity::Warning,
                "no-kind",
                format!("{prefix}object without a kind: skipped"),
            );
            return;
        }
        other => {
            doc_finding(
                report,
                Severity::Info,
                "skipped",
                format!(
                    "{prefix}{other} {:?} has no pod template: skipped",
                    name_of(obj)
                ),
            );
            return;
        }
    };
    let template = match template_path.iter().try_fold(obj, |v, k| v.get(k)) {
        Some(t) => t,
        None => {
            doc_finding(
                report,
                Severity::Error,
                "no-template",
                format!(
                    "{prefix}{kind} {:?} has no {}",
                    name_of(obj),
                    template_path.join(".")
                ),
            );
            return;
        }
    };
    let mut pod = check_template(template, job, d);
    pod.document = document;
    pod.path = format!("{prefix}{}", template_path.join("."))
        .trim_end_matches('.')
        .to_owned();
    pod.kind = kind.to_owned();
    pod.name = name_of(obj);
    pod.namespace = str_at(obj, &["metadata", "namespace"]).map(str::to_owned);
    if kind != "Pod" {
        if let Some(keys) = shim_keys(obj.pointer("/metadata/annotations")) {
            pod.findings.push(Finding::new(
                Severity::Error,
                "annotations-on-workload",
                format!(
                    "{keys} set on the {kind}'s own metadata: they are not copied to its pods; \
                     move them to {}.metadata.annotations",
                    template_path.join(".")
                ),
            ));
        }
    }
    pod.findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    report.pods.push(pod);
}

fn name_of(obj: &Value) -> String {
    str_at(obj, &["metadata", "name"])
        .map(str::to_owned)
        .or_else(|| str_at(obj, &["metadata", "generateName"]).map(|g| format!("{g}*")))
        .unwrap_or_else(|| "<unnamed>".to_owned())
}

/// The `sidecar-shim.io/` keys of an annotations map, comma separated.
fn shim_keys(annotations: Option<&Value>) -> Option<String> {
    let keys: Vec<&str> = annotations?
        .as_object()?
        .keys()
        .filter(|k| k.starts_with(PREFIX))
        .map(String::as_str)
        .collect();
    (!keys.is_empty()).then(|| keys.join(", "))
}

/// A container of the template, as far as the check cares.
struct Container<'a> {
    name: String,
    value: &'a Value,
}

fn containers<'a>(spec: Option<&'a Value>, field: &str) -> Vec<Container<'a>> {
    spec.and_then(|s| s.get(field))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, c)| Container {
                    name: c
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("<{field}[{i}]>")),
                    value: c,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The kind of a lifecycle hook (`postStart`/`preStop`): `exec`, `httpGet`,
/// `sleep`, `tcpSocket`, in the order kubelet's handler runner checks them.
fn hook(container: &Value, which: &str) -> Option<&'static str> {
    let h = container.get("lifecycle")?.get(which)?;
    ["exec", "httpGet", "sleep", "tcpSocket"]
        .into_iter()
        .find(|k| h.get(k).is_some_and(|v| !v.is_null()))
}

/// A container's liveness and startup probes that kubelet connects to it
/// for (`httpGet`, `tcpSocket`, `grpc`), each with about how long after the
/// start kubelet kills the container when every probe fails:
/// initialDelaySeconds + failureThreshold x periodSeconds (kubelet's
/// defaults: 0, 3, 10). Exec probes of a deferred container never kill it:
/// the shim refuses their ExecSync, and kubelet counts a probe that errors
/// as neither success nor failure (measured on kubelet v1.28.7, see the
/// README's Checking manifests).
fn killing_probes(container: &Value) -> Vec<(&'static str, Duration)> {
    let secs =
        |p: &Value, key: &str, default: u64| p.get(key).and_then(Value::as_u64).unwrap_or(default);
    [
        ("livenessProbe", "liveness probe"),
        ("startupProbe", "startup probe"),
    ]
    .into_iter()
    .filter_map(|(key, what)| {
        let p = container.get(key).filter(|p| p.is_object())?;
        if !["httpGet", "tcpSocket", "grpc"]
            .iter()
            .any(|k| p.get(*k).is_some())
        {
            return None;
        }
        let after = secs(p, "initialDelaySeconds", 0)
            + secs(p, "failureThreshold", 3) * secs(p, "periodSeconds", 10);
        Some((what, Duration::from_secs(after)))
    })
    .collect()
}

/// Checks one pod template (a Pod object or a workload's template).
fn check_template(template: &Value, job: bool, d: &Defaults) -> PodReport {
    let mut findings = Vec::new();
    let metadata = template.get("metadata");
    let spec_v = template.get("spec");

    // Annotations and labels as the runtime will see them.
    let mut annotations = HashMap::new();
    if let Some(map) = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
    {
        for (k, v) in map {
            let value = match v {
                Value::String(s) => s.clone(),
                other => {
                    if k.starts_with(PREFIX) {
                        findings.push(Finding::new(
                            Severity::Error,
                            "annotation-not-a-string",
                            format!(
                                "annotation {k}: {other} is not a string; the API server rejects \
                                 it: quote the value, as in {k}: \"{}\"",
                                other.to_string().trim_matches('"')
                            ),
                        ));
                    }
                    other.to_string()
                }
            };
            annotations.insert(k.clone(), value);
        }
    }
    let mut labels: HashMap<String, String> = metadata
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    if job {
        // The Job controller labels every pod it creates.
        for label in JOB_NAME_LABELS {
            labels.insert(label.to_owned(), "<job>".to_owned());
        }
    }

    let regular = containers(spec_v, "containers");
    let init = containers(spec_v, "initContainers");
    let native_sidecars: Vec<String> = init
        .iter()
        .filter(|c| c.value.get("restartPolicy").and_then(Value::as_str) == Some("Always"))
        .map(|c| c.name.clone())
        .collect();
    let template_restart = spec_v
        .and_then(|s| s.get("restartPolicy"))
        .and_then(Value::as_str);

    let mut report = PodReport {
        document: 0,
        path: String::new(),
        kind: String::new(),
        name: String::new(),
        namespace: None,
        managed: false,
        containers: regular
            .iter()
            .map(|c| ContainerReport {
                name: c.name.clone(),
                role: "app",
                start_order: None,
            })
            .collect(),
        native_sidecars: native_sidecars.clone(),
        sidecars: Vec::new(),
        restart_policy: None,
        ready_timeout: None,
        on_ready_timeout: None,
        findings,
    };

    let pod_spec = match spec::parse(&annotations, &labels, d) {
        Ok(Some(s)) => s,
        Ok(None) => {
            report.findings.push(Finding::new(
                Severity::Info,
                "not-managed",
                "no sidecar-shim.io/ annotations: the shim forwards these pods untouched",
            ));
            return report;
        }
        Err(e) => {
            report.findings.push(Finding::new(
                Severity::Error,
                "malformed",
                format!(
                    "{e}; the shim would log a warning and forward these pods untouched \
                     (no sidecar lifecycle)"
                ),
            ));
            return report;
        }
    };
    report.managed = true;
    let presets = spec::applied_presets(&annotations, d);
    for p in &presets {
        report.findings.push(
            Finding::new(
                Severity::Info,
                "preset",
                format!(
                    "no {SIDECARS} annotation, but {} is set: sidecar {} comes from the {} mesh \
                     preset enabled in the config file",
                    p.marker(),
                    p.container(),
                    p.name()
                ),
            )
            .on(p.container()),
        );
    }
    for c in &mut report.containers {
        if let Some(i) = pod_spec.sidecar_index(&c.name) {
            c.role = "sidecar";
            c.start_order = Some(i + 1);
        }
    }
    report.sidecars = pod_spec
        .sidecars
        .iter()
        .map(|s| {
            let preset = presets.iter().find(|p| p.container() == s);
            let explicit = annotations.contains_key(&format!("{READY_PREFIX}{s}"));
            SidecarReport {
                name: s.clone(),
                ready: pod_spec.ready[s].to_string(),
                ready_source: match preset {
                    Some(_) if !explicit => "preset",
                    _ => source(explicit),
                },
                preset: preset.map(|p| p.name()),
            }
        })
        .collect();
    report.ready_timeout = Some(Setting {
        value: fmt_duration(pod_spec.ready_timeout),
        source: source(annotations.contains_key(READY_TIMEOUT)),
    });
    report.on_ready_timeout = Some(Setting {
        value: match pod_spec.on_ready_timeout {
            OnReadyTimeout::Fail => "fail",
            OnReadyTimeout::Start => "start",
        }
        .to_owned(),
        source: source(annotations.contains_key(ON_READY_TIMEOUT)),
    });
    report.restart_policy = Some(restart_setting(&pod_spec, d));

    let f = &mut report.findings;
    check_sidecars_exist(&pod_spec, &regular, &init, f);
    check_order(&pod_spec, &regular, f);
    check_restart(&pod_spec, template_restart, job, d, f);
    if !native_sidecars.is_empty() {
        f.push(Finding::new(
            Severity::Warning,
            "native-sidecars",
            format!(
                "init containers {} have restartPolicy: Always (Kubernetes native sidecars) next \
                 to the {SIDECARS} annotation: both apply. kubelet starts the native sidecars \
                 before every regular container and stops them after. The shim orders only the \
                 regular containers (its sidecars: {}); it recognises the native sidecars as init \
                 containers only on kubelets that set io.kubernetes.container.type, and otherwise \
                 may take one for an app that waits for its sidecars (see the README's Native \
                 sidecars section). Prefer one mechanism per pod",
                native_sidecars.join(", "),
                pod_spec.sidecars.join(", ")
            ),
        ));
    }
    for s in &pod_spec.sidecars {
        let Some(c) = regular.iter().find(|c| &c.name == s) else {
            continue;
        };
        match hook(c.value, "preStop") {
            Some("exec") => f.push(
                Finding::new(
                    Severity::Info,
                    "sidecar-pre-stop",
                    format!(
                        "sidecar {s} has an exec preStop hook: on pod deletion the shim holds \
                         it until every app has exited, so it runs after the apps"
                    ),
                )
                .on(s),
            ),
            Some(kind @ ("httpGet" | "sleep")) => f.push(
                Finding::new(
                    Severity::Info,
                    "sidecar-pre-stop",
                    format!(
                        "sidecar {s} has a {kind} preStop hook: kubelet runs it itself at once \
                         on pod deletion, while the apps still run; only the sidecar's stop \
                         waits for the apps. Use an exec hook to run it after the apps"
                    ),
                )
                .on(s),
            ),
            _ => {}
        }
    }
    report
}

fn source(from_annotation: bool) -> &'static str {
    if from_annotation {
        "annotation"
    } else {
        "default"
    }
}

fn policy_name(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Never => "Never",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Always => "Always",
    }
}

fn restart_setting(s: &PodSpec, d: &Defaults) -> Setting {
    match s.restart {
        Restart::Explicit(p) => Setting {
            value: policy_name(p).to_owned(),
            source: "annotation",
        },
        Restart::JobDefault => Setting {
            value: format!(
                "Job default: an app's exit 0 is final, a failure is final once kubelet has \
                 not restarted it within {}",
                fmt_duration(d.failed_exit_window)
            ),
            source: "job-labels",
        },
        Restart::Default => Setting {
            value: "Always (no Job completion)".to_owned(),
            source: "default",
        },
    }
}

fn check_sidecars_exist(
    s: &PodSpec,
    regular: &[Container],
    init: &[Container],
    f: &mut Vec<Finding>,
) {
    let names: Vec<&str> = regular.iter().map(|c| c.name.as_str()).collect();
    for sidecar in &s.sidecars {
        if names.contains(&sidecar.as_str()) {
            continue;
        }
        let why = if init.iter().any(|c| &c.name == sidecar) {
            format!(
                "{sidecar:?} is an init container; the shim manages only regular containers \
                 (list it under containers, or drop it from {SIDECARS} if it is a native sidecar)"
            )
        } else {
            format!(
                "{sidecar:?} names no container of the template (containers: {})",
                names.join(", ")
            )
        };
        f.push(
            Finding::new(
                Severity::Error,
                "unknown-sidecar",
                format!(
                    "{SIDECARS}: {why}. The apps would wait for it until the ready-timeout, \
                     then the on-ready-timeout applies"
                ),
            )
            .on(sidecar),
        );
    }
}

/// Sidecars after apps (deferred starts), sidecars out of their start order,
/// and postStart hooks of apps whose start is deferred.
fn check_order(s: &PodSpec, regular: &[Container], f: &mut Vec<Finding>) {
    // Which containers kubelet starts before a sidecar they wait for has
    // been created: their start is deferred.
    let mut deferred: Vec<(&str, &str)> = Vec::new(); // (container, missing sidecar)
    for (i, c) in regular.iter().enumerate() {
        let later = &regular[i + 1..];
        // The sidecars c needs: every sidecar for an app, the earlier ones
        // for a sidecar.
        let needs: &[String] = match s.sidecar_index(&c.name) {
            Some(k) => &s.sidecars[..k],
            None => &s.sidecars,
        };
        if let Some(missing) = needs.iter().find(|n| later.iter().any(|l| &&l.name == n)) {
            deferred.push((&c.name, missing));
        }
    }
    for (c, missing) in &deferred {
        if s.is_sidecar(c) {
            f.push(
                Finding::new(
                    Severity::Warning,
                    "sidecar-order",
                    format!(
                        "sidecar {c} is listed before sidecar {missing} in the spec but starts \
                         after it ({SIDECARS} order): kubelet creates containers in spec order, \
                         so {c}'s start is deferred until {missing} is ready; list the sidecars \
                         in the spec in their start order"
                    ),
                )
                .on(c),
            );
        } else {
            f.push(
                Finding::new(
                    Severity::Warning,
                    "sidecar-after-app",
                    format!(
                        "app {c} is listed before sidecar {missing}: kubelet creates containers \
                         in spec order, so the shim answers {c}'s start at once and defers the \
                         real start until its sidecars are ready (it reads as running \
                         meanwhile; exec into it fails); list the sidecars first in the spec"
                    ),
                )
                .on(c),
            );
        }
        let container = regular.iter().find(|x| &x.name == c).expect("listed");
        for (probe, kills_after) in killing_probes(container.value) {
            if kills_after < s.ready_timeout {
                f.push(
                    Finding::new(
                        Severity::Warning,
                        "probe-deferred",
                        format!(
                            "{c} has a {probe} and precedes sidecar {missing}: while {c}'s \
                             start is deferred the probe fails (nothing listens), and \
                             kubelet kills {c} after about {}s of \
                             failures, before the ready-timeout ({}s) gives {missing} up; \
                             list the sidecars first, or give the probe an \
                             initialDelaySeconds past the sidecar's start",
                            kills_after.as_secs(),
                            s.ready_timeout.as_secs()
                        ),
                    )
                    .on(c),
                );
            }
        }
        if let Some(kind @ ("exec" | "httpGet")) = hook(container.value, "postStart") {
            f.push(
                Finding::new(
                    Severity::Warning,
                    "post-start-deferred",
                    format!(
                        "{c} has an {kind} postStart hook and precedes sidecar {missing}: kubelet \
                         runs the hook right after {c}'s StartContainer returns and creates no \
                         further container until it ends, but {c}'s start is deferred, so the \
                         hook runs while {c} is not really started and fails (kubelet then kills \
                         {c} with FailedPostStartHook and restarts it); list the sidecars first"
                    ),
                )
                .on(c),
            );
        }
    }
}

fn check_restart(
    s: &PodSpec,
    template_restart: Option<&str>,
    job: bool,
    d: &Defaults,
    f: &mut Vec<Finding>,
) {
    match (s.restart, template_restart) {
        (Restart::Explicit(p), Some(t)) if t != policy_name(p) => f.push(Finding::new(
            Severity::Warning,
            "restart-policy-mismatch",
            format!(
                "{RESTART_POLICY} is {} but the template's restartPolicy is {t}: the shim goes \
                 by the annotation; make them agree",
                policy_name(p)
            ),
        )),
        (Restart::Explicit(_), _) => {}
        (Restart::JobDefault, t) => {
            let t = t.map_or(String::new(), |t| format!(" ({t})"));
            let how = if job {
                "These are Job pods (the Job controller labels them with batch.kubernetes.io/job-name)"
            } else {
                "These pods carry a Job controller label"
            };
            f.push(Finding::new(
                Severity::Warning,
                "restart-policy-not-visible",
                format!(
                    "no {RESTART_POLICY} annotation: the template's restartPolicy{t} is not \
                     visible to the shim (the CRI does not carry it). {how}, so an app's exit 0 \
                     is final and a failure only once kubelet has not restarted it within {}; \
                     add the annotation {RESTART_POLICY}: \"{}\" so the sidecars are stopped \
                     as the policy says",
                    fmt_duration(d.failed_exit_window),
                    template_restart.unwrap_or("Never")
                ),
            ));
        }
        (Restart::Default, Some(t @ ("Never" | "OnFailure"))) => f.push(Finding::new(
            Severity::Warning,
            "restart-policy-not-visible",
            format!(
                "restartPolicy: {t} is not visible to the shim (the CRI does not carry it) and \
                 these are not Job pods: the shim treats the pod as Always, so its sidecars are \
                 never stopped when the apps finish and the pod never completes; add the \
                 annotation {RESTART_POLICY}: \"{t}\""
            ),
        )),
        (Restart::Default, _) => {}
    }
}

/// A duration as the annotations write it: `90s`, `500ms`, `1s500ms`.
pub fn fmt_duration(d: Duration) -> String {
    let (secs, ms) = (d.as_secs(), d.subsec_millis());
    match (secs, ms) {
        (_, 0) => format!("{secs}s"),
        (0, _) => format!("{ms}ms"),
        _ => format!("{secs}s{ms}ms"),
    }
}

/// Runs `sidecar-shim check`: prints the report on stdout and returns the
/// exit code (0 clean or warnings only, 1 errors, 2 unreadable input).
pub fn run(args: &CheckArgs) -> ExitCode {
    let defaults = match &args.config {
        None => Defaults::default(),
        Some(path) => match FileConfig::load(path)
            .and_then(|file| Config::merge(&Cli::default(), Some(file)))
        {
            Ok(config) => config.lifecycle.defaults(),
            Err(e) => {
                eprintln!("sidecar-shim check: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let stdin = args.file.as_os_str() == "-";
    let text = if stdin {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&args.file)
    };
    let source = args.file.display().to_string();
    let text = match text {
        Ok(text) => text,
        Err(e) => {
            let what = if stdin { "standard input" } else { &source };
            eprintln!("sidecar-shim check: cannot read {what}: {e}");
            return ExitCode::from(2);
        }
    };
    let report = check(&text, &source, &defaults);
    let out = match args.output {
        OutputFormat::Text => render_text(&report),
        OutputFormat::Json => render_json(&report) + "\n",
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (| head) is not worth a panic.
    let _ = stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush());
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The report as readable text.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    for d in &r.documents {
        let _ = writeln!(
            o,
            "{}: document {}: {}[{}]: {}",
            r.source, d.document, d.finding.severity, d.finding.code, d.finding.message
        );
    }
    for p in &r.pods {
        let ns = p
            .namespace
            .as_deref()
            .map_or(String::new(), |n| format!(" in {n}"));
        let _ = writeln!(
            o,
            "{}/{}{ns} ({}, document {}, {})",
            p.kind,
            p.name,
            r.source,
            p.document,
            if p.path.is_empty() { "pod" } else { &p.path }
        );
        let containers: Vec<String> = p
            .containers
            .iter()
            .map(|c| match c.start_order {
                Some(n) => format!("{} (sidecar {n})", c.name),
                None => format!("{} (app)", c.name),
            })
            .collect();
        if p.managed {
            let sidecars: Vec<String> = p
                .sidecars
                .iter()
                .map(|s| match s.preset {
                    Some(preset) => format!("{} ({preset} preset)", s.name),
                    None => s.name.clone(),
                })
                .collect();
            let _ = writeln!(o, "  sidecars in start order: {}", sidecars.join(", "));
        } else {
            let _ = writeln!(o, "  not managed by the shim");
        }
        let _ = writeln!(o, "  containers in spec order: {}", containers.join(", "));
        if !p.native_sidecars.is_empty() {
            let _ = writeln!(
                o,
                "  native sidecars (init containers, not managed): {}",
                p.native_sidecars.join(", ")
            );
        }
        for s in &p.sidecars {
            let _ = writeln!(
                o,
                "  ready check {}: {} ({})",
                s.name, s.ready, s.ready_source
            );
        }
        for (label, s) in [
            ("restart-policy", &p.restart_policy),
            ("ready-timeout", &p.ready_timeout),
            ("on-ready-timeout", &p.on_ready_timeout),
        ] {
            if let Some(s) = s {
                let _ = writeln!(o, "  {label}: {} ({})", s.value, s.source);
            }
        }
        for f in &p.findings {
            let _ = writeln!(o, "  {}[{}]: {}", f.severity, f.code, f.message);
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "{}: {} pod template(s), {} error(s), {} warning(s)",
        r.source,
        r.pods.len(),
        r.errors,
        r.warnings
    );
    o
}

/// The report as pretty JSON.
pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("the report serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str) -> Report {
        check(yaml, "test.yaml", &Defaults::default())
    }

    fn codes(r: &Report) -> Vec<(Severity, &'static str)> {
        r.all_findings().map(|f| (f.severity, f.code)).collect()
    }

    const GOOD_JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: pi}
spec:
  template:
    metadata:
      annotations:
        sidecar-shim.io/sidecars: proxy
        sidecar-shim.io/restart-policy: Never
        sidecar-shim.io/ready.proxy: tcp://:15000
    spec:
      restartPolicy: Never
      containers:
      - {name: proxy, image: p}
      - {name: main, image: m}
"#;

    #[test]
    fn good_job() {
        let r = run(GOOD_JOB);
        assert_eq!(codes(&r), vec![]);
        assert!(!r.failed());
        let p = &r.pods[0];
        assert_eq!((p.kind.as_str(), p.name.as_str()), ("Job", "pi"));
        assert_eq!(p.path, "spec.template");
        assert!(p.managed);
        assert_eq!(p.sidecars[0].ready, "tcp://:15000");
        assert_eq!(p.sidecars[0].ready_source, "annotation");
        let rp = p.restart_policy.as_ref().unwrap();
        assert_eq!((rp.value.as_str(), rp.source), ("Never", "annotation"));
        let rt = p.ready_timeout.as_ref().unwrap();
        assert_eq!((rt.value.as_str(), rt.source), ("90s", "default"));
        assert_eq!(p.containers[0].start_order, Some(1));
        assert_eq!(p.containers[1].role, "app");
    }

    /// A pod with the given annotations (YAML flow pairs), containers and
    /// extra spec lines.
    fn pod(kind: &str, annotations: &str, spec: &str) -> String {
        let (head, tmpl) = match kind {
            "Pod" => ("", ""),
            "CronJob" => (
                "spec:\n  jobTemplate:\n    spec:\n      template:\n",
                "        ",
            ),
            _ => ("spec:\n  template:\n", "    "),
        };
        let i = format!("{tmpl}  ");
        let mut out = format!("kind: {kind}\nmetadata: {{name: x}}\n{head}");
        let _ = writeln!(out, "{tmpl}metadata:\n{i}annotations: {{{annotations}}}");
        let _ = writeln!(out, "{tmpl}spec:");
        for line in spec.lines() {
            let _ = writeln!(out, "{i}{line}");
        }
        out
    }

    #[test]
    fn findings_table() {
        let s = "sidecar-shim.io/sidecars: proxy";
        let sr = "sidecar-shim.io/sidecars: proxy, sidecar-shim.io/restart-policy: Always";
        type Case = (&'static str, String, Vec<(Severity, &'static str)>);
        let cases: Vec<Case> = vec![
            (
                "unmanaged",
                pod("Pod", "a: b", "containers: [{name: app}]"),
                vec![(Severity::Info, "not-managed")],
            ),
            (
                "sidecar names no container",
                pod("Pod", "sidecar-shim.io/sidecars: prxy", "containers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Error, "unknown-sidecar")],
            ),
            (
                "sidecar is an init container",
                pod("Pod", s, "initContainers: [{name: proxy}]\ncontainers: [{name: app}]"),
                vec![(Severity::Error, "unknown-sidecar")],
            ),
            (
                "sidecar after app",
                pod("Deployment", s, "containers: [{name: app}, {name: proxy}]"),
                vec![(Severity::Warning, "sidecar-after-app")],
            ),
            (
                "sidecars out of start order",
                pod(
                    "Pod",
                    "sidecar-shim.io/sidecars: 'a,b'",
                    "containers: [{name: b}, {name: a}, {name: app}]",
                ),
                vec![(Severity::Warning, "sidecar-order")],
            ),
            (
                "postStart exec on a deferred app",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: app, lifecycle: {postStart: {exec: {command: [x]}}}}\n- {name: proxy}",
                ),
                vec![
                    (Severity::Warning, "sidecar-after-app"),
                    (Severity::Warning, "post-start-deferred"),
                ],
            ),
            (
                "liveness probe on a deferred app, killing before the ready-timeout",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: app, livenessProbe: {tcpSocket: {port: 80}}}\n- {name: proxy}",
                ),
                vec![
                    (Severity::Warning, "sidecar-after-app"),
                    (Severity::Warning, "probe-deferred"),
                ],
            ),
            (
                "startup probe on a deferred app, waiting past the ready-timeout",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: app, startupProbe: {exec: {command: [x]}, failureThreshold: 30}}\n- {name: proxy}",
                ),
                vec![(Severity::Warning, "sidecar-after-app")],
            ),
            (
                "exec probes of a deferred app error without killing it",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: app, livenessProbe: {exec: {command: [x]}}, startupProbe: {exec: {command: [x]}}}\n- {name: proxy}",
                ),
                vec![(Severity::Warning, "sidecar-after-app")],
            ),
            (
                "liveness probe on an app after its sidecars is fine",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: proxy}\n- {name: app, livenessProbe: {tcpSocket: {port: 80}}}",
                ),
                vec![],
            ),
            (
                "postStart exec on an app after its sidecars is fine",
                pod(
                    "Pod",
                    s,
                    "containers:\n- {name: proxy}\n- {name: app, lifecycle: {postStart: {exec: {command: [x]}}}}",
                ),
                vec![],
            ),
            (
                "malformed value",
                pod("Pod", "sidecar-shim.io/sidecars: proxy, sidecar-shim.io/ready-timeout: 5m", "containers: [{name: proxy}]"),
                vec![(Severity::Error, "malformed")],
            ),
            (
                "not a string",
                pod("Pod", "sidecar-shim.io/sidecars: proxy, sidecar-shim.io/ready-timeout: 90", "containers: [{name: proxy}]"),
                vec![(Severity::Error, "annotation-not-a-string"), (Severity::Error, "malformed")],
            ),
            (
                "native sidecars next to annotations",
                pod("Pod", s, "initContainers: [{name: n, restartPolicy: Always}, {name: init}]\ncontainers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Warning, "native-sidecars")],
            ),
            (
                "native sidecars alone are not our business",
                pod("Pod", "", "initContainers: [{name: n, restartPolicy: Always}]\ncontainers: [{name: app}]"),
                vec![(Severity::Info, "not-managed")],
            ),
            (
                "exec preStop on a sidecar",
                pod("Pod", s, "containers:\n- {name: proxy, lifecycle: {preStop: {exec: {command: [x]}}}}\n- {name: app}"),
                vec![(Severity::Info, "sidecar-pre-stop")],
            ),
            (
                "Job without restart-policy annotation",
                pod("Job", s, "restartPolicy: OnFailure\ncontainers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Warning, "restart-policy-not-visible")],
            ),
            (
                "CronJob without restart-policy annotation",
                pod("CronJob", s, "restartPolicy: Never\ncontainers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Warning, "restart-policy-not-visible")],
            ),
            (
                "bare Pod with Never and no annotation",
                pod("Pod", s, "restartPolicy: Never\ncontainers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Warning, "restart-policy-not-visible")],
            ),
            (
                "annotation disagrees with restartPolicy",
                pod("Pod", sr, "restartPolicy: Never\ncontainers: [{name: proxy}, {name: app}]"),
                vec![(Severity::Warning, "restart-policy-mismatch")],
            ),
            (
                "Deployment defaults are fine",
                pod("Deployment", s, "containers: [{name: proxy}, {name: app}]"),
                vec![],
            ),
        ];
        for (name, yaml, want) in cases {
            let r = run(&yaml);
            let mut got = codes(&r);
            got.sort();
            let mut want = want;
            want.sort();
            assert_eq!(got, want, "case {name}:\n{yaml}\n{}", render_text(&r));
            assert_eq!(
                r.failed(),
                want.iter().any(|(s, _)| *s == Severity::Error),
                "case {name}"
            );
        }
    }

    #[test]
    fn mesh_presets() {
        use crate::lifecycle::spec::Preset;
        let yaml = pod(
            "Deployment",
            "sidecar.istio.io/status: '{}', linkerd.io/proxy-version: stable",
            "containers: [{name: istio-proxy}, {name: linkerd-proxy}, {name: app}]",
        );
        // Off by default: the mesh annotations alone do nothing.
        let r = run(&yaml);
        assert_eq!(codes(&r), vec![(Severity::Info, "not-managed")]);

        let on = Defaults {
            presets: vec![Preset::Istio, Preset::Linkerd],
            ..Defaults::default()
        };
        let r = check(&yaml, "test.yaml", &on);
        assert!(!r.failed(), "{}", render_text(&r));
        let p = &r.pods[0];
        assert!(p.managed);
        let got: Vec<(&str, &str, &str, Option<&str>)> = p
            .sidecars
            .iter()
            .map(|s| (s.name.as_str(), s.ready.as_str(), s.ready_source, s.preset))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "istio-proxy",
                    "http://:15021/healthz/ready",
                    "preset",
                    Some("istio")
                ),
                (
                    "linkerd-proxy",
                    "http://:4191/ready",
                    "preset",
                    Some("linkerd")
                ),
            ]
        );
        assert_eq!(
            codes(&r),
            vec![(Severity::Info, "preset"), (Severity::Info, "preset")]
        );
        let text = render_text(&r);
        assert!(
            text.contains(
                "sidecars in start order: istio-proxy (istio preset), linkerd-proxy (linkerd preset)"
            ),
            "{text}"
        );
        assert!(text.contains("comes from the istio mesh preset"), "{text}");
        let v: Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(v["pods"][0]["sidecars"][0]["preset"], "istio");

        // An explicit check beats the preset's; the sidecar still comes from it.
        let yaml = pod(
            "Pod",
            "sidecar.istio.io/status: '{}', sidecar-shim.io/ready.istio-proxy: 'tcp://:15090'",
            "containers: [{name: istio-proxy}, {name: app}]",
        );
        let s = &check(&yaml, "test.yaml", &on).pods[0].sidecars[0];
        assert_eq!(
            (s.ready.as_str(), s.ready_source, s.preset),
            ("tcp://:15090", "annotation", Some("istio"))
        );

        // An explicit sidecar list wins: no preset.
        let yaml = pod(
            "Pod",
            "sidecar.istio.io/status: '{}', sidecar-shim.io/sidecars: istio-proxy",
            "containers: [{name: istio-proxy}, {name: app}]",
        );
        let r = check(&yaml, "test.yaml", &on);
        assert_eq!(codes(&r), vec![]);
        let s = &r.pods[0].sidecars[0];
        assert_eq!(
            (s.ready.as_str(), s.ready_source, s.preset),
            ("running", "default", None)
        );
        assert!(!render_json(&r).contains("\"preset\""));
    }

    #[test]
    fn job_pods_get_the_job_default() {
        let r = run(&pod(
            "CronJob",
            "sidecar-shim.io/sidecars: proxy",
            "restartPolicy: Never\ncontainers: [{name: proxy}, {name: app}]",
        ));
        let p = &r.pods[0];
        assert_eq!(p.path, "spec.jobTemplate.spec.template");
        let rp = p.restart_policy.as_ref().unwrap();
        assert_eq!(rp.source, "job-labels");
        assert!(rp.value.contains("30s"), "{rp:?}");
        let msg = &p.findings[0].message;
        assert!(
            msg.contains("sidecar-shim.io/restart-policy: \"Never\""),
            "{msg}"
        );
    }

    #[test]
    fn annotations_on_the_workload_metadata() {
        let yaml = "kind: Deployment\nmetadata:\n  name: web\n  annotations: {sidecar-shim.io/sidecars: proxy}\n\
                    spec:\n  template:\n    spec:\n      containers: [{name: proxy}]\n";
        let r = run(yaml);
        assert!(codes(&r).contains(&(Severity::Error, "annotations-on-workload")));
    }

    #[test]
    fn documents_lists_and_yaml_errors() {
        let yaml = format!(
            "{GOOD_JOB}\n---\n---\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n\
             kind: List\nitems:\n- {{kind: Pod, metadata: {{name: a}}, spec: {{containers: [{{name: c}}]}}}}\n"
        );
        let r = run(&yaml);
        assert_eq!(r.pods.len(), 2);
        assert_eq!(r.pods[1].path, "items[0]");
        assert_eq!(r.pods[1].document, 4);
        assert_eq!(r.documents[0].finding.code, "skipped");
        assert!(!r.failed());

        let r = run("kind: Pod\nmetadata: {name: a\n");
        assert_eq!(codes(&r), vec![(Severity::Error, "yaml")]);
        assert!(r.failed());

        let r = run("- a\n- b\n");
        assert_eq!(codes(&r), vec![(Severity::Error, "not-an-object")]);
    }

    #[test]
    fn json_shape() {
        let r = run(GOOD_JOB);
        let v: Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(v["errors"], 0);
        assert_eq!(v["pods"][0]["sidecars"][0]["name"], "proxy");
        assert_eq!(v["pods"][0]["restart_policy"]["source"], "annotation");
        assert_eq!(v["pods"][0]["containers"][1]["role"], "app");
    }

    #[test]
    fn durations() {
        for (d, s) in [
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1_500), "1s500ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(fmt_duration(d), s);
            assert_eq!(crate::config::parse_duration(s).unwrap(), d);
        }
    }
}
