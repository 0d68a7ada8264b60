//! Host configuration: TOML fragments (every key optional) found like systemd drop-ins, merged
//! section by section onto the defaults, then validated into [`Settings`]. A bad key or value is
//! refused with the file and key named.
//!
//! - `discovery`: which files apply, in which order (same-name override, `/dev/null` masking).
//! - `fragments`: the TOML shape of one file and one merge function per section.
//! - `validate`: ranges and cross-checks of the merged result.
//!
//! Sizes and durations are parsed by [`crate::units`]; the `[auth]` section belongs to
//! [`crate::auth`] (this module only embeds it).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod discovery;
mod fragments;
mod keys;
mod master;
mod validate;

pub use crate::auth::AuthSettings;
pub use crate::units::{parse_duration, parse_size};
pub use discovery::{DEFAULT_ROOTS, ROOTS_ENV, fragment_files, roots_from_env};
pub use keys::keys;
pub use master::{MasterSettings, MasterUrl, parse_pin, parse_url};
pub use validate::ALLOWED_CAPABILITIES;

use crate::domain::limits::{Amount, LimitSettings, SliceSettings};
use crate::domain::project::NetworkMode;

/// Validated settings of the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where the store and the default storage image live.
    pub state_dir: PathBuf,
    /// Address bound when not socket-activated.
    pub listen: SocketAddr,
    /// Project storage.
    pub storage: StorageSettings,
    /// Defaults for projects.
    pub projects: ProjectSettings,
    /// Per-project resource limits: defaults and maxima.
    pub limits: LimitSettings,
    /// Host-wide limits on all projects together (`cocalc-projects.slice`).
    pub slice: SliceSettings,
    /// Rolling snapshots.
    pub snapshots: SnapshotSettings,
    /// Who may call the HTTP API (owned by `crate::auth`).
    pub auth: AuthSettings,
    /// The HTTP server.
    pub http: HttpSettings,
    /// The SSH server (`adapters::ssh`).
    pub ssh: SshSettings,
    /// The proxy into projects (owned by `crate::adapters::proxy`).
    pub proxy: crate::adapters::proxy::ProxySettings,
    /// The fleet's master (`[master]`; no url: standalone).
    pub master: MasterSettings,
    /// Moves of projects between hosts (`core::moves`).
    pub moves: MoveSettings,
}

/// Moves of projects between hosts (`[moves]`, docs/moves.md).
#[derive(Debug, Clone, PartialEq)]
pub struct MoveSettings {
    /// Target: a move neither finished nor cancelled whose staging area, spool and record saw
    /// no change for this long is deleted (its id stays taken: a replay is still refused).
    pub staging_ttl: Duration,
    /// Source: a stream that moves no byte for this long has stalled: the move fails
    /// (resumable).
    pub stall_timeout: Duration,
    /// Target: how long it waits for the next bytes of a stream before refusing it.
    pub receive_idle: Duration,
    /// Source: PEM file of the CA(s) an `https://` target's certificate must chain to
    /// (default: the system's CAs); the certificate must also name the target's host.
    pub ca_file: Option<PathBuf>,
    /// Source: the SHA-256 of every target's certificate (`master.pin_sha256`'s format), used
    /// when a move's request gives no pin of its own.
    pub pin_sha256: Option<String>,
    /// Source: allow plain `http://` targets that are not loopback (their streams cross the
    /// network in clear text).
    pub allow_http: bool,
}

impl Default for MoveSettings {
    fn default() -> Self {
        MoveSettings {
            staging_ttl: Duration::from_secs(86_400),
            stall_timeout: Duration::from_secs(60),
            receive_idle: Duration::from_secs(120),
            ca_file: None,
            pin_sha256: None,
            allow_http: false,
        }
    }
}

/// The SSH server into projects.
#[derive(Debug, Clone, PartialEq)]
pub struct SshSettings {
    /// Address bound when the `ssh` socket was not passed by systemd (`None`: no SSH then).
    pub listen: Option<SocketAddr>,
    /// Start a stopped project when an authorized key logs into it (otherwise refused).
    pub autostart: bool,
    /// Keepalive to idle clients (a dead client's session ends after 3 unanswered).
    pub keepalive: Duration,
}

/// The HTTP server (the API listener).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Most connections open at once from one peer address (more are closed unanswered).
    pub max_connections_per_peer: usize,
    /// PEM certificate chain for TLS on the API's connections to non-loopback addresses (with
    /// `tls_key`; reloaded on SIGHUP). Connections to loopback stay plain.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for it.
    pub tls_key: Option<PathBuf>,
}

/// Rolling snapshots: taken by the sweep that `cocalc-project-host-snapshots.timer` triggers.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    /// Whether the sweep takes and prunes rolling snapshots at all.
    pub enabled: bool,
    /// How many to keep per window.
    pub retention: crate::domain::snapshots::Retention,
    /// Projects neither running nor touched for this long are skipped by the sweep.
    pub skip_untouched: Duration,
}

/// Project storage settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageSettings {
    /// A mounted btrfs to use; when unset, a loop image under the state directory.
    pub mount: Option<PathBuf>,
    /// Size of the loop image (bytes, sparse).
    pub image_size: u64,
    /// Default disk quota of a project (bytes; `None`: no limit, only when the config says
    /// `"unlimited"`). A start config's `disk` wins.
    pub disk_quota: Option<u64>,
    /// Free space kept on the project storage: below it, cold starts and quota raises are
    /// refused (`storage_full`).
    pub reserve: Amount,
    /// Default size of a project's /scratch (bytes; `None`: no /scratch).
    pub scratch: Option<u64>,
    /// Default size of each of a project's /tmp, /var/tmp and /dev/shm tmpfs (bytes; `None`:
    /// `backends::podman::DEFAULT_TMP`).
    pub tmp: Option<u64>,
}

