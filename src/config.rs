//! Host configuration: TOML fragments (every key optional) merged from `/usr/lib`, `/run`, `/etc`
//! (later wins; in each, `config.toml` then `config.d/*.toml` sorted by name), then validated into
//! [`Settings`]. A bad key or value is refused with the file and key named.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limits::{Amount, LimitSettings, SliceSettings};
use crate::project::NetworkMode;

/// Where fragments are read from, lowest priority first.
pub const DEFAULT_ROOTS: [&str; 3] = [
    "/usr/lib/cocalc-project-host",
    "/run/cocalc-project-host",
    "/etc/cocalc-project-host",
];

/// Overrides [`DEFAULT_ROOTS`] (colon-separated), for tests and development.
pub const ROOTS_ENV: &str = "COCALC_PROJECT_HOST_CONFIG_DIRS";

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
    /// Who may call the HTTP API.
    pub auth: AuthSettings,
}

/// Rolling snapshots: taken by the sweep that `cocalc-project-host-snapshots.timer` triggers.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    /// Whether the sweep takes and prunes rolling snapshots at all.
    pub enabled: bool,
    /// How many to keep per window.
    pub retention: crate::snapshots::Retention,
    /// Projects neither running nor touched for this long are skipped by the sweep (seconds).
    pub skip_untouched_secs: u64,
}

/// HTTP API authentication (see `crate::auth`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    /// A root-only file of admin tokens (one per line), besides the systemd credential
    /// `admin-token`.
    pub admin_token_file: Option<PathBuf>,
    /// Ed25519 public keys of the master (PEM or base64 of the 32 raw bytes): master tokens signed
    /// by any of them are accepted. Empty: master tokens are refused.
    pub master_public_keys: Vec<String>,
    /// Longest lifetime of a master token accepted (`exp` - now, and `exp` - `iat`), in seconds.
    pub max_token_lifetime_secs: u64,
}

/// Project storage settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageSettings {
    /// A mounted btrfs to use; when unset, a loop image under the state directory.
    pub mount: Option<PathBuf>,
    /// Size of the loop image (bytes, sparse).
    pub image_size: u64,
    /// Default disk quota of a project (bytes; `None`: no limit). A start config's `disk` wins.
    pub disk_quota: Option<u64>,
    /// Default size of a project's /scratch (bytes; `None`: no /scratch).
    pub scratch: Option<u64>,
    /// Default size of each of a project's /tmp, /var/tmp and /dev/shm tmpfs (bytes; `None`:
    /// `podman::DEFAULT_TMP`).
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
    /// Graceful stop timeout in seconds (SIGTERM → SIGKILL inside the container).
    pub stop_timeout_secs: u64,
    /// First host uid/gid of the pool from which each project gets a range of its own
    /// (`idmap.rs`; slots overlapping /etc/subuid, /etc/subgid or host ids are skipped).
    pub uid_base: u32,
    /// Size of each project's range.
    pub uid_count: u32,
    /// The uid/gid of `user` inside the container.
    pub user_uid: u32,
    /// Capabilities the container keeps (all others are dropped); names without `CAP_`.
    pub capabilities: Vec<String>,
    /// Images a start config may name: glob patterns over plain references (`images.rs`).
    /// Empty: only `image`.
    pub images: Vec<String>,
    /// journald's rate limit of each project unit: at most `log_rate_limit_burst` lines per
    /// `log_rate_limit_interval_secs`; a flooding project loses its own lines only.
    pub log_rate_limit_interval_secs: u64,
    /// See `log_rate_limit_interval_secs`.
    pub log_rate_limit_burst: u32,
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
    /// Host uid that owns a project's files (the container's `user`).
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
                disk_quota: None,
                scratch: None,
                tmp: None,
            },
            projects: ProjectSettings {
                image: "localhost/cocalc-project:latest".into(),
                cmd: None,
                network: NetworkMode::None,
                stop_timeout_secs: 10,
                uid_base: 1 << 30,
                uid_count: 65_536,
                user_uid: 1000,
                capabilities: Vec::new(),
                images: Vec::new(),
                log_rate_limit_interval_secs: 30,
                log_rate_limit_burst: 10_000,
            },
            limits: LimitSettings::default(),
            slice: SliceSettings::default(),
            snapshots: SnapshotSettings {
                enabled: true,
                retention: crate::snapshots::Retention::default(),
                skip_untouched_secs: 14 * 86_400,
            },
            auth: AuthSettings {
                admin_token_file: None,
                master_public_keys: Vec::new(),
                max_token_lifetime_secs: 24 * 3600,
            },
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotsFragment {
    enabled: Option<bool>,
    frequent: Option<usize>,
    daily: Option<usize>,
    weekly: Option<usize>,
    monthly: Option<usize>,
    skip_untouched: Option<Secs>,
}

