//! The `sidecar-shim` binary: wires configuration, logging, the listening
//! socket and signals to the proxy. Everything testable lives in the library.
//!
//! Exit codes: 0 after a clean shutdown, 1 when startup or serving fails,
//! 2 for a bad command line or config file.
//! `sidecar-shim check` (see `sidecar_shim::check`) exits 0 when the manifests
//! have no errors, 1 when they have, 2 when its input cannot be read.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sidecar_shim::config::{Cli, Command, Config};
use sidecar_shim::metrics::{self, Metrics};
use sidecar_shim::{listener, logging, proxy, signal};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Check(args)) = &cli.command {
        return sidecar_shim::check::run(args);
    }
    let config = match Config::from_cli(&cli) {
        Ok(config) => config,
        Err(e) => {
            // Logging is not set up yet: its format is part of the config.
            eprintln!("sidecar-shim: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config_file = cli.config.as_ref().map(|p| p.display().to_string()),
        listen = %config.listen.display(),
        runtime_socket = %config.runtime_socket.display(),
        log_format = %config.log_format,
        drain_timeout = ?config.drain_timeout,
        metrics_listen = config.metrics_listen.map(|a| a.to_string()),
        "starting with effective configuration"
    );

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .thread_name("sidecar-shim")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // Anything still running was given its drain time inside `serve`; do
    // not let a stuck task hold up the exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Metrics first: a taken port fails startup before the CRI socket exists.
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            let metrics = Arc::new(Metrics::new());
            tokio::spawn(metrics::serve(listener, metrics.clone()));
            metrics
        }
        None => Arc::new(Metrics::disabled()),
    };
    // Binding needs the runtime (tokio registers the listener with it).
    // Its errors already name the path and, for a live socket, say that
    // another process is serving it.
    let socket = listener::bind(&config.listen)?;
    tracing::info!(path = %socket.path().display(), "listening for CRI requests");
    sidecar_shim::notify::ready();
    let (listener, guard) = socket.split();

    let lifecycle = sidecar_shim::lifecycle::service::Lifecycle::new(
        config.runtime_socket.clone(),
        config.lifecycle.settings(),
        config.lifecycle.defaults(),
        metrics.clone(),
    );
    let served = proxy::serve_with(
        listener,
        config.runtime_socket.clone(),
        Arc::new(lifecycle),
        metrics,
        signal::shutdown(),
        config.drain_timeout,
    )
    .await
    .context("CRI proxy failed");

    // Remove the socket whether or not serving failed, so kubelet sees
    // "no such file" rather than a dead socket while we are down.
    match guard.remove() {
        Ok(true) => tracing::debug!(path = %config.listen.display(), "removed socket"),
        Ok(false) => tracing::info!(
            path = %config.listen.display(),
            "socket was replaced by another process; left it in place"
        ),
        Err(e) => tracing::warn!(
            path = %config.listen.display(),
            error = %e,
            "cannot remove socket"
        ),
    }
    served
}
