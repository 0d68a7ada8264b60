//! Project identity, states, run configuration and status: the vocabulary shared by every layer.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A project id: a UUID in canonical lowercase hyphenated form. Constructible only by parsing, so
/// anything holding one is safe to put in a path, an argv or a unit name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId(uuid::Uuid);

/// Why a string is not a project id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid project id {0:?}: expected a lowercase UUID like 6f1c2d3e-0000-4000-8000-000000000001"
)]
pub struct InvalidProjectId(pub String);

impl FromStr for ProjectId {
    type Err = InvalidProjectId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the canonical spelling: one id has exactly one unit name, path and object path.
        let bad = || InvalidProjectId(s.chars().take(64).collect());
        if s.len() != 36 {
            return Err(bad());
        }
        let u = uuid::Uuid::try_parse(s).map_err(|_| bad())?;
        if u.hyphenated().to_string() != s {
            return Err(bad());
        }
        Ok(ProjectId(u))
    }
}

impl ProjectId {
    /// The canonical string form.
    pub fn as_string(&self) -> String {
        self.0.hyphenated().to_string()
    }
    /// The transient unit that runs this project.
    pub fn unit_name(&self) -> String {
        format!("cocalc-project-{self}.service")
    }
    /// The btrfs subvolume (and podman container) name of this project.
    pub fn subvolume_name(&self) -> String {
        format!("project-{self}")
    }
    /// The podman container name.
    pub fn container_name(&self) -> String {
        format!("project-{self}")
    }
    /// Parses the id back out of a unit name made by [`ProjectId::unit_name`].
    pub fn from_unit_name(unit: &str) -> Option<ProjectId> {
        unit.strip_prefix("cocalc-project-")?
            .strip_suffix(".service")?
            .parse()
            .ok()
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProjectId({self})")
    }
}

impl Serialize for ProjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The seed API's project states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectState {
    /// Not running (its files exist or will on first start).
    Opened,
    /// The unit is activating.
    Starting,
    /// The unit is active: the container runs.
    Running,
    /// The unit is deactivating.
    Stopping,
    /// The unit is active but its processes are frozen for being idle (memory kept, no CPU):
    /// the next connection into it (proxy, SSH) thaws it. The store and the master see it
    /// `running`.
    Frozen,
}

impl ProjectState {
    /// Maps a unit's state to the project state.
    pub fn from_active_state(active: ActiveState) -> ProjectState {
        match active {
            ActiveState::Active | ActiveState::Reloading => ProjectState::Running,
            ActiveState::Activating => ProjectState::Starting,
            ActiveState::Deactivating => ProjectState::Stopping,
            // inactive, failed, maintenance, or no unit at all
            ActiveState::Inactive | ActiveState::Failed | ActiveState::Other => {
                ProjectState::Opened
            }
        }
    }
    /// The state the store and the master record: a frozen project is running there.
    pub fn stored(self) -> ProjectState {
        match self {
            ProjectState::Frozen => ProjectState::Running,
            s => s,
        }
    }
    /// Whether the unit is up and its container runs (frozen or not).
    pub fn is_up(self) -> bool {
        matches!(self, ProjectState::Running | ProjectState::Frozen)
    }
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectState::Opened => "opened",
            ProjectState::Starting => "starting",
            ProjectState::Running => "running",
            ProjectState::Stopping => "stopping",
            ProjectState::Frozen => "frozen",
        }
    }
}

impl fmt::Display for ProjectState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Network mode of a project's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    #[default]
    None,
    /// User-mode networking (outbound access, no host ports).
    Slirp4netns,
}

impl NetworkMode {
    /// The value of podman's `--network`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Slirp4netns => "slirp4netns",
        }
    }
}

/// The `config` of a start request. Every field optional; unknown fields are rejected so a typo
/// never silently does nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Container image (default from the host config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Extra environment for the project's processes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Command to run instead of the image's CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Network mode (default from the host config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// CPU limit in cores (fractional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Whether the project may swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<bool>,
    /// Maximum number of tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Disk quota in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// Scratch space in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<u64>,
    /// Size of each of /tmp, /var/tmp and /dev/shm in bytes (tmpfs, counted in the memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp: Option<u64>,
    /// Relative CPU weight, 1..=10000 (100 = normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Relative IO weight, 1..=10000 (100 = normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u64>,
    /// Freeze the project after this many seconds without activity (0: never; absent: the
    /// host's `projects.idle_freeze`). A string like `"30s"` or `"15m"` is accepted too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::units::opt_duration_secs"
    )]
    pub idle_freeze: Option<u64>,
    /// Stop the project after this many seconds without activity (0: never; absent: the
    /// host's `projects.idle_stop`). A string like `"2h"` is accepted too.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::units::opt_duration_secs"
    )]
    pub idle_stop: Option<u64>,
}