/// A duration: seconds as an integer, or a string with an s/m/h/d/w suffix.
#[derive(Debug, Clone, Copy)]
struct Secs(u64);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Secs(n)),
            Raw::S(s) => parse_duration(&s)
                .map(Secs)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `90`, `15m`, `12h`, `14d`, `2w` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown duration suffix (use s, m, h, d or w)"
                    ));
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFragment {
    admin_token_file: Option<PathBuf>,
    master_public_keys: Option<Vec<String>>,
    max_token_lifetime: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageFragment {
    mount: Option<PathBuf>,
    image_size: Option<Size>,
    disk_quota: Option<Size>,
    scratch: Option<Size>,
    tmp: Option<Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectsFragment {
    image: Option<String>,
    cmd: Option<Vec<String>>,
    network: Option<NetworkMode>,
    stop_timeout: Option<u64>,
    uid_base: Option<u32>,
    uid_count: Option<u32>,
    user_uid: Option<u32>,
    capabilities: Option<Vec<String>>,
    images: Option<Vec<String>>,
    log_rate_limit_interval: Option<u64>,
    log_rate_limit_burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFragment {
    memory: Option<Size>,
    swap: Option<bool>,
    cpu: Option<Cores>,
    pids: Option<u64>,
    cpu_weight: Option<u64>,
    io_weight: Option<u64>,
    #[serde(default)]
    max: MaxFragment,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxFragment {
    memory: Option<Size>,
    cpu: Option<Cores>,
    pids: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SliceFragment {
    memory_max: Option<AmountSpec>,
    tasks_max: Option<AmountSpec>,
    cpu_weight: Option<u64>,
}

/// Capabilities a project container may be configured to keep: podman's default set (all
/// harmless inside a user namespace) plus NET_RAW (ping). Anything else is refused.
pub const ALLOWED_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// A number of cores: an integer or a float.
#[derive(Debug, Clone, Copy)]
struct Cores(f64);

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            I(u32),
            F(f64),
        }
        Ok(Cores(match Raw::deserialize(d)? {
            Raw::I(n) => f64::from(n),
            Raw::F(f) => f,
        }))
    }
}

/// An [`Amount`]: an integer, a size (`8G`), or a percentage (`90%`).
#[derive(Debug, Clone, Copy)]
struct AmountSpec(Amount);

impl<'de> Deserialize<'de> for AmountSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let a =
            match Raw::deserialize(d)? {
                Raw::N(n) => Amount::Absolute(n),
                Raw::S(s) => match s.trim().strip_suffix('%') {
                    Some(p) => Amount::Percent(p.trim().parse().map_err(|_| {
                        serde::de::Error::custom(format!("{s:?} is not a percentage"))
                    })?),
                    None => Amount::Absolute(parse_size(&s).map_err(serde::de::Error::custom)?),
                },
            };
        Ok(AmountSpec(a))
    }
}

/// A byte size: an integer, or a string with a K/M/G/T suffix (powers of 1024).
#[derive(Debug, Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `512M`, `20G`, `1073741824`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The fragment files under `roots`, in the order they apply.
pub fn fragment_files(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for root in roots {
        let main = root.join("config.toml");
        if main.is_file() {
            files.push(main);
        }
        if let Ok(rd) = std::fs::read_dir(root.join("config.d")) {
            let mut d: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            d.sort();
            files.extend(d);
        }
    }
    files
}

