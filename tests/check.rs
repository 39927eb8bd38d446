//! `sidecar-shim check` run as a binary on the sample manifests in
//! `tests/manifests/`: exit codes, key lines of the text report, the JSON
//! shape, standard input, and the daemon's command line left as it was.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn shim(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidecar-shim"));
    // Relative paths, so reports name tests/manifests/... as given.
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(args);
    cmd
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out: Output = shim(args).output().expect("run sidecar-shim");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn check(file: &str) -> (i32, String) {
    let path = format!("tests/manifests/{file}");
    let (code, stdout, stderr) = run(&["check", &path]);
    assert!(stderr.is_empty(), "{file}: stderr {stderr}");
    (code, stdout)
}

fn check_json(file: &str) -> (i32, Value) {
    let path = format!("tests/manifests/{file}");
    let (code, stdout, _) = run(&["check", "--output", "json", &path]);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{file}: {e}\n{stdout}"));
    (code, v)
}

fn assert_lines(report: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            report.lines().any(|l| l.contains(line)),
            "report lacks {line:?}:\n{report}"
        );
    }
}

#[test]
fn good_job() {
    let (code, out) = check("good-job.yaml");
    assert_eq!(code, 0, "{out}");
    assert_lines(
        &out,
        &[
            "Job/pi in batch (tests/manifests/good-job.yaml, document 1, spec.template)",
            "  sidecars in start order: proxy",
            "  containers in spec order: proxy (sidecar 1), pi (app)",
            "  ready check proxy: tcp://:15001 (annotation)",
            "  restart-policy: Never (annotation)",
            "  ready-timeout: 30s (annotation)",
            "  on-ready-timeout: fail (default)",
            "0 error(s), 0 warning(s)",
        ],
    );
    assert!(!out.contains("warning["), "{out}");
}

#[test]
fn deployment_with_the_app_first() {
    let (code, out) = check("deployment-app-first.yaml");
    assert_eq!(code, 0, "warnings do not fail: {out}");
    assert_lines(
        &out,
        &[
            "Deployment/web",
            "  containers in spec order: web (app), log-shipper (sidecar 1)",
            "  warning[sidecar-after-app]: app web is listed before sidecar log-shipper",
            "list the sidecars first",
            "  warning[post-start-deferred]: web has an exec postStart hook",
            "0 error(s), 2 warning(s)",
        ],
    );
}

#[test]
fn istio_like_pod() {
    let (code, out) = check("istio-pod.yaml");
    assert_eq!(code, 0, "{out}");
    assert_lines(
        &out,
        &[
            "Pod/reviews-v1",
            "  ready check istio-proxy: http://:15021/healthz/ready (annotation)",
            "  on-ready-timeout: start (annotation)",
            "  native sidecars (init containers, not managed): vault-agent",
            "  warning[native-sidecars]:",
            "  info[sidecar-pre-stop]: sidecar istio-proxy has an exec preStop hook",
        ],
    );
}

#[test]
fn malformed_annotations_fail() {
    let (code, out) = check("malformed.yaml");
    assert_eq!(code, 1, "{out}");
    assert_lines(
        &out,
        &[
            "Pod/typo",
            "error[unknown-sidecar]: sidecar-shim.io/sidecars: \"envoy-proxy\" names no container",
            "Pod/bad-check",
            "error[malformed]: annotation sidecar-shim.io/ready.envoy=\"tcp://localhost:9901\": no host allowed",
            "2 pod template(s), 2 error(s), 0 warning(s)",
        ],
    );
}

#[test]
fn several_documents() {
    let (code, out) = check("multi-doc.yaml");
    assert_eq!(code, 0, "{out}");
    assert_lines(
        &out,
        &[
            "document 1: info[skipped]: Service \"db\" has no pod template",
            "StatefulSet/db (tests/manifests/multi-doc.yaml, document 2, spec.template)",
            "  sidecars in start order: metrics, backup",
            "  ready check backup: exec:[\"test\",\"-f\",\"/tmp/ready\"] (annotation)",
            "DaemonSet/node-agent (tests/manifests/multi-doc.yaml, document 3, spec.template)",
            "  info[not-managed]",
            "2 pod template(s)",
        ],
    );
}

#[test]
fn cronjob_without_restart_policy_annotation() {
    let (code, out) = check("cronjob.yaml");
    assert_eq!(code, 0, "{out}");
    assert_lines(
        &out,
        &[
            "CronJob/report (tests/manifests/cronjob.yaml, document 1, spec.jobTemplate.spec.template)",
            "  restart-policy: Job default",
            "(job-labels)",
            "warning[restart-policy-not-visible]",
            "add the annotation sidecar-shim.io/restart-policy: \"OnFailure\"",
        ],
    );
}

