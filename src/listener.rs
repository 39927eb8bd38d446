//! The Unix sockets the shim serves (kubelet's CRI socket and the admin
//! socket): creating them safely at startup and removing them on exit.
//!
//! Startup has to cope with a socket file left by a previous run that crashed
//! (remove it), with a second instance started by mistake (refuse, do not
//! steal its socket) and with a path that is not a socket at all (refuse,
//! never delete someone's file). On exit the file is removed only if it is
//! still the one this process created, so a successor that already bound the
//! same path keeps its socket.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Mode of the socket: owner and group may connect (connecting needs write
/// permission), others may not; kubelet runs as root.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of the admin socket: the owner (root on a node) only.
pub const ADMIN_SOCKET_MODE: u32 = 0o600;
/// Mode of a parent directory we create.
pub const DIR_MODE: u32 = 0o755;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{} is in use: another process is serving it (a test connection succeeded); \
         stop that process or choose another path",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("{} exists and is {kind}, not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect existing socket {}: {source}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode {mode:o} on {}: {source}", path.display())]
    SetMode {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// A bound listener plus the duty to remove its socket file.
///
/// Dropping it closes the listener and removes the file. Use
/// [`BoundSocket::split`] to hand the listener to a server while keeping the
/// removal duty in a [`SocketGuard`].
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    guard: SocketGuard,
}

impl BoundSocket {
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        self.guard.path()
    }

    /// Separates the listener from the removal duty.
    pub fn split(self) -> (UnixListener, SocketGuard) {
        (self.listener, self.guard)
    }
}

/// Removes the socket file when dropped (or via [`SocketGuard::remove`]), but
/// only if the file at the path is still the socket we created.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    identity: Identity,
    done: bool,
}

/// What tells our socket file apart from a later one at the same path.
/// Inode numbers are reused right after an unlink, so the change time (set
/// when the socket was bound and chmod-ed) is compared too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file now. Returns `Ok(false)` if there was nothing
    /// of ours to remove (already gone, or replaced by another process).
    pub fn remove(mut self) -> io::Result<bool> {
        self.done = true;
        self.remove_if_ours()
    }

    fn remove_if_ours(&self) -> io::Result<bool> {
        // A successor may have removed our file as stale and bound its own
        // at the same path; only the file we bound is ours. (The check and
        // the unlink are not atomic; there is no portable way to unlink
        // "this inode", and the window is tiny.) A changed ctime, e.g. after
        // an admin's chown, also leaves the file alone: the next start
        // removes a stale socket anyway, so erring that way is harmless.
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && Identity::of(&meta) == self.identity => {
                match fs::remove_file(&self.path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.remove_if_ours() {
            Ok(true) => tracing::debug!(path = %self.path.display(), "removed socket"),
            Ok(false) => tracing::debug!(
                path = %self.path.display(),
                "socket already gone or replaced; left alone"
            ),
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot remove socket"
            ),
        }
    }
}

/// Binds a Unix socket listener at `path`.
///
/// Creates the parent directory (mode 0755) if missing, replaces a stale
/// socket left by a dead process, refuses a socket that something still
/// serves and anything that is not a socket, and sets the socket's mode to
/// 0660. Must be called within a Tokio runtime (as `UnixListener::bind`).
pub fn bind(path: &Path) -> Result<BoundSocket, ListenError> {
    bind_with_mode(path, SOCKET_MODE)
}

/// [`bind`] with another socket mode (the admin socket's is
/// [`ADMIN_SOCKET_MODE`]).
pub fn bind_with_mode(path: &Path, mode: u32) -> Result<BoundSocket, ListenError> {
    ensure_parent(path)?;
    clear_stale(path)?;

    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // Take ownership of the file before anything else so that, from here
    // on, dropping the guard on an error path still cleans up.
    let stat = || {
        fs::symlink_metadata(path).map_err(|source| ListenError::Bind {
            path: path.to_owned(),
            source,
        })
    };
    let mut guard = SocketGuard {
        path: path.to_owned(),
        identity: Identity::of(&stat()?),
        done: false,
    };
    // Until this chmod the socket has the umask-derived mode; with the usual
    // umask (022) that already denies others the write permission connecting
    // needs, so the window exposes nothing.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        ListenError::SetMode {
            path: path.to_owned(),
            mode,
            source,
        }
    })?;
    // The chmod changed the ctime; record the final identity.
    guard.identity = Identity::of(&stat()?);
    Ok(BoundSocket { listener, guard })
}

fn ensure_parent(path: &Path) -> Result<(), ListenError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if parent.exists() {
        return Ok(());
    }
    let err = |source| ListenError::CreateDir {
        path: parent.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(parent)
        .map_err(err)?;
    // The umask may have narrowed the mode; kubelet and tools need to reach
    // the socket, so set it explicitly on the directory that holds it.
    fs::set_permissions(parent, fs::Permissions::from_mode(DIR_MODE)).map_err(err)
}

