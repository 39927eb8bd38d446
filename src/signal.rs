//! Shutdown signals: SIGTERM (systemd, kill) and SIGINT (Ctrl-C) both mean
//! "stop accepting, drain, exit".

use std::fmt;
use std::future::Future;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Which signal asked us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownSignal {
    Terminate,
    Interrupt,
}

impl fmt::Display for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShutdownSignal::Terminate => "SIGTERM",
            ShutdownSignal::Interrupt => "SIGINT",
        })
    }
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that
/// resolves on the first of them, logging which one at info.
///
/// Call it (inside the runtime) before telling systemd the shim is ready:
/// until then the signals keep their default action (terminate at once,
/// without the drain or `STOPPING=1`); from this call on none is lost, even
/// before the future is first polled. The handlers stay for the life of the
/// process, so a second signal during the drain does not kill us halfway;
/// the drain timeout bounds that.
pub fn shutdown() -> impl Future<Output = ()> {
    let handlers = Handlers::install();
    async move {
        let which = handlers.wait().await;
        tracing::info!(signal = %which, "shutdown requested");
    }
}

struct Handlers {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Handlers {
    fn install() -> Handlers {
        Handlers {
            term: install(SignalKind::terminate(), ShutdownSignal::Terminate),
            int: install(SignalKind::interrupt(), ShutdownSignal::Interrupt),
        }
    }

    async fn wait(mut self) -> ShutdownSignal {
        tokio::select! {
            _ = recv(&mut self.term) => ShutdownSignal::Terminate,
            _ = recv(&mut self.int) => ShutdownSignal::Interrupt,
        }
    }
}

fn install(kind: SignalKind, which: ShutdownSignal) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            // Only fails outside a runtime or for forbidden signals; the other
            // signal still works, so keep running rather than stop at once.
            tracing::error!(signal = %which, error = %e, "cannot install signal handler");
            None
        }
    }
}

/// Waits for one delivery; never resolves without a handler.
async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            // `None` means the signal driver is gone, i.e. the runtime is
            // shutting down; that is not a request to stop, so keep waiting.
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sends `name` to this test process with the shell's `kill` builtin.
    fn raise(name: &str) {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -s {name} {}", std::process::id()))
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_after(name: &str) -> ShutdownSignal {
        let mut waiting = Box::pin(Handlers::install().wait());
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err(), "resolved before any signal");
        raise(name);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("signal observed")
    }

    // One test for both signals: handlers are process-wide, so two tests
    // running in parallel would each see the other's signal.
    #[tokio::test]
    async fn resolves_on_sigterm_and_sigint() {
        crate::logging::init_for_tests();
        assert_eq!(wait_after("TERM").await, ShutdownSignal::Terminate);
        assert_eq!(wait_after("INT").await, ShutdownSignal::Interrupt);

        let mut waiting = Box::pin(shutdown());
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err());
        raise("TERM");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("shutdown() resolves");

        // A signal that arrives before the future is first polled is not
        // lost (nor fatal): the handlers exist from the call on.
        let waiting = shutdown();
        raise("TERM");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("shutdown() resolves on a signal raised before its first poll");
    }
}
