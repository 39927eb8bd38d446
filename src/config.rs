//! Configuration: the command line, the optional TOML file, and the checked
//! [`Config`] the rest of the daemon runs from.
//!
//! Precedence is flags > file > built-in defaults. To keep that simple every
//! setting is optional in both [`Cli`] and [`FileConfig`] (clap's own
//! `default_value` would hide whether a flag was actually given), and
//! [`Config::merge`] is the one place that picks a value per key.
//!
//! Adding a setting means: a field in [`Cli`], a field in [`FileConfig`], a
//! field in [`Config`] with its default in `Config::default`, and one line in
//! [`Config::merge`]. Values are parsed where they are read (clap value parsers
//! for flags, serde for the file) so errors point at the flag or at the file
//! line; `merge` only checks rules that involve the final combination.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Deserializer};

/// Default path of the socket kubelet connects to.
pub const DEFAULT_LISTEN: &str = "/run/sidecar-shim/sidecar-shim.sock";
/// Default CRI endpoint of the real runtime.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// Default directory of the lifecycle's state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sidecar-shim";
/// Default time to let in-flight calls finish after a shutdown signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// File name of the admin socket when `admin_listen` is not set: it lives
/// next to the CRI socket (`/run/sidecar-shim/admin.sock` by default).
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";
/// Default cap on client connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Where `sidecar-shim status` looks without `--admin` or `--config`.
pub const DEFAULT_ADMIN_LISTEN: &str = "/run/sidecar-shim/admin.sock";

const AFTER_HELP: &str = "\
Precedence: command-line flags override the --config file, which overrides the built-in defaults.

Config file (TOML), all keys optional:
    listen = \"/run/sidecar-shim/sidecar-shim.sock\"
    admin_listen = \"/run/sidecar-shim/admin.sock\"   # default: admin.sock next to listen
    runtime_endpoint = \"unix:///run/containerd/containerd.sock\"
    log_format = \"text\"          # or \"json\"
    drain_timeout = \"10s\"        # e.g. \"500ms\", \"2m\", \"1m30s\"
    state_dir = \"/var/lib/sidecar-shim\"
    metrics_listen = \"127.0.0.1:9464\"  # off when unset
    max_connections = 1024       # client connections at once; more are refused
Unknown keys are an error.

Logging: the log filter is read from the RUST_LOG environment variable
(tracing EnvFilter syntax, e.g. RUST_LOG=debug or RUST_LOG=info,sidecar_shim=trace);
when unset the filter is \"info\". Logs go to stderr.";

/// Command line of the `sidecar-shim` binary.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "sidecar-shim",
    version,
    about = "A CRI proxy between kubelet and containerd that gives sidecar containers a lifecycle",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Without a command, the daemon runs with the flags below.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Read settings from this TOML file; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Unix socket path to serve CRI on; point kubelet's --container-runtime-endpoint at it
    /// [default: /run/sidecar-shim/sidecar-shim.sock]
    #[arg(long, value_name = "PATH")]
    pub listen: Option<PathBuf>,

    /// Unix socket path (mode 0600, root-only) to serve the admin API on, which
    /// `sidecar-shim status` reads [default: admin.sock in the directory of --listen,
    /// /run/sidecar-shim/admin.sock]
    #[arg(long, value_name = "PATH")]
    pub admin_listen: Option<PathBuf>,

    /// CRI endpoint of the real runtime to forward to: unix:///path or an absolute socket path
    /// [default: unix:///run/containerd/containerd.sock]
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_runtime_endpoint)]
    pub runtime_endpoint: Option<PathBuf>,

    /// Log output format [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// On SIGTERM/SIGINT, how long to let in-flight calls finish, e.g. 10s, 500ms, 2m, 1m30s
    /// [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Directory where the sidecar lifecycle's state survives a restart of the shim
    /// (one file per pod with sidecars) [default: /var/lib/sidecar-shim]
    #[arg(long, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (IP:PORT; port 0
    /// picks a free one). Unauthenticated: give a loopback or node-local address [default: off]
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<SocketAddr>,
    /// Client connections served at once (each holds one connection to the runtime);
    /// beyond it new connections are refused with GOAWAY and a log line [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_max_connections)]
    pub max_connections: Option<usize>,
}

