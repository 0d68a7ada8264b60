//! The TOML shape of one fragment file (every key optional, unknown keys refused) and one merge
//! function per section. Each merge writes the keys a fragment sets over the settings so far and
//! `mark`s the dotted key, so a later error can name the file that set it last.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    ConfigError, HttpSettings, MoveSettings, ProjectSettings, Settings, SnapshotSettings,
    SshSettings, StorageSettings,
};
use crate::auth::AuthFragment;
use crate::domain::limits::{Amount, LimitSettings, Networks, SliceSettings};
use crate::domain::project::NetworkMode;
use crate::units::{opt_duration, opt_size, parse_size};

/// Where a merge reports the dotted keys it set.
type Mark<'a> = &'a mut dyn FnMut(&'static str);

/// Sets `slot` when the fragment has a value, and marks `key`.
fn put<T>(slot: &mut T, v: Option<T>, key: &'static str, mark: Mark<'_>) {
    if let Some(v) = v {
        *slot = v;
        mark(key);
    }
}

/// One fragment file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fragment {
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    storage: StorageFragment,
    #[serde(default)]
    projects: ProjectsFragment,
    #[serde(default)]
    limits: LimitsFragment,
    #[serde(default)]
    slice: SliceFragment,
    #[serde(default)]
    snapshots: SnapshotsFragment,
    #[serde(default)]
    auth: AuthFragment,
    #[serde(default)]
    http: HttpFragment,
    #[serde(default)]
    ssh: SshFragment,
    #[serde(default)]
    proxy: crate::adapters::proxy::ProxyFragment,
    #[serde(default)]
    master: super::master::MasterFragment,
    #[serde(default)]
    moves: MovesFragment,
}