/// Defaults for projects.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectSettings {
    /// Image used when a start config names none.
    pub image: String,
    /// Command used instead of the image's CMD, when set.
    pub cmd: Option<Vec<String>>,
    /// Default network mode.
    pub network: NetworkMode,
    /// Graceful stop timeout, whole seconds (SIGTERM → SIGKILL inside the container).
    pub stop_timeout: Duration,
    /// First host uid/gid of the pool from which each project gets a range of its own
    /// (`domain::ids`; slots overlapping /etc/subuid, /etc/subgid or host ids are skipped).
    pub uid_base: u32,
    /// Size of each project's range.
    pub uid_count: u32,
    /// The uid/gid of `user` inside the container.
    pub user_uid: u32,
    /// Capabilities the container keeps (all others are dropped); names without `CAP_`.
    pub capabilities: Vec<String>,
    /// Images a start config may name: glob patterns over plain references
    /// (`domain::images`). Empty: only `image`.
    pub images: Vec<String>,
    /// journald's rate limit of each project unit: at most `log_rate_limit_burst` lines per
    /// `log_rate_limit_interval`; a flooding project loses its own lines only.
    pub log_rate_limit_interval: Duration,
    /// See `log_rate_limit_interval`.
    pub log_rate_limit_burst: u32,
    /// When running projects are frozen or stopped for being idle (`domain::idle`); a
    /// project's run config (`idle_freeze`, `idle_stop`) overrides the timeouts.
    pub idle: crate::domain::idle::IdlePolicy,
}

impl Settings {
    /// Where the project storage is mounted.
    pub fn storage_mount(&self) -> PathBuf {
        self.storage
            .mount
            .clone()
            .unwrap_or_else(|| self.state_dir.join("projects"))
    }
    /// The loop image backing the default storage.
    pub fn storage_image(&self) -> PathBuf {
        self.state_dir.join("projects.img")
    }
    /// Host uid that owns a new home (the container's `user` in the pool's first slot); a start
    /// gives it to the project's own range (`core::ids`).
    pub fn host_user_uid(&self) -> u32 {
        self.projects.uid_base + self.projects.user_uid
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            state_dir: PathBuf::from("/var/lib/cocalc-project-host"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9002)),
            storage: StorageSettings {
                mount: None,
                image_size: 20 << 30,
                disk_quota: Some(10 << 30),
                reserve: Amount::Percent(5),
                scratch: None,
                tmp: None,
            },
            projects: ProjectSettings {
                image: "localhost/cocalc-project:latest".into(),
                cmd: None,
                network: NetworkMode::None,
                stop_timeout: Duration::from_secs(10),
                uid_base: 1 << 30,
                uid_count: 65_536,
                user_uid: 1000,
                capabilities: Vec::new(),
                images: Vec::new(),
                log_rate_limit_interval: Duration::from_secs(30),
                log_rate_limit_burst: 10_000,
                idle: crate::domain::idle::IdlePolicy {
                    freeze_after: Some(Duration::from_secs(30 * 60)),
                    stop_after: None,
                    cpu_busy: 0.05,
                },
            },
            limits: LimitSettings::default(),
            slice: SliceSettings::default(),
            snapshots: SnapshotSettings {
                enabled: true,
                retention: crate::domain::snapshots::Retention::default(),
                skip_untouched: Duration::from_secs(14 * 86_400),
            },
            auth: AuthSettings::default(),
            http: HttpSettings {
                max_connections_per_peer: 64,
                tls_cert: None,
                tls_key: None,
            },
            ssh: SshSettings {
                listen: None,
                autostart: false,
                keepalive: Duration::from_secs(30),
            },
            proxy: crate::adapters::proxy::ProxySettings::default(),
            master: MasterSettings::default(),
            moves: MoveSettings::default(),
        }
    }
}

/// A configuration error: names the file (when one is at fault) and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, one line.
        message: String,
    },
    /// A fragment is a symlink (other than to `/dev/null`, which masks): not followed.
    #[error(
        "{path}: a symlinked fragment is not read: copy the file there, or link it to /dev/null to mask"
    )]
    Symlink {
        /// The symlink.
        path: PathBuf,
    },
    /// A value is out of range.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file that set it last.
        path: String,
        /// The dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Reads, merges and validates the fragments under `roots`.
pub fn load(roots: &[PathBuf]) -> Result<Settings, ConfigError> {
    if let Some(path) = discovery::unfollowed_symlinks(roots).into_iter().next() {
        return Err(ConfigError::Symlink { path });
    }
    let mut parsed = Vec::new();
    for path in fragment_files(roots) {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        parsed.push((path, text));
    }
    merge(parsed.iter().map(|(p, t)| (p.as_path(), t.as_str())))
}

/// Merges fragment texts (lowest priority first) onto the defaults and validates the result.
pub fn merge<'a>(
    fragments: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Settings, ConfigError> {
    let mut s = Settings::default();
    // which file set each key last, for error messages
    let mut origin = std::collections::HashMap::<&'static str, String>::new();
    for (path, text) in fragments {
        let f = fragments::Fragment::parse(path, text)?;
        let p = path.display().to_string();
        f.apply(&mut s, &mut |key| {
            origin.insert(key, p.clone());
        });
    }
    validate::validate(&s).map_err(|(key, message)| ConfigError::Invalid {
        path: origin
            .get(key)
            .cloned()
            .unwrap_or_else(|| "built-in default".into()),
        key,
        message,
    })?;
    Ok(s)
}

#[cfg(test)]
mod tests;