/// The commands besides running the daemon.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Check Kubernetes manifests: report how the shim will treat each pod
    /// template and what is wrong with its sidecar annotations.
    ///
    /// Reads YAML (one or several documents) with Pods, Deployments, Jobs,
    /// CronJobs, StatefulSets, DaemonSets, ReplicaSets and Lists of them.
    /// Exits 1 when any finding is an error, 0 otherwise (warnings do not
    /// fail), 2 when the file or the --config file cannot be read.
    Check(CheckArgs),
    /// Show what the running shim manages: its health (runtime reachable,
    /// state directory), and every container of the pods with sidecars:
    /// role, lifecycle state, readiness, held calls, deferred starts.
    ///
    /// Asks the shim's admin API over its root-only socket. Exits 0 when the
    /// shim reports itself healthy, 1 when it answers but is unhealthy, 2 when
    /// the admin socket cannot be reached.
    Status(StatusArgs),
}

/// Arguments of `sidecar-shim status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The shim's admin socket (its --admin-listen)
    /// [default: admin_listen from --config, else /run/sidecar-shim/admin.sock]
    #[arg(long, value_name = "PATH")]
    pub admin: Option<PathBuf>,

    /// Report format
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub output: OutputFormat,

    /// Find the admin socket in this node's config file (admin_listen, or
    /// admin.sock next to listen)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Arguments of `sidecar-shim check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Manifest file to check; - reads standard input
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,

    /// Report format
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub output: OutputFormat,

    /// Take the defaults (ready_timeout, on_ready_timeout, failed_exit_window) and the
    /// mesh presets from this node's config file, as the daemon would
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Output format of `sidecar-shim check` and `sidecar-shim status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// A readable report.
    #[default]
    Text,
    /// One JSON object, for machines.
    Json,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The contents of the `--config` TOML file. Every key is optional; values
/// are validated while parsing so errors carry the file's line and column.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: Option<PathBuf>,
    #[serde(default)]
    pub admin_listen: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_runtime_endpoint")]
    pub runtime_endpoint: Option<PathBuf>,
    #[serde(default)]
    pub log_format: Option<LogFormat>,
    #[serde(default, deserialize_with = "de_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_max_connections")]
    pub max_connections: Option<usize>,
    /// The `[lifecycle]` table.
    #[serde(default)]
    pub lifecycle: LifecycleFile,
}

/// The `[lifecycle]` table of the config file: node-wide defaults for the
/// pods' sidecar annotations, and the shim's own timings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleFile {
    /// Default for `sidecar-shim.io/ready-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub ready_timeout: Option<Duration>,
    /// Default for `sidecar-shim.io/on-ready-timeout`: "fail" or "start".
    #[serde(default)]
    pub on_ready_timeout: Option<OnReadyTimeoutName>,
    /// Job pods without a restart-policy annotation: how long a failed
    /// container may wait for its next attempt before its exit is terminal.
    #[serde(default, deserialize_with = "de_duration")]
    pub failed_exit_window: Option<Duration>,
    /// The least grace a sidecar gets when its held stop is released.
    #[serde(default, deserialize_with = "de_duration")]
    pub min_stop_grace: Option<Duration>,
    /// How long a lone sidecar stop waits for a sign of pod shutdown.
    #[serde(default, deserialize_with = "de_duration")]
    pub evidence_window: Option<Duration>,
    /// How long kubelet must do nothing more in a pod after a deferred
    /// start before the shim takes the container for an init container.
    #[serde(default, deserialize_with = "de_duration")]
    pub init_window: Option<Duration>,
    /// Report sidecars the shim stopped (Job completion) as exited 0, Completed.
    #[serde(default)]
    pub rewrite_exit_code: Option<bool>,
    /// Learn container exits from the runtime's event stream where it has
    /// one (false: poll every 100 ms, as on runtimes without events).
    #[serde(default)]
    pub exit_events: Option<bool>,
    /// Mesh presets to enable: `["istio", "linkerd"]`. An unknown name is
    /// an error naming it.
    #[serde(default)]
    pub presets: Option<Vec<crate::lifecycle::spec::Preset>>,
    /// Caps: pods with sidecars the shim keeps state for, calls held at
    /// once, starts deferred at once. Beyond them it forwards without
    /// holding and warns.
    #[serde(default)]
    pub max_pods: Option<usize>,
    #[serde(default)]
    pub max_held_calls: Option<usize>,
    #[serde(default)]
    pub max_deferred_starts: Option<usize>,
}

/// `on_ready_timeout` in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReadyTimeoutName {
    Fail,
    Start,
}