/// The roots to read: [`ROOTS_ENV`] when set, else [`DEFAULT_ROOTS`].
pub fn roots_from_env() -> Vec<PathBuf> {
    match std::env::var_os(ROOTS_ENV) {
        Some(v) => std::env::split_paths(&v).collect(),
        None => DEFAULT_ROOTS.iter().map(PathBuf::from).collect(),
    }
}

/// Reads, merges and validates the fragments under `roots`.
pub fn load(roots: &[PathBuf]) -> Result<Settings, ConfigError> {
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
    // which file set each validated key last, for error messages
    let mut origin = std::collections::HashMap::<&'static str, String>::new();
    for (path, text) in fragments {
        let f: Fragment = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().replace('\n', " ") + &location(text, e.span()),
        })?;
        let p = path.display().to_string();
        let mut set = |key: &'static str| {
            origin.insert(key, p.clone());
        };
        if let Some(v) = f.state_dir {
            s.state_dir = v;
            set("state_dir");
        }
        if let Some(v) = f.listen {
            s.listen = v;
        }
        if let Some(v) = f.storage.mount {
            s.storage.mount = Some(v);
            set("storage.mount");
        }
        if let Some(v) = f.storage.image_size {
            s.storage.image_size = v.0;
            set("storage.image_size");
        }
        if let Some(v) = f.storage.disk_quota {
            s.storage.disk_quota = Some(v.0);
            set("storage.disk_quota");
        }
        if let Some(v) = f.storage.scratch {
            s.storage.scratch = Some(v.0);
            set("storage.scratch");
        }
        if let Some(v) = f.storage.tmp {
            s.storage.tmp = Some(v.0);
            set("storage.tmp");
        }
        let sn = f.snapshots;
        if let Some(v) = sn.enabled {
            s.snapshots.enabled = v;
        }
        let r = &mut s.snapshots.retention;
        for (v, slot) in [
            (sn.frequent, &mut r.frequent),
            (sn.daily, &mut r.daily),
            (sn.weekly, &mut r.weekly),
            (sn.monthly, &mut r.monthly),
        ] {
            if let Some(v) = v {
                *slot = v;
                set("snapshots.counts");
            }
        }
        if let Some(v) = sn.skip_untouched {
            s.snapshots.skip_untouched_secs = v.0;
        }
        let pr = f.projects;
        if let Some(v) = pr.image {
            s.projects.image = v;
            set("projects.image");
        }
        if let Some(v) = pr.cmd {
            s.projects.cmd = Some(v);
            set("projects.cmd");
        }
        if let Some(v) = pr.network {
            s.projects.network = v;
        }
        if let Some(v) = pr.stop_timeout {
            s.projects.stop_timeout_secs = v;
            set("projects.stop_timeout");
        }
        if let Some(v) = pr.uid_base {
            s.projects.uid_base = v;
            set("projects.uid_base");
        }
        if let Some(v) = pr.uid_count {
            s.projects.uid_count = v;
            set("projects.uid_count");
        }
        if let Some(v) = pr.user_uid {
            s.projects.user_uid = v;
            set("projects.user_uid");
        }
        if let Some(v) = pr.capabilities {
            s.projects.capabilities = v;
            set("projects.capabilities");
        }
        if let Some(v) = pr.images {
            s.projects.images = v;
            set("projects.images");
        }
        if let Some(v) = pr.log_rate_limit_interval {
            s.projects.log_rate_limit_interval_secs = v;
            set("projects.log_rate_limit_interval");
        }
        if let Some(v) = pr.log_rate_limit_burst {
            s.projects.log_rate_limit_burst = v;
            set("projects.log_rate_limit_burst");
        }
        let (l, d) = (f.limits, &mut s.limits.default);
        if let Some(v) = l.memory {
            d.memory = v.0;
            set("limits.memory");
        }
        if let Some(v) = l.swap {
            d.swap = v;
        }
        if let Some(v) = l.cpu {
            d.cpu = v.0;
            set("limits.cpu");
        }
        if let Some(v) = l.pids {
            d.pids = v;
            set("limits.pids");
        }
        if let Some(v) = l.cpu_weight {
            d.cpu_weight = v;
            set("limits.cpu_weight");
        }
        if let Some(v) = l.io_weight {
            d.io_weight = v;
            set("limits.io_weight");
        }
        let (m, max) = (l.max, &mut s.limits.max);
        if let Some(v) = m.memory {
            max.memory = v.0;
            set("limits.max.memory");
        }
        if let Some(v) = m.cpu {
            max.cpu = v.0;
            set("limits.max.cpu");
        }
        if let Some(v) = m.pids {
            max.pids = v;
            set("limits.max.pids");
        }
        if let Some(v) = f.slice.memory_max {
            s.slice.memory_max = v.0;
            set("slice.memory_max");
        }
        if let Some(v) = f.slice.tasks_max {
            s.slice.tasks_max = v.0;
            set("slice.tasks_max");
        }
        if let Some(v) = f.slice.cpu_weight {
            s.slice.cpu_weight = v;
            set("slice.cpu_weight");
        }
        let au = f.auth;
        if let Some(v) = au.admin_token_file {
            s.auth.admin_token_file = Some(v);
            set("auth.admin_token_file");
        }
        if let Some(v) = au.master_public_keys {
            s.auth.master_public_keys = v;
            set("auth.master_public_keys");
        }
        if let Some(v) = au.max_token_lifetime {
            s.auth.max_token_lifetime_secs = v;
            set("auth.max_token_lifetime");
        }
    }
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: origin
            .get(key)
            .cloned()
            .unwrap_or_else(|| "built-in default".into()),
        key,
        message,
    };
    if !s.state_dir.is_absolute() {
        return Err(invalid("state_dir", "must be an absolute path".into()));
    }
    if let Some(m) = &s.storage.mount
        && !m.is_absolute()
    {
        return Err(invalid("storage.mount", "must be an absolute path".into()));
    }
    if s.storage.image_size < 256 << 20 {
        return Err(invalid(
            "storage.image_size",
            "must be at least 256M (btrfs needs room)".into(),
        ));
    }
    for (key, v, min) in [
        (
            "storage.disk_quota",
            s.storage.disk_quota,
            crate::project::MIN_DISK,
        ),
        (
            "storage.scratch",
            s.storage.scratch,
            crate::project::MIN_DISK,
        ),
        ("storage.tmp", s.storage.tmp, crate::project::MIN_TMP),
    ] {
        if let Some(v) = v
            && v < min
        {
            return Err(invalid(key, format!("must be at least {min} bytes")));
        }
    }
    let r = &s.snapshots.retention;
    if [r.frequent, r.daily, r.weekly, r.monthly]
        .iter()
        .any(|n| *n > 1000)
    {
        return Err(invalid(
            "snapshots.counts",
            "frequent, daily, weekly and monthly must each be at most 1000".into(),
        ));
    }
    let image_ok = crate::project::RunConfig {
        image: Some(s.projects.image.clone()),
        ..Default::default()
    };
    if let Err(e) = image_ok.validate() {
        return Err(invalid("projects.image", e.reason));
    }
    if let Err(e) = crate::images::Allowlist::new(&s.projects.image, &[]) {
        return Err(invalid("projects.image", e));
    }
    if let Err(e) = crate::images::Allowlist::new(&s.projects.image, &s.projects.images) {
        return Err(invalid("projects.images", e));
    }
    if s.projects.log_rate_limit_interval_secs > 3600 {
        return Err(invalid(
            "projects.log_rate_limit_interval",
            "must be at most 3600 seconds".into(),
        ));
    }
    if let Some(cmd) = &s.projects.cmd
        && cmd.is_empty()
    {
        return Err(invalid(
            "projects.cmd",
            "must not be empty (leave it unset for the image's CMD)".into(),
        ));
    }
    if s.projects.stop_timeout_secs > 3600 {
        return Err(invalid(
            "projects.stop_timeout",
            "must be at most 3600 seconds".into(),
        ));
    }
    if s.projects.uid_base == 0 {
        return Err(invalid(
            "projects.uid_base",
            "must not be 0: container root must not be host root".into(),
        ));
    }
    if s.projects.uid_count < 65_536 {
        return Err(invalid(
            "projects.uid_count",
            "must be at least 65536".into(),
        ));
    }
    if s.projects
        .uid_base
        .checked_add(s.projects.uid_count)
        .is_none()
    {
        return Err(invalid(
            "projects.uid_count",
            "uid_base + uid_count overflows".into(),
        ));
    }
    if s.projects.user_uid == 0 || s.projects.user_uid >= s.projects.uid_count {
        return Err(invalid(
            "projects.user_uid",
            "must be inside the mapped range and not 0".into(),
        ));
    }
    if let Some(c) = s
        .projects
        .capabilities
        .iter()
        .find(|c| !ALLOWED_CAPABILITIES.contains(&c.as_str()))
    {
        return Err(invalid(
            "projects.capabilities",
            format!(
                "{c:?} may not be granted (allowed: {})",
                ALLOWED_CAPABILITIES.join(", ")
            ),
        ));
    }
    validate_limits(&s).map_err(|(key, message)| invalid(key, message))?;
    if let Some(p) = &s.auth.admin_token_file
        && !p.is_absolute()
    {
        return Err(invalid(
            "auth.admin_token_file",
            "must be an absolute path".into(),
        ));
    }
    for (i, k) in s.auth.master_public_keys.iter().enumerate() {
        if let Err(e) = crate::auth::parse_public_key(k) {
            return Err(invalid(
                "auth.master_public_keys",
                format!("key {}: {e}", i + 1),
            ));
        }
    }
    if !(60..=30 * 86400).contains(&s.auth.max_token_lifetime_secs) {
        return Err(invalid(
            "auth.max_token_lifetime",
            "must be 60 to 2592000 seconds (30 days)".into(),
        ));
    }
    Ok(s)
}

