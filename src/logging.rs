//! Process-wide logging: a `tracing` subscriber writing text or JSON lines to
//! stderr, filtered by `RUST_LOG`.
//!
//! stderr, not stdout, because under systemd both end up in the journal while
//! stdout stays free for anything a future subcommand wants to print.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset, empty or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. Call once, early in `main`; a second call
/// leaves the first subscriber in place and says so on stderr.
pub fn init(format: LogFormat) {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (filter, filter_error) = build_filter(rust_log.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        // Colours only on a terminal: escape codes would litter the journal.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // Event fields at the top level of each object, where log collectors
        // look for them, rather than nested under "fields".
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("sidecar-shim: logging already initialised: {e}");
    }
    // Reported through the subscriber just installed, so it shows in the
    // chosen format; falling back beats refusing to start over a log setting.
    if let Some(error) = filter_error {
        tracing::warn!(
            rust_log = rust_log.as_deref().unwrap_or_default(),
            %error,
            "ignoring invalid RUST_LOG; using filter {DEFAULT_FILTER:?}"
        );
    }
}

/// For tests: logs through the test harness's captured output, filtered by
/// `RUST_LOG`. Safe to call from every test; only the first call installs.
pub fn init_for_tests() {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (filter, _) = build_filter(rust_log.as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The filter for a `RUST_LOG` value, and the parse error if the value was
/// rejected in favour of [`DEFAULT_FILTER`].
fn build_filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(spec) => match EnvFilter::try_new(spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_from_rust_log() {
        // (RUST_LOG, effective filter, rejected?)
        let cases = [
            (None, DEFAULT_FILTER, false),
            (Some(""), DEFAULT_FILTER, false),
            (Some("   "), DEFAULT_FILTER, false),
            (Some("debug"), "debug", false),
            (Some("sidecar_shim=trace"), "sidecar_shim=trace", false),
            (Some("sidecar_shim=notalevel"), DEFAULT_FILTER, true),
        ];
        for (rust_log, want, rejected) in cases {
            let (filter, error) = build_filter(rust_log);
            assert_eq!(filter.to_string(), want, "{rust_log:?}");
            assert_eq!(error.is_some(), rejected, "{rust_log:?}: {error:?}");
        }
    }

    #[test]
    fn init_for_tests_is_idempotent() {
        init_for_tests();
        init_for_tests();
        tracing::info!("logging works in tests");
    }
}