/// The lifecycle settings the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfig {
    pub ready_timeout: Duration,
    pub on_ready_timeout: OnReadyTimeoutName,
    pub failed_exit_window: Duration,
    pub min_stop_grace: Duration,
    pub evidence_window: Duration,
    pub init_window: Duration,
    pub rewrite_exit_code: bool,
    pub exit_events: bool,
    /// Enabled mesh presets (none by default).
    pub presets: Vec<crate::lifecycle::spec::Preset>,
    pub max_pods: usize,
    pub max_held_calls: usize,
    pub max_deferred_starts: usize,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        let d = crate::lifecycle::spec::Defaults::default();
        let s = crate::lifecycle::machine::Settings::default();
        LifecycleConfig {
            ready_timeout: d.ready_timeout,
            on_ready_timeout: OnReadyTimeoutName::Fail,
            failed_exit_window: d.failed_exit_window,
            min_stop_grace: s.min_stop_grace,
            evidence_window: s.evidence_window,
            init_window: s.init_window,
            rewrite_exit_code: s.rewrite_exit_code,
            exit_events: s.exit_events,
            presets: d.presets,
            max_pods: s.max_pods,
            max_held_calls: s.max_held,
            max_deferred_starts: s.max_deferred,
        }
    }
}

impl LifecycleConfig {
    fn merge(file: LifecycleFile) -> LifecycleConfig {
        let d = LifecycleConfig::default();
        LifecycleConfig {
            ready_timeout: file.ready_timeout.unwrap_or(d.ready_timeout),
            on_ready_timeout: file.on_ready_timeout.unwrap_or(d.on_ready_timeout),
            failed_exit_window: file.failed_exit_window.unwrap_or(d.failed_exit_window),
            min_stop_grace: file.min_stop_grace.unwrap_or(d.min_stop_grace),
            evidence_window: file.evidence_window.unwrap_or(d.evidence_window),
            init_window: file.init_window.unwrap_or(d.init_window),
            rewrite_exit_code: file.rewrite_exit_code.unwrap_or(d.rewrite_exit_code),
            exit_events: file.exit_events.unwrap_or(d.exit_events),
            presets: file.presets.unwrap_or(d.presets),
            max_pods: file.max_pods.unwrap_or(d.max_pods),
            max_held_calls: file.max_held_calls.unwrap_or(d.max_held_calls),
            max_deferred_starts: file.max_deferred_starts.unwrap_or(d.max_deferred_starts),
        }
    }

    /// Defaults for the pods' annotations.
    pub fn defaults(&self) -> crate::lifecycle::spec::Defaults {
        use crate::lifecycle::spec::OnReadyTimeout;
        crate::lifecycle::spec::Defaults {
            ready_timeout: self.ready_timeout,
            on_ready_timeout: match self.on_ready_timeout {
                OnReadyTimeoutName::Fail => OnReadyTimeout::Fail,
                OnReadyTimeoutName::Start => OnReadyTimeout::Start,
            },
            failed_exit_window: self.failed_exit_window,
            presets: self.presets.clone(),
        }
    }

    /// The state machine's settings.
    pub fn settings(&self) -> crate::lifecycle::machine::Settings {
        crate::lifecycle::machine::Settings {
            min_stop_grace: self.min_stop_grace,
            evidence_window: self.evidence_window,
            init_window: self.init_window,
            rewrite_exit_code: self.rewrite_exit_code,
            exit_events: self.exit_events,
            failed_exit_window: self.failed_exit_window,
            max_pods: self.max_pods,
            max_held: self.max_held_calls,
            max_deferred: self.max_deferred_starts,
            ..Default::default()
        }
    }
}

impl FileConfig {
    /// Parses TOML text; `path` is only used in the error message.
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }
}

/// The checked configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Socket path kubelet connects to.
    pub listen: PathBuf,
    /// Socket path of the admin API.
    pub admin_listen: PathBuf,
    /// Filesystem path of the runtime's CRI socket (the `unix://` prefix removed).
    pub runtime_socket: PathBuf,
    pub log_format: LogFormat,
    pub drain_timeout: Duration,
    /// Where the lifecycle's state is kept.
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics; `None`: nowhere (no metrics kept).
    pub metrics_listen: Option<SocketAddr>,
    /// Client connections served at once.
    pub max_connections: usize,
    pub lifecycle: LifecycleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: PathBuf::from(DEFAULT_LISTEN),
            admin_listen: PathBuf::from(DEFAULT_ADMIN_LISTEN),
            runtime_socket: parse_runtime_endpoint(DEFAULT_RUNTIME_ENDPOINT)
                .expect("default runtime endpoint is valid"),
            log_format: LogFormat::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            metrics_listen: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            lifecycle: LifecycleConfig::default(),
        }
    }
}