fn clear_stale(path: &Path) -> Result<(), ListenError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file_type = meta.file_type();
    if !file_type.is_socket() {
        // symlink_metadata does not follow links, so a symlink is refused too.
        let kind = if file_type.is_file() {
            "a regular file"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        return Err(ListenError::NotASocket {
            path: path.to_owned(),
            kind,
        });
    }
    // A connection succeeding means a live process is listening; removing its
    // socket would silently cut kubelet off from it.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ListenError::RemoveStale {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        // Removed between the stat and the connect: nothing left to clear.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ListenError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    #[tokio::test]
    async fn creates_parent_dir_and_sets_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/shim.sock");
        let socket = bind(&path).unwrap();
        assert_eq!(socket.path(), path);
        assert_eq!(mode(&dir.path().join("a/b")), DIR_MODE);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(mode(&path), SOCKET_MODE);
    }

    #[tokio::test]
    async fn admin_socket_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let _socket = bind_with_mode(&path, ADMIN_SOCKET_MODE).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[tokio::test]
    async fn accepts_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let socket = bind(&path).unwrap();
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(socket.listener().accept(), client);
        accepted.unwrap();
        connected.unwrap();
    }

    #[tokio::test]
    async fn replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        // A listener that is gone leaves its file behind, refusing connections.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());

        let socket = bind(&path).unwrap();
        // Connectable again: the new listener owns the path.
        std::os::unix::net::UnixStream::connect(socket.path()).unwrap();
        assert_eq!(mode(&path), SOCKET_MODE);
    }

    #[tokio::test]
    async fn live_socket_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let ino = fs::symlink_metadata(&path).unwrap().ino();

        let err = bind(&path).unwrap_err();
        assert!(
            matches!(&err, ListenError::InUse(p) if p == &path),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("another process is serving it"),
            "{err}"
        );
        // The other process keeps its socket.
        assert_eq!(fs::symlink_metadata(&path).unwrap().ino(), ino);
    }

    #[tokio::test]
    async fn refuses_non_sockets_without_deleting_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.sock");
        fs::write(&file, "precious").unwrap();
        let subdir = dir.path().join("dir.sock");
        fs::create_dir(&subdir).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();

        for (path, kind) in [
            (&file, "a regular file"),
            (&subdir, "a directory"),
            (&link, "a symbolic link"),
        ] {
            let err = bind(path).unwrap_err();
            assert!(
                matches!(&err, ListenError::NotASocket { kind: k, .. } if *k == kind),
                "{kind}: {err:?}"
            );
            assert!(err.to_string().contains("not a socket"), "{err}");
            assert!(fs::symlink_metadata(path).is_ok(), "{kind} still there");
        }
        assert_eq!(fs::read_to_string(&file).unwrap(), "precious");
    }

    #[tokio::test]
    async fn drop_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        drop(bind(&path).unwrap());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn split_keeps_removal_with_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let (listener, guard) = bind(&path).unwrap().split();
        drop(listener);
        assert!(
            fs::symlink_metadata(&path).is_ok(),
            "listener alone does not remove"
        );
        assert!(guard.remove().unwrap());
        assert!(fs::symlink_metadata(&path).is_err());
    }

    #[tokio::test]
    async fn does_not_remove_a_successors_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let (_listener, guard) = bind(&path).unwrap().split();
        // A successor put its own socket at the path. It is bound beside ours
        // and renamed into place so that its inode surely differs (a plain
        // unlink-then-bind may reuse our inode number).
        let beside = dir.path().join("successor.sock");
        let _successor = std::os::unix::net::UnixListener::bind(&beside).unwrap();
        fs::rename(&beside, &path).unwrap();

        assert!(!guard.remove().unwrap());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    }

    #[tokio::test]
    async fn does_not_remove_a_successor_reusing_the_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let (listener, guard) = bind(&path).unwrap().split();
        // We stopped listening; a successor found the socket stale, removed
        // it and bound its own, which may well get the same inode number.
        drop(listener);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _successor = bind(&path).unwrap();

        assert!(!guard.remove().unwrap());
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    /// The price of comparing ctime: a socket chmod-ed after bind is left
    /// behind on exit (and removed as stale by the next start).
    #[tokio::test]
    async fn leaves_a_socket_changed_since_bind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let (_listener, guard) = bind(&path).unwrap().split();
        // Make sure the coarse kernel clock has moved on before the chmod.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!guard.remove().unwrap());
        assert!(fs::symlink_metadata(&path).is_ok());
    }

    #[tokio::test]
    async fn drop_tolerates_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let socket = bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        drop(socket);
    }
}