impl Fragment {
    /// Parses one file's text; an error names the file and the line.
    pub(super) fn parse(path: &Path, text: &str) -> Result<Fragment, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().replace('\n', " ") + &location(text, e.span()),
        })
    }

    /// Merges every section of this fragment onto `s`.
    pub(super) fn apply(self, s: &mut Settings, mark: Mark<'_>) {
        put(&mut s.state_dir, self.state_dir, "state_dir", mark);
        put(&mut s.listen, self.listen, "listen", mark);
        self.storage.apply(&mut s.storage, mark);
        self.projects.apply(&mut s.projects, mark);
        self.limits.apply(&mut s.limits, mark);
        self.slice.apply(&mut s.slice, mark);
        self.snapshots.apply(&mut s.snapshots, mark);
        s.auth.merge(self.auth, mark);
        self.http.apply(&mut s.http, mark);
        self.ssh.apply(&mut s.ssh, mark);
        s.proxy.merge(self.proxy, mark);
        self.master.apply(&mut s.master, mark);
        self.moves.apply(&mut s.moves, mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MovesFragment {
    #[serde(default, deserialize_with = "opt_duration")]
    staging_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    receive_idle: Option<Duration>,
    ca_file: Option<PathBuf>,
    pin_sha256: Option<String>,
    allow_http: Option<bool>,
}

impl MovesFragment {
    fn apply(self, s: &mut MoveSettings, mark: Mark<'_>) {
        put(
            &mut s.staging_ttl,
            self.staging_ttl,
            "moves.staging_ttl",
            mark,
        );
        put(
            &mut s.stall_timeout,
            self.stall_timeout,
            "moves.stall_timeout",
            mark,
        );
        put(
            &mut s.receive_idle,
            self.receive_idle,
            "moves.receive_idle",
            mark,
        );
        put(
            &mut s.ca_file,
            self.ca_file.map(Some),
            "moves.ca_file",
            mark,
        );
        put(
            &mut s.pin_sha256,
            self.pin_sha256.map(Some),
            "moves.pin_sha256",
            mark,
        );
        put(&mut s.allow_http, self.allow_http, "moves.allow_http", mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SshFragment {
    listen: Option<SocketAddr>,
    autostart: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    keepalive: Option<Duration>,
}

impl SshFragment {
    fn apply(self, s: &mut SshSettings, mark: Mark<'_>) {
        put(&mut s.listen, self.listen.map(Some), "ssh.listen", mark);
        put(&mut s.autostart, self.autostart, "ssh.autostart", mark);
        put(&mut s.keepalive, self.keepalive, "ssh.keepalive", mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFragment {
    max_connections_per_peer: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

impl HttpFragment {
    fn apply(self, h: &mut HttpSettings, mark: Mark<'_>) {
        put(
            &mut h.max_connections_per_peer,
            self.max_connections_per_peer,
            "http.max_connections_per_peer",
            mark,
        );
        put(
            &mut h.tls_cert,
            self.tls_cert.map(Some),
            "http.tls_cert",
            mark,
        );
        put(&mut h.tls_key, self.tls_key.map(Some), "http.tls_key", mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageFragment {
    mount: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_size")]
    image_size: Option<u64>,
    /// a size, or `"unlimited"` (only ever by an admin's explicit word)
    #[serde(default, deserialize_with = "opt_quota")]
    disk_quota: Option<Option<u64>>,
    #[serde(default, deserialize_with = "opt_amount")]
    reserve: Option<Amount>,
    #[serde(default, deserialize_with = "opt_size")]
    scratch: Option<u64>,
    #[serde(default, deserialize_with = "opt_size")]
    tmp: Option<u64>,
}

impl StorageFragment {
    fn apply(self, s: &mut StorageSettings, mark: Mark<'_>) {
        put(&mut s.mount, self.mount.map(Some), "storage.mount", mark);
        put(
            &mut s.image_size,
            self.image_size,
            "storage.image_size",
            mark,
        );
        put(
            &mut s.disk_quota,
            self.disk_quota,
            "storage.disk_quota",
            mark,
        );
        put(&mut s.reserve, self.reserve, "storage.reserve", mark);
        put(
            &mut s.scratch,
            self.scratch.map(Some),
            "storage.scratch",
            mark,
        );
        put(&mut s.tmp, self.tmp.map(Some), "storage.tmp", mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotsFragment {
    enabled: Option<bool>,
    frequent: Option<usize>,
    daily: Option<usize>,
    weekly: Option<usize>,
    monthly: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    skip_untouched: Option<Duration>,
}

impl SnapshotsFragment {
    fn apply(self, s: &mut SnapshotSettings, mark: Mark<'_>) {
        put(&mut s.enabled, self.enabled, "snapshots.enabled", mark);
        let r = &mut s.retention;
        // the counts are validated together, under one key
        put(&mut r.frequent, self.frequent, "snapshots.counts", mark);
        put(&mut r.daily, self.daily, "snapshots.counts", mark);
        put(&mut r.weekly, self.weekly, "snapshots.counts", mark);
        put(&mut r.monthly, self.monthly, "snapshots.counts", mark);
        put(
            &mut s.skip_untouched,
            self.skip_untouched,
            "snapshots.skip_untouched",
            mark,
        );
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectsFragment {
    image: Option<String>,
    cmd: Option<Vec<String>>,
    network: Option<NetworkMode>,
    #[serde(default, deserialize_with = "opt_duration")]
    stop_timeout: Option<Duration>,
    uid_base: Option<u32>,
    uid_count: Option<u32>,
    user_uid: Option<u32>,
    capabilities: Option<Vec<String>>,
    images: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_duration")]
    log_rate_limit_interval: Option<Duration>,
    log_rate_limit_burst: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    idle_freeze: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    idle_stop: Option<Duration>,
    idle_cpu: Option<f64>,
}

impl ProjectsFragment {
    fn apply(self, p: &mut ProjectSettings, mark: Mark<'_>) {
        put(&mut p.image, self.image, "projects.image", mark);
        put(&mut p.cmd, self.cmd.map(Some), "projects.cmd", mark);
        put(&mut p.network, self.network, "projects.network", mark);
        put(
            &mut p.stop_timeout,
            self.stop_timeout,
            "projects.stop_timeout",
            mark,
        );
        put(&mut p.uid_base, self.uid_base, "projects.uid_base", mark);
        put(&mut p.uid_count, self.uid_count, "projects.uid_count", mark);
        put(&mut p.user_uid, self.user_uid, "projects.user_uid", mark);
        put(
            &mut p.capabilities,
            self.capabilities,
            "projects.capabilities",
            mark,
        );
        put(&mut p.images, self.images, "projects.images", mark);
        put(
            &mut p.log_rate_limit_interval,
            self.log_rate_limit_interval,
            "projects.log_rate_limit_interval",
            mark,
        );
        put(
            &mut p.log_rate_limit_burst,
            self.log_rate_limit_burst,
            "projects.log_rate_limit_burst",
            mark,
        );
        // 0 (or "0s"): never
        let never = |d: Duration| (!d.is_zero()).then_some(d);
        put(
            &mut p.idle.freeze_after,
            self.idle_freeze.map(never),
            "projects.idle_freeze",
            mark,
        );
        put(
            &mut p.idle.stop_after,
            self.idle_stop.map(never),
            "projects.idle_stop",
            mark,
        );
        put(
            &mut p.idle.cpu_busy,
            self.idle_cpu,
            "projects.idle_cpu",
            mark,
        );
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFragment {
    #[serde(default, deserialize_with = "opt_size")]
    memory: Option<u64>,
    swap: Option<bool>,
    #[serde(default, deserialize_with = "opt_cores")]
    cpu: Option<f64>,
    pids: Option<u64>,
    cpu_weight: Option<u64>,
    io_weight: Option<u64>,
    #[serde(default)]
    max: MaxFragment,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxFragment {
    #[serde(default, deserialize_with = "opt_size")]
    memory: Option<u64>,
    #[serde(default, deserialize_with = "opt_cores")]
    cpu: Option<f64>,
    pids: Option<u64>,
    #[serde(default, deserialize_with = "opt_size")]
    disk: Option<u64>,
    #[serde(default, deserialize_with = "opt_size")]
    scratch: Option<u64>,
    #[serde(default, deserialize_with = "opt_size")]
    tmp: Option<u64>,
    swap: Option<bool>,
    network: Option<Vec<NetworkMode>>,
}

impl LimitsFragment {
    fn apply(self, l: &mut LimitSettings, mark: Mark<'_>) {
        let d = &mut l.default;
        put(&mut d.memory, self.memory, "limits.memory", mark);
        put(&mut d.swap, self.swap, "limits.swap", mark);
        put(&mut d.cpu, self.cpu, "limits.cpu", mark);
        put(&mut d.pids, self.pids, "limits.pids", mark);
        put(
            &mut d.cpu_weight,
            self.cpu_weight,
            "limits.cpu_weight",
            mark,
        );
        put(&mut d.io_weight, self.io_weight, "limits.io_weight", mark);
        let (m, max) = (self.max, &mut l.max);
        put(&mut max.memory, m.memory, "limits.max.memory", mark);
        put(&mut max.cpu, m.cpu, "limits.max.cpu", mark);
        put(&mut max.pids, m.pids, "limits.max.pids", mark);
        put(&mut max.disk, m.disk, "limits.max.disk", mark);
        put(&mut max.scratch, m.scratch, "limits.max.scratch", mark);
        put(&mut max.tmp, m.tmp, "limits.max.tmp", mark);
        put(&mut max.swap, m.swap, "limits.max.swap", mark);
        let network = m
            .network
            .map(|v| v.into_iter().fold(Networks::NONE, Networks::with));
        put(&mut max.network, network, "limits.max.network", mark);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SliceFragment {
    #[serde(default, deserialize_with = "opt_amount")]
    memory_max: Option<Amount>,
    #[serde(default, deserialize_with = "opt_amount")]
    tasks_max: Option<Amount>,
    cpu_weight: Option<u64>,
}

impl SliceFragment {
    fn apply(self, s: &mut SliceSettings, mark: Mark<'_>) {
        put(&mut s.memory_max, self.memory_max, "slice.memory_max", mark);
        put(&mut s.tasks_max, self.tasks_max, "slice.tasks_max", mark);
        put(&mut s.cpu_weight, self.cpu_weight, "slice.cpu_weight", mark);
    }
}

/// A number of cores: a TOML integer or float.
fn opt_cores<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        I(u32),
        F(f64),
    }
    Ok(Some(match Raw::deserialize(d)? {
        Raw::I(n) => f64::from(n),
        Raw::F(f) => f,
    }))
}

/// A disk quota: a size, or `"unlimited"` (`Some(None)`).
fn opt_quota<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    Ok(Some(match Raw::deserialize(d)? {
        Raw::N(n) => Some(n),
        Raw::S(s) if s.trim() == "unlimited" => None,
        Raw::S(s) => Some(
            parse_size(&s)
                .map_err(|e| serde::de::Error::custom(format!("{e} (or \"unlimited\")")))?,
        ),
    }))
}

/// An [`Amount`]: an integer, a size (`8G`), or a percentage (`90%`).
fn opt_amount<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Amount>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    let bad = |m: String| <D::Error as serde::de::Error>::custom(m);
    Ok(Some(match Raw::deserialize(d)? {
        Raw::N(n) => Amount::Absolute(n),
        Raw::S(s) => match s.trim().strip_suffix('%') {
            Some(p) => Amount::Percent(
                p.trim()
                    .parse()
                    .map_err(|_| bad(format!("{s:?} is not a percentage")))?,
            ),
            None => Amount::Absolute(parse_size(&s).map_err(bad)?),
        },
    }))
}

/// ` (line N)` of a toml error's span, when it has one.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) if r.start <= text.len() => {
            let line = text[..r.start].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        _ => String::new(),
    }
}