impl Config {
    /// Builds the configuration from the command line, reading `--config` if given.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let file = cli.config.as_deref().map(FileConfig::load).transpose()?;
        Config::merge(cli, file)
    }

    /// Combines flags, file and defaults (flags win, then the file) and checks
    /// the result. Pure: touches neither the filesystem nor the environment.
    pub fn merge(cli: &Cli, file: Option<FileConfig>) -> Result<Config, ConfigError> {
        let file = file.unwrap_or_default();
        let defaults = Config::default();
        let listen = pick(cli.listen.clone(), file.listen, defaults.listen);
        let config = Config {
            admin_listen: cli
                .admin_listen
                .clone()
                .or(file.admin_listen)
                .unwrap_or_else(|| admin_next_to(&listen)),
            listen,
            runtime_socket: pick(
                cli.runtime_endpoint.clone(),
                file.runtime_endpoint,
                defaults.runtime_socket,
            ),
            log_format: pick(cli.log_format, file.log_format, defaults.log_format),
            drain_timeout: pick(
                cli.drain_timeout,
                file.drain_timeout,
                defaults.drain_timeout,
            ),
            state_dir: pick(cli.state_dir.clone(), file.state_dir, defaults.state_dir),
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            max_connections: pick(
                cli.max_connections,
                file.max_connections,
                defaults.max_connections,
            ),
            lifecycle: LifecycleConfig::merge(file.lifecycle),
        };
        if let Err(reason) =
            crate::lifecycle::spec::check_ready_timeout(config.lifecycle.ready_timeout)
        {
            return Err(ConfigError::InvalidDuration {
                value: format!("{:?}", config.lifecycle.ready_timeout),
                reason,
            });
        }
        config.check()?;
        Ok(config)
    }

    /// Rules about the combined values, which neither source can check alone.
    fn check(&self) -> Result<(), ConfigError> {
        // A relative socket path would depend on the working directory (often
        // `/` under systemd), which kubelet's endpoint could never match reliably.
        if !self.listen.is_absolute() {
            return Err(ConfigError::RelativeListen(self.listen.clone()));
        }
        // Serving on the runtime's own socket would make the shim proxy to itself.
        if self.listen == self.runtime_socket {
            return Err(ConfigError::ListenIsRuntime(self.listen.clone()));
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::RelativeStateDir(self.state_dir.clone()));
        }
        if !self.admin_listen.is_absolute() {
            return Err(ConfigError::RelativeAdminListen(self.admin_listen.clone()));
        }
        if self.admin_listen == self.listen || self.admin_listen == self.runtime_socket {
            return Err(ConfigError::AdminListenTaken(self.admin_listen.clone()));
        }
        Ok(())
    }
}

/// The admin socket's default place: `admin.sock` in the CRI socket's
/// directory, so that every shim (a test's, a second one on a dev machine)
/// gets its own without being told, and the node's default is
/// `/run/sidecar-shim/admin.sock`, inside the directory the unit owns.
fn admin_next_to(listen: &Path) -> PathBuf {
    listen
        .parent()
        .unwrap_or(Path::new("/"))
        .join(ADMIN_SOCKET_NAME)
}

fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid runtime endpoint {value:?}: {reason}")]
    InvalidEndpoint { value: String, reason: String },
    #[error("invalid duration {value:?}: {reason}")]
    InvalidDuration { value: String, reason: String },
    #[error("invalid metrics listen address {0:?}: expected IP:PORT, such as 127.0.0.1:9464 or [::1]:9464 (an IP address, not a host name)")]
    InvalidMetricsListen(String),
    #[error("invalid max_connections {0:?}: expected a whole number from 1 to 65536")]
    InvalidMaxConnections(String),
    #[error("listen path {} is not absolute", .0.display())]
    RelativeListen(PathBuf),
    #[error("listen path {} is the runtime's own socket; the shim would proxy to itself", .0.display())]
    ListenIsRuntime(PathBuf),
    #[error("state directory {} is not absolute", .0.display())]
    RelativeStateDir(PathBuf),
    #[error("admin_listen path {} is not absolute", .0.display())]
    RelativeAdminListen(PathBuf),
    #[error("admin_listen path {} is the CRI listen path or the runtime's socket; it needs its own", .0.display())]
    AdminListenTaken(PathBuf),
}