/// Smallest disk quota or scratch size (bytes): btrfs needs room for metadata.
pub const MIN_DISK: u64 = 16 << 20;
/// Smallest /tmp (bytes).
pub const MIN_TMP: u64 = 1 << 20;

/// Smallest memory limit accepted: less cannot even start podman's conmon and the container.
pub const MIN_MEMORY: u64 = 32 << 20;
/// Smallest task limit accepted: podman's own threads run in the project's unit during start.
pub const MIN_PIDS: u64 = 16;
/// Largest byte size accepted anywhere (what a signed 64-bit integer holds: the OpenAPI int64).
pub const MAX_BYTES: u64 = i64::MAX as u64;

/// Why a run config is refused. Names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid config.{field}: {reason}")]
pub struct InvalidConfig {
    /// The offending field, e.g. `env` or `cpu`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl RunConfig {
    /// Checks the values that serde's types do not: they reach an argv and unit properties.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |field, reason: String| Err(InvalidConfig { field, reason });
        if let Some(image) = &self.image
            && (image.is_empty()
                || image.len() > 255
                || image.starts_with('-')
                || !image
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"./:_-@".contains(&b)))
        {
            return bad("image", format!("{image:?} is not an image reference"));
        }
        for (k, v) in &self.env {
            let valid_key = !k.is_empty()
                && k.len() <= 128
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_key {
                return bad("env", format!("{k:?} is not a valid variable name"));
            }
            if v.contains('\0') || v.len() > 32 * 1024 {
                return bad("env", format!("value of {k} contains NUL or is too long"));
            }
            if matches!(k.as_str(), "HOME" | "COCALC_PROJECT_ID") {
                return bad("env", format!("{k} is set by the host"));
            }
        }
        if let Some(cmd) = &self.cmd {
            if cmd.is_empty() || cmd.len() > 256 {
                return bad("cmd", "must hold 1 to 256 arguments".into());
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return bad("cmd", "arguments must not contain NUL".into());
            }
        }
        // below 0.01 the kernel's minimum CFS quota (1 ms per 100 ms period) refuses it
        if let Some(cpu) = self.cpu
            // podman's CFS quota (cpu x 100 ms period) must be at least 1 ms
            && !(cpu.is_finite() && (0.01..=1024.0).contains(&cpu))
        {
            return bad(
                "cpu",
                format!("{cpu} is not a number of cores in [0.01, 1024]"),
            );
        }
        if let Some(m) = self.memory
            && m < MIN_MEMORY
        {
            return bad(
                "memory",
                format!("{m} bytes is below the minimum of {MIN_MEMORY} (32 MiB)"),
            );
        }
        if let Some(p) = self.pids
            && !(MIN_PIDS..=4_194_304).contains(&p)
        {
            return bad("pids", format!("{p} is not in {MIN_PIDS}..=4194304"));
        }
        for (field, w) in [
            ("cpu_weight", self.cpu_weight),
            ("io_weight", self.io_weight),
        ] {
            if let Some(w) = w
                && !(1..=10_000).contains(&w)
            {
                return bad(field, format!("{w} is not in 1..=10000"));
            }
        }
        for (field, v, min) in [
            ("disk", self.disk, MIN_DISK),
            ("scratch", self.scratch, MIN_DISK),
            ("tmp", self.tmp, MIN_TMP),
        ] {
            if let Some(v) = v
                && v < min
            {
                return bad(field, format!("{v} bytes is below the minimum of {min}"));
            }
        }
        for (field, v) in [
            ("idle_freeze", self.idle_freeze),
            ("idle_stop", self.idle_stop),
        ] {
            let max = super::idle::MAX_IDLE.as_secs();
            if let Some(v) = v
                && v > max
            {
                return bad(
                    field,
                    format!("{v} seconds is above the maximum of {max} (365d)"),
                );
            }
        }
        for (field, v) in [
            ("memory", self.memory),
            ("disk", self.disk),
            ("scratch", self.scratch),
            ("tmp", self.tmp),
        ] {
            if let Some(v) = v
                && v > MAX_BYTES
            {
                return bad(
                    field,
                    format!("{v} bytes is above the maximum of {MAX_BYTES}"),
                );
            }
        }
        Ok(())
    }
}

/// The activity of a project's unit (systemd's `ActiveState`, typed; the systemd backend parses it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActiveState {
    /// Up.
    Active,
    /// Up, reloading.
    Reloading,
    /// Not up (also: not loaded).
    #[default]
    Inactive,
    /// Not up, ended in failure.
    Failed,
    /// Starting.
    Activating,
    /// Stopping.
    Deactivating,
    /// Any other state (maintenance, refreshing…): not up as far as a project goes.
    Other,
}

