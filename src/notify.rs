//! systemd readiness notification (`Type=notify`), without libsystemd.
//!
//! When systemd starts the shim with `Type=notify` it sets `$NOTIFY_SOCKET`
//! to a datagram socket: a path, or an abstract name written with a leading
//! `@`. The shim sends `READY=1` there once its CRI socket listens, so
//! `systemctl start` (and `Before=kubelet.service`) wait until kubelet can
//! connect, and `STOPPING=1` when a shutdown signal starts the drain, so
//! `systemctl status` shows the unit deactivating while calls in flight
//! finish. Signals are not this module's business: the shutdown path calls
//! [`stopping`] once `crate::signal::shutdown` resolved. Without
//! `$NOTIFY_SOCKET` (started by hand, in tests) nothing is sent. A failure
//! to notify is logged and otherwise ignored: systemd then reports the start
//! as timed out, which is the visible symptom to look at.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET`. Returns `Ok(false)`
/// when the variable is unset or empty (not started by systemd).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    if target.is_empty() {
        return Ok(false);
    }
    send_to(&target, state)?;
    Ok(true)
}

/// Sends one datagram `state` to the notify socket `target` (a path, or
/// `@name` for an abstract socket).
pub fn send_to(target: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        send_abstract(&socket, name, state)
    } else if target.starts_with('/') {
        socket.send_to(state.as_bytes(), target).map(|_| ())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET_ENV}={target:?} is neither an absolute path nor @abstract"),
        ))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &str, state: &str) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_socket: &UnixDatagram, name: &str, _state: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("abstract notify socket @{name} needs Linux"),
    ))
}

/// Tells systemd the service is ready: `READY=1` with the pid and a status
/// line. Call it once the CRI socket listens (and the shutdown signal
/// handlers are installed, so a SIGTERM right after it is drained).
pub fn ready() {
    let state = format!(
        "READY=1\nMAINPID={}\nSTATUS=listening for CRI requests",
        std::process::id()
    );
    match notify(&state) {
        Ok(false) => {}
        Ok(true) => tracing::debug!("notified systemd: READY=1"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd (READY=1)"),
    }
}

/// Tells systemd the shim is shutting down: `STOPPING=1` with a status
/// line. Called from the shutdown path once a signal asked us to stop.
pub fn stopping() {
    match notify("STOPPING=1\nSTATUS=draining calls in flight") {
        Ok(false) => {}
        Ok(true) => tracing::debug!("notified systemd: STOPPING=1"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd (STOPPING=1)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sidecar-shim-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn rejects_relative_target() {
        let err = send_to("relative/path", "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