#[test]
fn json_output() {
    let (code, v) = check_json("multi-doc.yaml");
    assert_eq!(code, 0);
    assert_eq!(v["source"], "tests/manifests/multi-doc.yaml");
    assert_eq!(v["errors"], 0);
    assert_eq!(v["warnings"], 0);
    assert_eq!(v["documents"][0]["code"], "skipped");
    let pods = v["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    let db = &pods[0];
    assert_eq!(db["kind"], "StatefulSet");
    assert_eq!(db["document"], 2);
    assert_eq!(db["path"], "spec.template");
    assert_eq!(db["managed"], true);
    let sidecars: Vec<&str> = db["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(sidecars, ["metrics", "backup"]);
    assert_eq!(db["sidecars"][0]["ready"], "http://:9187/metrics");
    assert_eq!(db["containers"][2]["role"], "app");
    assert_eq!(db["containers"][1]["start_order"], 2);
    assert_eq!(db["restart_policy"]["source"], "default");
    assert_eq!(db["ready_timeout"]["value"], "90s");
    assert_eq!(pods[1]["managed"], false);

    let (code, v) = check_json("malformed.yaml");
    assert_eq!(code, 1);
    assert_eq!(v["errors"], 2);
    assert_eq!(v["pods"][0]["findings"][0]["severity"], "error");
    assert_eq!(v["pods"][0]["findings"][0]["code"], "unknown-sidecar");
    assert_eq!(v["pods"][0]["findings"][0]["container"], "envoy-proxy");
}

#[test]
fn standard_input() {
    let text = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/manifests/malformed.yaml"
    ))
    .unwrap();
    let mut child = shim(&["check", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("Pod/typo (-, document 1, pod)"), "{stdout}");
}

#[test]
fn config_defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shim.toml");
    std::fs::write(
        &config,
        "[lifecycle]\nready_timeout = \"45s\"\non_ready_timeout = \"start\"\n",
    )
    .unwrap();
    let (code, out, _) = run(&[
        "check",
        "--config",
        config.to_str().unwrap(),
        "tests/manifests/deployment-app-first.yaml",
    ]);
    assert_eq!(code, 0);
    assert_lines(
        &out,
        &[
            "  ready-timeout: 45s (default)",
            "  on-ready-timeout: start (default)",
        ],
    );
}

#[test]
fn config_mesh_presets() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("istio.yaml");
    std::fs::write(
        &manifest,
        "kind: Pod\nmetadata:\n  name: meshed\n  annotations: {sidecar.istio.io/status: '{}'}\n\
         spec:\n  containers: [{name: istio-proxy}, {name: app}]\n",
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();
    let config = dir.path().join("shim.toml");

    // Presets off: not managed.
    let (code, out, _) = run(&["check", manifest]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  not managed by the shim"), "{out}");

    std::fs::write(&config, "[lifecycle]\npresets = [\"istio\"]\n").unwrap();
    let (code, out, err) = run(&["check", "--config", config.to_str().unwrap(), manifest]);
    assert_eq!(code, 0, "{out}{err}");
    assert_lines(
        &out,
        &[
            "  sidecars in start order: istio-proxy (istio preset)",
            "  ready check istio-proxy: http://:15021/healthz/ready (preset)",
        ],
    );
    assert!(out.contains("info[preset]"), "{out}");

    // An unknown preset is a config error naming it.
    std::fs::write(&config, "[lifecycle]\npresets = [\"consul\"]\n").unwrap();
    let (code, out, err) = run(&["check", "--config", config.to_str().unwrap(), manifest]);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("unknown variant `consul`"), "{err}");
}

#[test]
fn unreadable_input_and_bad_yaml() {
    let (code, out, err) = run(&["check", "tests/manifests/absent.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("cannot read tests/manifests/absent.yaml"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: Pod\nmetadata: {name: a\n").unwrap();
    let (code, out, _) = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error[yaml]"), "{out}");
}

/// The daemon's flags still parse without a command; `check` takes none of
/// them.
#[test]
fn command_line() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("check"), "{out}");
    assert!(out.contains("--runtime-endpoint"), "{out}");

    let (code, _, err) = run(&["--drain-timeout", "10", "check", "x"]);
    assert_eq!(code, 2, "{err}");

    let (code, _, err) = run(&[
        "--listen",
        "/x.sock",
        "check",
        "tests/manifests/good-job.yaml",
    ]);
    assert_eq!(code, 2, "daemon flags do not mix with check: {err}");

    let (code, _, err) = run(&["check"]);
    assert_eq!(code, 2);
    assert!(err.contains("FILE|-"), "{err}");
}