/// What the host knows of a project's unit, kept current from the unit backend's events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitInfo {
    /// Whether the unit is up, starting, stopping….
    pub active_state: ActiveState,
    /// `SubState` of the unit.
    pub sub_state: String,
    /// `MainPID` of the service (0 when none).
    pub main_pid: u32,
    /// `ActiveEnterTimestamp` in µs since the epoch (0 when never active).
    pub active_enter_usec: u64,
}

/// The status of one project as the API reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// `opened | starting | running | stopping`.
    pub state: ProjectState,
    /// This host's id.
    pub server: String,
    /// The project's unit name.
    pub unit: String,
    /// The unit's `SubState` (`running`, `dead`, …), absent when there is no unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_state: Option<String>,
    /// PID of the unit's main process (conmon), when running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main_pid: Option<u32>,
    /// Memory used by the unit's cgroup in bytes, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_current: Option<u64>,
    /// When the unit became active, in ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Disk quota and usage of the home, when the project has one (refreshed every few seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStatus>,
    /// The host's project storage is below its reserve (`storage.reserve`): starts, quota raises
    /// and growing homes are refused. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_full: Option<super::reserve::Shortfall>,
    /// How long each phase of the project's last start took (while it runs, after a start by
    /// this daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase_timings_ms: Option<super::phases::PhaseTimings>,
    /// Why the project counts as active and when it would be frozen or stopped for being idle
    /// (while its unit is up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<super::idle::ActivityStatus>,
}

/// Disk quota and usage of a project's home (its btrfs qgroup), in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct DiskStatus {
    /// The limit in force (`null`: none).
    pub quota: Option<u64>,
    /// Referenced bytes (`null`: quotas are off, so unknown).
    pub used: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2d3e-0000-4000-8000-000000000001";

    #[test]
    fn ids_parse_only_in_canonical_form() {
        let id: ProjectId = ID.parse().unwrap();
        assert_eq!(id.to_string(), ID);
        assert_eq!(id.unit_name(), format!("cocalc-project-{ID}.service"));
        assert_eq!(ProjectId::from_unit_name(&id.unit_name()), Some(id));
        for bad in [
            "",
            "..",
            "%2e%2e",
            "../../etc/passwd",
            "6F1C2D3E-0000-4000-8000-000000000001",
            "6f1c2d3e000040008000000000000001",
            "{6f1c2d3e-0000-4000-8000-000000000001}",
            "urn:uuid:6f1c2d3e-0000-4000-8000-000000000001",
            "6f1c2d3e-0000-4000-8000-00000000000g",
            "6f1c2d3e-0000-4000-8000-0000000000011",
            " 6f1c2d3e-0000-4000-8000-00000000001",
        ] {
            assert!(bad.parse::<ProjectId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(ProjectId::from_unit_name("cocalc-project-x.service"), None);
        assert_eq!(ProjectId::from_unit_name("other.service"), None);
    }

    #[test]
    fn config_rejects_unknown_fields_and_wrong_types() {
        let e = serde_json::from_str::<RunConfig>(r#"{"imgae":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("imgae"), "{e}");
        assert!(serde_json::from_str::<RunConfig>(r#"{"memory":"lots"}"#).is_err());
        assert!(serde_json::from_str::<RunConfig>(r#"{"memory":-1}"#).is_err());
        assert!(serde_json::from_str::<RunConfig>(r#"{"network":"host"}"#).is_err());
        let c: RunConfig =
            serde_json::from_str(r#"{"image":"localhost/x:1","env":{"A_B":"c d"},"cpu":0.5}"#)
                .unwrap();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn config_values_are_validated_with_the_field_named() {
        let check = |json: &str, field: &str| {
            let c: RunConfig = serde_json::from_str(json).unwrap();
            assert_eq!(c.validate().unwrap_err().field, field, "{json}");
        };
        check(r#"{"image":"--privileged"}"#, "image");
        check(r#"{"image":"a b"}"#, "image");
        check(r#"{"env":{"1A":"x"}}"#, "env");
        check(r#"{"env":{"A=B":"x"}}"#, "env");
        check(r#"{"env":{"HOME":"/root"}}"#, "env");
        check(r#"{"cmd":[]}"#, "cmd");
        check(r#"{"cpu":0}"#, "cpu");
        check(r#"{"cpu":-1.5}"#, "cpu");
        check(r#"{"cpu":0.009}"#, "cpu");
        check(r#"{"cpu":5e-324}"#, "cpu");
        check(r#"{"memory":1}"#, "memory");
        check(r#"{"pids":0}"#, "pids");
        check(r#"{"cpu":0.001}"#, "cpu");
        check(r#"{"cpu":1e9}"#, "cpu");
        check(r#"{"cpu_weight":0}"#, "cpu_weight");
        check(r#"{"io_weight":10001}"#, "io_weight");
        check(r#"{"disk":1000}"#, "disk");
        check(r#"{"scratch":1}"#, "scratch");
        check(r#"{"tmp":0}"#, "tmp");
    }
}
