//! The `sidecar-shim` binary: wires configuration, logging, the listening
//! socket and signals to the proxy. Everything testable lives in the library.
//!
//! Exit codes: 0 after a clean shutdown, 1 when startup or serving fails,
//! 2 for a bad command line or config file.
//! `sidecar-shim check` (see `sidecar_shim::check`) exits 0 when the manifests
//! have no errors, 1 when they have, 2 when its input cannot be read.
//! `sidecar-shim status` (see `sidecar_shim::admin::status`) exits 0 when the
//! shim is healthy, 1 when it is not, 2 when its admin socket cannot be reached.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sidecar_shim::config::{Cli, Command, Config};
use sidecar_shim::metrics::{self, Metrics};
use sidecar_shim::{admin, listener, logging, proxy, signal};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Check(args)) => return sidecar_shim::check::run(args),
        Some(Command::Status(args)) => return sidecar_shim::admin::status::run(args),
        None => {}
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
        admin_listen = %config.admin_listen.display(),
        runtime_socket = %config.runtime_socket.display(),
        log_format = %config.log_format,
        drain_timeout = ?config.drain_timeout,
        state_dir = %config.state_dir.display(),
        metrics_listen = config.metrics_listen.map(|a| a.to_string()),
        max_connections = config.max_connections,
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
    // The admin socket first: whoever sees the CRI socket can ask about it.
    let admin_socket = listener::bind_with_mode(&config.admin_listen, listener::ADMIN_SOCKET_MODE)
        .context("admin socket (--admin-listen)")?;
    let socket = listener::bind(&config.listen).context("CRI socket (--listen)")?;
    tracing::info!(path = %socket.path().display(), "listening for CRI requests");
    tracing::info!(path = %admin_socket.path().display(), "serving the admin API");
    // From here on SIGTERM and SIGINT start the drain (and STOPPING=1),
    // even one that arrives right after READY=1.
    let shutdown = signal::shutdown();
    sidecar_shim::notify::ready();
    let (listener, guard) = socket.split();
    let (admin_listener, admin_guard) = admin_socket.split();

    let lifecycle = sidecar_shim::lifecycle::service::Lifecycle::new(
        config.runtime_socket.clone(),
        config.lifecycle.settings(),
        config.lifecycle.defaults(),
        Some(config.state_dir.clone()),
        metrics.clone(),
    );
    let admin_service = admin::AdminService::new(lifecycle.clone(), config.runtime_socket.clone());
    let admin = tokio::spawn(async move {
        // Only a broken service fails here; the CRI proxy goes on without it.
        if let Err(e) = admin::serve(admin_listener, admin_service).await {
            tracing::error!("admin API failed: {e:#}");
        }
    });
    let served = proxy::serve_with(
        listener,
        config.runtime_socket.clone(),
        Arc::new(lifecycle),
        metrics,
        async {
            shutdown.await;
            sidecar_shim::notify::stopping();
        },
        proxy::Options {
            drain: config.drain_timeout,
            max_connections: config.max_connections,
        },
    )
    .await
    .context("CRI proxy failed");

    // The admin API answers during the drain; it goes with the proxy.
    admin.abort();

    // Remove the sockets whether or not serving failed, so kubelet sees
    // "no such file" rather than a dead socket while we are down.
    remove_socket(guard);
    remove_socket(admin_guard);
    served
}

fn remove_socket(guard: listener::SocketGuard) {
    let path = guard.path().to_path_buf();
    match guard.remove() {
        Ok(true) => tracing::debug!(path = %path.display(), "removed socket"),
        Ok(false) => tracing::info!(
            path = %path.display(),
            "socket was replaced by another process; left it in place"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "cannot remove socket"
        ),
    }
}
