//! Fault injection for the crash tests, in the manner of etcd's gofail and
//! TiKV's fail-rs: named points in the code where a test can freeze the
//! shim, then kill it with SIGKILL (or restart the runtime under it) at an
//! exact step of a pod's lifecycle.
//!
//! Off unless `SIDECAR_SHIM_FAILPOINTS` is set (read once; a point costs one
//! branch otherwise). Its value is a comma-separated list of point names,
//! each optionally `=N` for the N-th time the point is reached (default 1).
//! When a listed point is reached, the shim creates `<name>.reached` in
//! `SIDECAR_SHIM_FAILPOINT_DIR` and blocks its whole (single-threaded)
//! runtime until `<name>.release` appears there. The lifecycle names its
//! points after the machine's events: `before:<event>:<container>` and
//! `after:<event>:<container>` (after means: recorded and persisted, its
//! actions not yet carried out); see `lifecycle::service`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

struct Points {
    /// Name → the hit that blocks.
    armed: HashMap<String, u32>,
    hits: Mutex<HashMap<String, u32>>,
    dir: PathBuf,
}

fn points() -> Option<&'static Points> {
    static POINTS: OnceLock<Option<Points>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var("SIDECAR_SHIM_FAILPOINTS").ok()?;
            let dir = std::env::var_os("SIDECAR_SHIM_FAILPOINT_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let armed = spec
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match s.rsplit_once('=') {
                    Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                    None => (s.to_string(), 1),
                })
                .collect();
            Some(Points {
                armed,
                hits: Mutex::default(),
                dir,
            })
        })
        .as_ref()
}

/// Whether any point is armed (callers skip building names otherwise).
pub fn enabled() -> bool {
    points().is_some()
}

/// Reach the point `name`: blocks if it is armed for this hit.
pub fn hit(name: &str) {
    let Some(p) = points() else {
        return;
    };
    let Some(&at) = p.armed.get(name) else {
        return;
    };
    let n = {
        let mut hits = p.hits.lock().unwrap_or_else(|e| e.into_inner());
        let n = hits.entry(name.to_string()).or_default();
        *n += 1;
        *n
    };
    if n != at {
        return;
    }
    let file = name.replace(['/', '\0'], "_");
    let reached = p.dir.join(format!("{file}.reached"));
    let release = p.dir.join(format!("{file}.release"));
    tracing::warn!(point = name, "failpoint reached: blocking until released");
    let _ = std::fs::write(&reached, std::process::id().to_string());
    while !release.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!(point = name, "failpoint released");
}