/// Limit settings: each in the range a run config may ask for, defaults at most the maxima.
fn validate_limits(s: &Settings) -> Result<(), (&'static str, String)> {
    use crate::project::RunConfig;
    let (d, max) = (&s.limits.default, &s.limits.max);
    let as_config = |memory, cpu, pids, cpu_weight, io_weight| RunConfig {
        memory: Some(memory),
        cpu: Some(cpu),
        pids: Some(pids),
        cpu_weight,
        io_weight,
        ..Default::default()
    };
    let key = |max: bool, field: &str| -> &'static str {
        match (max, field) {
            (false, "memory") => "limits.memory",
            (false, "cpu") => "limits.cpu",
            (false, "pids") => "limits.pids",
            (false, "cpu_weight") => "limits.cpu_weight",
            (false, "io_weight") => "limits.io_weight",
            (true, "memory") => "limits.max.memory",
            (true, "cpu") => "limits.max.cpu",
            _ => "limits.max.pids",
        }
    };
    as_config(
        d.memory,
        d.cpu,
        d.pids,
        Some(d.cpu_weight),
        Some(d.io_weight),
    )
    .validate()
    .map_err(|e| (key(false, e.field), e.reason))?;
    as_config(max.memory, max.cpu, max.pids, None, None)
        .validate()
        .map_err(|e| (key(true, e.field), e.reason))?;
    crate::limits::check(d, max).map_err(|e| {
        (
            key(false, e.field),
            format!("{} (limits.max.{})", e.reason, e.field),
        )
    })?;
    let sl = &s.slice;
    for (k, a, min) in [
        ("slice.memory_max", sl.memory_max, 64u64 << 20),
        ("slice.tasks_max", sl.tasks_max, 16),
    ] {
        match a {
            Amount::Percent(p) if !(1..=100).contains(&p) => {
                return Err((k, format!("{p}% is not in 1..=100%")));
            }
            Amount::Absolute(n) if n < min => {
                return Err((k, format!("{n} is below the minimum of {min}")));
            }
            _ => {}
        }
    }
    if !(1..=10_000).contains(&sl.cpu_weight) {
        return Err((
            "slice.cpu_weight",
            format!("{} is not in 1..=10000", sl.cpu_weight),
        ));
    }
    Ok(())
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) if r.start <= text.len() => {
            let line = text[..r.start].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(frags: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        merge(frags.iter().map(|(p, t)| (Path::new(*p), *t)))
    }

    #[test]
    fn defaults_hold_with_no_files() {
        assert_eq!(m(&[]).unwrap(), Settings::default());
    }

    #[test]
    fn later_fragments_win() {
        let s = m(&[
            (
                "/usr/lib/x/config.d/10.toml",
                "[projects]\nimage = \"a/b:1\"\nstop_timeout = 3\n",
            ),
            (
                "/etc/x/config.d/10.toml",
                "[projects]\nimage = \"c/d:2\"\n[storage]\nimage_size = \"1G\"\n",
            ),
        ])
        .unwrap();
        assert_eq!(s.projects.image, "c/d:2");
        assert_eq!(s.projects.stop_timeout_secs, 3);
        assert_eq!(s.storage.image_size, 1 << 30);
    }

    #[test]
    fn a_typo_names_file_and_key() {
        let e = m(&[("/etc/x/config.toml", "[projects]\nimgae = \"x\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/x/config.toml: "), "{e}");
        assert!(e.contains("imgae"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_name_file_and_key() {
        let e = m(&[("/etc/x/a.toml", "[projects]\nuid_base = 0\n")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/x/a.toml: projects.uid_base: must not be 0: container root must not be host root"
        );
        let e = m(&[("/etc/x/a.toml", "[storage]\nimage_size = \"12Q\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("suffix"), "{e}");
    }

    #[test]
    fn limits_and_slice_merge_and_validate() {
        let s = m(&[
            (
                "/usr/lib/x/config.d/50.toml",
                "[limits]\nmemory = \"512M\"\npids = 300\ncpu = 2\n[limits.max]\ncpu = 4.5\n",
            ),
            (
                "/etc/x/config.d/50.toml",
                "[limits]\npids = 400\nswap = true\n[slice]\nmemory_max = \"8G\"\ntasks_max = \"50%\"\ncpu_weight = 20\n",
            ),
        ])
        .unwrap();
        let d = &s.limits.default;
        assert_eq!(
            (d.memory, d.pids, d.cpu, d.swap),
            (512 << 20, 400, 2.0, true)
        );
        assert_eq!(s.limits.max.cpu, 4.5);
        assert_eq!(s.slice.memory_max, Amount::Absolute(8 << 30));
        assert_eq!(s.slice.tasks_max, Amount::Percent(50));
        assert_eq!(s.slice.cpu_weight, 20);

        let err = |t: &str| {
            m(&[("/etc/x/config.d/60.toml", t)])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("[limits]\ncpu = 0\n"),
            "/etc/x/config.d/60.toml: limits.cpu: 0 is not a number of cores in [0.01, 1024]"
        );
        assert!(
            err("[limits]\nmemory = \"64G\"\n")
                .starts_with("/etc/x/config.d/60.toml: limits.memory: 68719476736 is above"),
            "{}",
            err("[limits]\nmemory = \"64G\"\n")
        );
        assert!(err("[limits.max]\npids = 0\n").contains(": limits.max.pids: "));
        assert!(err("[limits]\nio_weight = 0\n").contains(": limits.io_weight: "));
        assert!(err("[slice]\nmemory_max = \"150%\"\n").contains(": slice.memory_max: "));
        assert!(err("[slice]\ncpu_weight = 0\n").contains(": slice.cpu_weight: "));
        assert!(err("[slice]\ntasks_max = \"x%\"\n").contains("percentage"));
        let e = err("[limits]\nmemroy = \"1G\"\n");
        assert!(
            e.starts_with("/etc/x/config.d/60.toml: ")
                && e.contains("memroy")
                && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn only_harmless_capabilities_may_be_kept() {
        let s = m(&[(
            "/etc/x/a.toml",
            "[projects]\ncapabilities = [\"NET_RAW\", \"CHOWN\"]\n",
        )])
        .unwrap();
        assert_eq!(s.projects.capabilities, ["NET_RAW", "CHOWN"]);
        let e = m(&[(
            "/etc/x/a.toml",
            "[projects]\ncapabilities = [\"SYS_ADMIN\"]\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/etc/x/a.toml: projects.capabilities: \"SYS_ADMIN\" may not"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_config_is_the_defaults() {
        let text = include_str!("../packaging/config.toml");
        assert_eq!(m(&[("config.toml", text)]).unwrap(), Settings::default());
        // uncommented, every documented key parses and still gives the defaults
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| !r.starts_with(' ') && !r.is_empty())
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut s = m(&[("config.toml", &uncommented)]).unwrap();
        // the example values that are not defaults
        s.storage.mount = None;
        s.projects.cmd = None;
        s.projects.images.clear();
        (s.storage.disk_quota, s.storage.scratch, s.storage.tmp) = (None, None, None);
        s.auth.master_public_keys.clear();
        s.auth.admin_token_file = None;
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn storage_and_snapshot_settings_merge_and_validate() {
        let s = m(&[(
            "/etc/x/config.toml",
            "[storage]\ndisk_quota = \"3G\"\ntmp = \"64M\"\n[snapshots]\ndaily = 3\nskip_untouched = \"2w\"\n",
        )])
        .unwrap();
        assert_eq!(s.storage.disk_quota, Some(3 << 30));
        assert_eq!(s.storage.tmp, Some(64 << 20));
        assert_eq!(s.storage.scratch, None);
        assert_eq!(s.snapshots.retention.daily, 3);
        assert_eq!(s.snapshots.retention.frequent, 4);
        assert_eq!(s.snapshots.skip_untouched_secs, 14 * 86_400);
        assert!(s.snapshots.enabled);
        let e = m(&[("/etc/x/a.toml", "[storage]\ndisk_quota = 5\n")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/x/a.toml: storage.disk_quota: must be at least"),
            "{e}"
        );
        let e = m(&[("/etc/x/a.toml", "[snapshots]\nhourly = 5\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("hourly"), "{e}");
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("3"), Ok(3));
        assert!(parse_duration("3y").is_err());
    }

    #[test]
    fn auth_keys_are_checked_at_load() {
        let s = m(&[(
            "/etc/x/a.toml",
            "[auth]\nmaster_public_keys = [\"Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\"]\nmax_token_lifetime = 600\n",
        )])
        .unwrap();
        assert_eq!(s.auth.master_public_keys.len(), 1);
        assert_eq!(s.auth.max_token_lifetime_secs, 600);
        let e = m(&[("/etc/x/a.toml", "[auth]\nmaster_public_keys = [\"abc\"]\n")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/x/a.toml: auth.master_public_keys: key 1"),
            "{e}"
        );
        let e = m(&[("/etc/x/a.toml", "[auth]\nadmin_token_file = \"t\"\n")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.admin_token_file"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("7"), Ok(7));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn fragment_files_are_ordered_by_root_then_name() {
        let d = std::env::temp_dir().join(format!("cph-cfg-{}", std::process::id()));
        let (a, b) = (d.join("usr"), d.join("etc"));
        for (root, names) in [
            (&a, &["20.toml", "10.toml", "x.conf"][..]),
            (&b, &["05.toml"][..]),
        ] {
            std::fs::create_dir_all(root.join("config.d")).unwrap();
            for n in names {
                std::fs::write(root.join("config.d").join(n), "").unwrap();
            }
        }
        std::fs::write(b.join("config.toml"), "").unwrap();
        let got: Vec<String> = fragment_files(&[a.clone(), b.clone()])
            .iter()
            .map(|p| p.strip_prefix(&d).unwrap().display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "usr/config.d/10.toml",
                "usr/config.d/20.toml",
                "etc/config.toml",
                "etc/config.d/05.toml"
            ]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