/// Parses a runtime endpoint (`unix:///path` or an absolute path) into the
/// socket's filesystem path. Only Unix sockets are supported: containerd's CRI
/// is served on one, and a network hop would need TLS we do not configure.
pub fn parse_runtime_endpoint(input: &str) -> Result<PathBuf, ConfigError> {
    let err = |reason: &str| ConfigError::InvalidEndpoint {
        value: input.to_owned(),
        reason: reason.to_owned(),
    };
    if input.starts_with('/') {
        return Ok(PathBuf::from(input));
    }
    match input.split_once("://") {
        Some((scheme, path)) if scheme.eq_ignore_ascii_case("unix") => {
            if path.starts_with('/') {
                Ok(PathBuf::from(path))
            } else if path.is_empty() {
                Err(err("no socket path after unix://"))
            } else {
                Err(err(
                    "the socket path must be absolute, as in unix:///run/containerd/containerd.sock",
                ))
            }
        }
        Some((scheme, _)) => Err(ConfigError::InvalidEndpoint {
            value: input.to_owned(),
            reason: format!(
                "unsupported scheme {scheme:?}; only unix:///path or an absolute socket path is accepted"
            ),
        }),
        None if input.is_empty() => Err(err("empty")),
        None => Err(err("expected unix:///path or an absolute socket path")),
    }
}

/// Parses a duration such as `10s`, `500ms`, `2m`, `1h` or `1m30s`: whole
/// numbers, each followed by a unit (`h`, `m`, `s`, `ms`), largest unit first.
pub fn parse_duration(input: &str) -> Result<Duration, ConfigError> {
    let err = |reason: String| ConfigError::InvalidDuration {
        value: input.to_owned(),
        reason,
    };
    const HINT: &str = "use whole numbers with units h, m, s or ms, e.g. 10s, 500ms, 1m30s";

    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(err(format!("empty; {HINT}")));
    }
    let mut total_ms: u64 = 0;
    // Each unit may appear once, largest first, so "1m30s" is fine but
    // "30s1m" or "1s1s" (likely typos) are rejected.
    let mut previous_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err(format!("expected a number at {rest:?}; {HINT}")));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let (rank, unit_ms) = match unit {
            "h" => (3, 3_600_000),
            "m" => (2, 60_000),
            "s" => (1, 1_000),
            "ms" => (0, 1),
            "" => return Err(err(format!("missing unit after {number}; {HINT}"))),
            u if u.starts_with('.') => {
                return Err(err(
                    "fractions are not supported; write e.g. 1s500ms instead of 1.5s".to_owned(),
                ))
            }
            u => return Err(err(format!("unknown unit {u:?}; {HINT}"))),
        };
        if rank >= previous_rank {
            return Err(err(format!(
                "units must each appear once, largest first; {HINT}"
            )));
        }
        previous_rank = rank;
        let part = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
            .ok_or_else(|| err("too large".to_owned()))?;
        total_ms = total_ms
            .checked_add(part)
            .ok_or_else(|| err("too large".to_owned()))?;
        rest = next;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Parses the metrics listener's address: an IP address and a port, never a
/// host name (only the address given is bound, so it must be unambiguous).
pub fn parse_metrics_listen(input: &str) -> Result<SocketAddr, ConfigError> {
    input
        .trim()
        .parse()
        .map_err(|_| ConfigError::InvalidMetricsListen(input.to_owned()))
}

/// Parses `max_connections`: 1 to 65536.
pub fn parse_max_connections(input: &str) -> Result<usize, ConfigError> {
    match input.trim().parse::<usize>() {
        Ok(n) if (1..=65536).contains(&n) => Ok(n),
        _ => Err(ConfigError::InvalidMaxConnections(input.to_owned())),
    }
}

