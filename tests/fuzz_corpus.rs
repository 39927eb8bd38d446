//! Every input of the fuzzing corpus (`fuzz/corpus/<target>/`, kept small
//! with `cargo fuzz cmin`) through the same entry points the fuzz targets
//! call, on stable: what the fuzzers once found keeps passing in CI without
//! nightly or libFuzzer. See fuzz/README.md.

use std::fs;
use std::path::PathBuf;

use sidecar_shim::fuzz_targets::TARGETS;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_passes_its_target() {
    for (name, target) in TARGETS {
        let files = corpus(name);
        assert!(
            files.len() >= 5,
            "fuzz/corpus/{name} holds {} inputs; run the fuzzer (fuzz/README.md)",
            files.len()
        );
        for file in files {
            let data = fs::read(&file).expect("readable");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} fails (reproduce: cargo +nightly fuzz run {name} {})",
                file.display(),
                file.display()
            );
        }
    }
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for (name, _) in TARGETS {
        let text = fs::read_to_string(root.join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{name}.rs: {e}"));
        assert!(
            text.contains(&format!("fuzz_targets::{name}(data)")),
            "fuzz/fuzz_targets/{name}.rs calls fuzz_targets::{name}"
        );
    }
}