fn de_max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = u64::deserialize(d)?;
    parse_max_connections(&n.to_string())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_metrics_listen(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_runtime_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    parse_runtime_endpoint(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn cli(args: &[&str]) -> Cli {
        let argv = std::iter::once("sidecar-shim").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("parse {args:?}: {e}"))
    }

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("parse {text:?}: {e}"))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_defaults_and_rust_log() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            DEFAULT_LISTEN,
            DEFAULT_RUNTIME_ENDPOINT,
            "[default: 10s]",
            "[default: text]",
            "RUST_LOG",
            &format!("the filter is \"{}\"", crate::logging::DEFAULT_FILTER),
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
        }
        assert_eq!(DEFAULT_DRAIN_TIMEOUT, parse_duration("10s").unwrap());
    }

    #[test]
    fn merge_precedence() {
        let full_file = "listen = \"/file/shim.sock\"\n\
                         runtime_endpoint = \"unix:///file/containerd.sock\"\n\
                         log_format = \"json\"\n\
                         drain_timeout = \"1m30s\"\n\
                         admin_listen = \"/file/admin/a.sock\"\n";
        let d = Config::default();
        // (name, flags, file, expected)
        let cases: Vec<(&str, Vec<&str>, Option<&str>, Config)> = vec![
            (
                "defaults",
                vec![],
                None,
                Config {
                    listen: "/run/sidecar-shim/sidecar-shim.sock".into(),
                    admin_listen: "/run/sidecar-shim/admin.sock".into(),
                    runtime_socket: "/run/containerd/containerd.sock".into(),
                    log_format: LogFormat::Text,
                    drain_timeout: Duration::from_secs(10),
                    state_dir: "/var/lib/sidecar-shim".into(),
                    metrics_listen: None,
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    lifecycle: LifecycleConfig::default(),
                },
            ),
            ("empty file", vec![], Some(""), d.clone()),
            (
                "file only",
                vec![],
                Some(full_file),
                Config {
                    listen: "/file/shim.sock".into(),
                    admin_listen: "/file/admin/a.sock".into(),
                    runtime_socket: "/file/containerd.sock".into(),
                    log_format: LogFormat::Json,
                    drain_timeout: Duration::from_secs(90),
                    state_dir: "/var/lib/sidecar-shim".into(),
                    metrics_listen: None,
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    lifecycle: LifecycleConfig::default(),
                },
            ),
            (
                "partial file keeps other defaults",
                vec![],
                Some("drain_timeout = \"500ms\""),
                Config {
                    drain_timeout: Duration::from_millis(500),
                    ..d.clone()
                },
            ),
            (
                "flags only",
                vec![
                    "--listen",
                    "/flag/shim.sock",
                    "--runtime-endpoint",
                    "/flag/containerd.sock",
                    "--log-format",
                    "json",
                    "--drain-timeout",
                    "2m",
                ],
                None,
                Config {
                    listen: "/flag/shim.sock".into(),
                    admin_listen: "/flag/admin.sock".into(),
                    runtime_socket: "/flag/containerd.sock".into(),
                    log_format: LogFormat::Json,
                    drain_timeout: Duration::from_secs(120),
                    state_dir: "/var/lib/sidecar-shim".into(),
                    metrics_listen: None,
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    lifecycle: LifecycleConfig::default(),
                },
            ),
            (
                "flags override file",
                vec![
                    "--listen=/flag/shim.sock",
                    "--runtime-endpoint=unix:///flag/containerd.sock",
                    "--log-format=text",
                    "--drain-timeout=0s",
                    "--admin-listen=/flag/admin/b.sock",
                ],
                Some(full_file),
                Config {
                    listen: "/flag/shim.sock".into(),
                    admin_listen: "/flag/admin/b.sock".into(),
                    runtime_socket: "/flag/containerd.sock".into(),
                    log_format: LogFormat::Text,
                    drain_timeout: Duration::ZERO,
                    state_dir: "/var/lib/sidecar-shim".into(),
                    metrics_listen: None,
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    lifecycle: LifecycleConfig::default(),
                },
            ),
            (
                "admin socket follows a listen path from the file",
                vec![],
                Some("listen = \"/file/x/shim.sock\""),
                Config {
                    listen: "/file/x/shim.sock".into(),
                    admin_listen: "/file/x/admin.sock".into(),
                    ..d.clone()
                },
            ),
            (
                "one flag overrides one file key",
                vec!["--drain-timeout", "3s"],
                Some(full_file),
                Config {
                    listen: "/file/shim.sock".into(),
                    admin_listen: "/file/admin/a.sock".into(),
                    runtime_socket: "/file/containerd.sock".into(),
                    log_format: LogFormat::Json,
                    drain_timeout: Duration::from_secs(3),
                    state_dir: "/var/lib/sidecar-shim".into(),
                    metrics_listen: None,
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    lifecycle: LifecycleConfig::default(),
                },
            ),
        ];
        for (name, flags, text, expected) in cases {
            let got = Config::merge(&cli(&flags), text.map(file));
            match got {
                Ok(got) => assert_eq!(got, expected, "case {name}"),
                Err(e) => panic!("case {name}: {e}"),
            }
        }
    }

    #[test]
    fn merge_rejects_bad_combinations() {
        let cases = [
            (
                "relative listen",
                vec!["--listen", "shim.sock"],
                "not absolute",
            ),
            (
                "relative admin listen",
                vec!["--admin-listen", "admin.sock"],
                "admin_listen path admin.sock is not absolute",
            ),
            (
                "admin listen on the CRI socket",
                vec!["--listen", "/x.sock", "--admin-listen", "/x.sock"],
                "needs its own",
            ),
            (
                "admin listen on the runtime socket",
                vec![
                    "--runtime-endpoint",
                    "unix:///x.sock",
                    "--admin-listen",
                    "/x.sock",
                ],
                "needs its own",
            ),
            (
                "listen on runtime socket",
                vec![
                    "--listen",
                    "/x.sock",
                    "--runtime-endpoint",
                    "unix:///x.sock",
                ],
                "proxy to itself",
            ),
        ];
        for (name, flags, want) in cases {
            let err = Config::merge(&cli(&flags), None).expect_err(name);
            assert!(err.to_string().contains(want), "case {name}: {err}");
        }
    }

    #[test]
    fn max_connections_from_flag_or_file() {
        let cases = [
            (vec![], None, DEFAULT_MAX_CONNECTIONS),
            (vec![], Some("max_connections = 64"), 64),
            (
                vec!["--max-connections", "8"],
                Some("max_connections = 64"),
                8,
            ),
        ];
        for (flags, text, want) in cases {
            let config = Config::merge(&cli(&flags), text.map(file)).unwrap();
            assert_eq!(config.max_connections, want, "{flags:?} {text:?}");
        }
        for bad in ["0", "-1", "65537", "many", ""] {
            let msg = parse_max_connections(bad).unwrap_err().to_string();
            assert!(msg.contains("max_connections"), "{bad:?}: {msg}");
        }
        let err = FileConfig::parse("max_connections = 0", Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    #[test]
    fn metrics_listen_from_flag_or_file() {
        let v4: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        let cases = [
            (vec![], None, None),
            (
                vec![],
                Some("metrics_listen = \"127.0.0.1:9464\""),
                Some(v4),
            ),
            (vec!["--metrics-listen", "[::1]:9000"], None, Some(v6)),
            (
                vec!["--metrics-listen=[::1]:9000"],
                Some("metrics_listen = \"127.0.0.1:9464\""),
                Some(v6),
            ),
            (
                vec!["--metrics-listen", "127.0.0.1:0"],
                None,
                Some("127.0.0.1:0".parse().unwrap()),
            ),
        ];
        for (flags, text, want) in cases {
            let config = Config::merge(&cli(&flags), text.map(file)).unwrap();
            assert_eq!(config.metrics_listen, want, "{flags:?} {text:?}");
        }
        for bad in [
            "localhost:9464",
            "127.0.0.1",
            ":9464",
            "127.0.0.1:99999",
            "",
        ] {
            let msg = parse_metrics_listen(bad).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("{bad:?}")) && msg.contains("IP:PORT"),
                "{bad:?}: {msg}"
            );
        }
    }

    #[test]
    fn runtime_endpoints() {
        let ok = [
            (
                "unix:///run/containerd/containerd.sock",
                "/run/containerd/containerd.sock",
            ),
            ("UNIX:///a.sock", "/a.sock"),
            (
                "/run/k3s/containerd/containerd.sock",
                "/run/k3s/containerd/containerd.sock",
            ),
        ];
        for (input, path) in ok {
            assert_eq!(
                parse_runtime_endpoint(input).unwrap(),
                PathBuf::from(path),
                "{input}"
            );
        }
        let bad = [
            ("tcp://127.0.0.1:1234", "unsupported scheme \"tcp\""),
            (
                "npipe:////./pipe/containerd",
                "unsupported scheme \"npipe\"",
            ),
            ("unix://run/containerd.sock", "must be absolute"),
            ("unix://", "no socket path"),
            ("containerd.sock", "expected unix:///path"),
            ("", "empty"),
        ];
        for (input, want) in bad {
            let msg = parse_runtime_endpoint(input).unwrap_err().to_string();
            assert!(msg.contains(want), "{input:?}: {msg}");
            assert!(
                msg.contains(&format!("{input:?}")),
                "names the value: {msg}"
            );
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("10s", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0s", Duration::ZERO),
            (" 5s ", Duration::from_secs(5)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_duration(input).unwrap(), want, "{input:?}");
        }
        let bad = [
            ("", "empty"),
            ("10", "missing unit"),
            ("10x", "unknown unit \"x\""),
            ("1.5s", "fractions"),
            ("-1s", "expected a number"),
            ("s", "expected a number"),
            ("30s1m", "largest first"),
            ("1s1s", "largest first"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615h", "too large"),
        ];
        for (input, want) in bad {
            let msg = parse_duration(input).unwrap_err().to_string();
            assert!(msg.contains(want), "{input:?}: {msg}");
        }
    }

    /// Bad values on the command line are clap errors naming the flag.
    #[test]
    fn bad_flags() {
        let cases = [
            (
                vec!["--runtime-endpoint", "tcp://10.0.0.1:1"],
                "unsupported scheme",
            ),
            (vec!["--drain-timeout", "10"], "missing unit"),
            (vec!["--drain-timeout", "soon"], "expected a number"),
            (vec!["--log-format", "xml"], "possible values: text, json"),
            (
                vec!["--metrics-listen", "localhost:9464"],
                "expected IP:PORT",
            ),
            (vec!["--no-such-flag"], "unexpected argument"),
        ];
        for (args, want) in cases {
            let argv = std::iter::once("sidecar-shim").chain(args.iter().copied());
            let msg = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(msg.contains(want), "{args:?}: {msg}");
            assert!(msg.contains(args[0]), "{args:?} names the flag: {msg}");
        }
    }

    /// Bad file contents are errors naming the file and the offending key.
    #[test]
    fn bad_files() {
        let cases = [
            (
                "unknown key",
                "listen = \"/a.sock\"\nstate_dirr = \"/x\"\n",
                "unknown field `state_dirr`",
            ),
            (
                "bad endpoint scheme",
                "runtime_endpoint = \"tcp://h:1\"\n",
                "unsupported scheme \"tcp\"",
            ),
            (
                "bad duration",
                "drain_timeout = \"ten seconds\"\n",
                "expected a number",
            ),
            (
                "duration not a string",
                "drain_timeout = 10\n",
                "expected a string",
            ),
            (
                "bad log format",
                "log_format = \"xml\"\n",
                "unknown variant `xml`",
            ),
            ("not toml", "listen = \n", "TOML parse error"),
            (
                "metrics address with a host name",
                "metrics_listen = \"node:9464\"\n",
                "expected IP:PORT",
            ),
            (
                "unknown preset",
                "[lifecycle]\npresets = [\"istio\", \"consul\"]\n",
                "unknown variant `consul`, expected `istio` or `linkerd`",
            ),
            (
                "preset name case",
                "[lifecycle]\npresets = [\"Istio\"]\n",
                "unknown variant `Istio`",
            ),
            (
                "presets not a list",
                "[lifecycle]\npresets = \"istio\"\n",
                "expected a sequence",
            ),
        ];
        for (name, text, want) in cases {
            let err = FileConfig::parse(text, Path::new("etc/shim.toml")).expect_err(name);
            assert!(
                matches!(err, ConfigError::Parse { .. }),
                "case {name}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("etc/shim.toml"),
                "case {name} names the file: {msg}"
            );
            assert!(msg.contains(want), "case {name}: {msg}");
        }
    }

    #[test]
    fn mesh_presets() {
        use crate::lifecycle::spec::Preset;
        let cases: [(&str, Vec<Preset>); 5] = [
            ("", vec![]),
            ("[lifecycle]\n", vec![]),
            ("[lifecycle]\npresets = []\n", vec![]),
            (
                "[lifecycle]\npresets = [\"istio\", \"linkerd\"]\n",
                vec![Preset::Istio, Preset::Linkerd],
            ),
            (
                "[lifecycle]\npresets = [\"linkerd\"]\n",
                vec![Preset::Linkerd],
            ),
        ];
        for (text, want) in cases {
            let config = Config::merge(&cli(&[]), Some(file(text))).unwrap();
            assert_eq!(config.lifecycle.presets, want, "{text:?}");
            assert_eq!(config.lifecycle.defaults().presets, want, "{text:?}");
        }
        assert!(LifecycleConfig::default().defaults().presets.is_empty());
    }

    #[test]
    fn init_window_is_set_in_the_lifecycle_table() {
        let default = Config::merge(&cli(&[]), Some(file("[lifecycle]\n"))).unwrap();
        assert_eq!(
            default.lifecycle.settings().init_window,
            crate::lifecycle::machine::Settings::default().init_window
        );
        let set =
            Config::merge(&cli(&[]), Some(file("[lifecycle]\ninit_window = \"3s\"\n"))).unwrap();
        assert_eq!(set.lifecycle.settings().init_window, Duration::from_secs(3));
    }

    /// systemd/config.toml, installed on nodes, documents the defaults.
    #[test]
    fn documented_config_is_the_defaults() {
        let text = include_str!("../systemd/config.toml");
        let config = Config::merge(&cli(&[]), Some(file(text))).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn from_cli_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(&path, "log_format = \"json\"\n").unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let config = Config::from_cli(&cli).unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn from_cli_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let cli = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let err = Config::from_cli(&cli).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
