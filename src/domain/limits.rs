//! Resource limits of a project: one resolved [`Limits`] per project (its run config over the
//! host's defaults, checked against the host's maxima) and the pure mappings from it to the
//! properties of the project's unit and to podman flags. Every limit has exactly one source (the
//! run config, else the host default); both mappings read the same [`Limits`].
//!
//! # Where the limits bind (cgroup placement)
//! The unit runs `podman run --cgroups=split` with `Delegate=yes`: conmon stays in
//! `<unit>/runtime` and the container in `<unit>/libpod-payload-<ctr>`, both *inside* the unit's
//! own cgroup. (With `--cgroups=no-conmon` only conmon was in the unit; the container went to
//! podman's `machine.slice/libpod-*.scope`, where no unit property reaches.) memory, pids and
//! CPU bandwidth limits are hierarchical in cgroup v1 and v2 alike, so the unit's `MemoryMax`,
//! `TasksMax`, `CPUQuotaPerSecUSec`, `CPUWeight`, `IOWeight` bound the whole project (container
//! and conmon), and `SetUnitProperties` changes them live. podman gets flags only for what systemd
//! cannot do there:
//! - swap: systemd's `MemorySwapMax` works on cgroup v2 only; on v1 swap is bounded by the
//!   container's own `memory.memsw.limit_in_bytes` (`--memory-swap`, which needs `--memory`).
//!   Both are mirrored and moved live with `podman update`.
//! - pids: podman would put its own default (2048, containers.conf) on the container's cgroup and
//!   silently cap a larger `TasksMax`; the container gets the host's maximum instead, a second
//!   fence that a project's own (live-changeable) `TasksMax` always stays under. podman 4.3's
//!   `update` cannot change it, which is why it is the ceiling, not the project's value.
use serde::{Deserialize, Serialize};

use super::project::{InvalidConfig, NetworkMode, RunConfig};

/// The limits in force for one project.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Memory (RAM) in bytes: `MemoryMax`.
    pub memory: u64,
    /// Whether the project may swap (else `MemorySwapMax=0`).
    pub swap: bool,
    /// CPU bandwidth in cores (0.5 = half a core): `CPUQuotaPerSecUSec`.
    pub cpu: f64,
    /// Most tasks (processes + threads): `TasksMax`.
    pub pids: u64,
    /// Relative CPU weight, 1..=10000 (100 = normal): `CPUWeight`.
    pub cpu_weight: u64,
    /// Relative IO weight, 1..=10000 (100 = normal): `IOWeight`.
    pub io_weight: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 1 << 30,
            swap: false,
            cpu: 1.0,
            pids: 1024,
            cpu_weight: 100,
            io_weight: 100,
        }
    }
}

/// The most a project may be given on this host: what a start config, a limits change or a
/// quota change may ask for (the caller is not trusted to be modest, whatever its token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Maxima {
    /// bytes
    pub memory: u64,
    /// cores
    pub cpu: f64,
    /// tasks
    pub pids: u64,
    /// disk quota of the home, bytes
    pub disk: u64,
    /// size of /scratch, bytes
    pub scratch: u64,
    /// size of /tmp, bytes
    pub tmp: u64,
    /// whether a project may be allowed to swap at all
    pub swap: bool,
    /// the network modes a project may ask for
    pub network: Networks,
}

impl Default for Maxima {
    fn default() -> Self {
        Maxima {
            memory: 16 << 30,
            cpu: 8.0,
            pids: 16_384,
            disk: 100 << 30,
            scratch: 100 << 30,
            tmp: 8 << 30,
            swap: false,
            network: Networks::ALL,
        }
    }
}

/// A set of [`NetworkMode`]s (the allowlist `limits.max.network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Networks(u8);

impl Networks {
    /// No mode at all.
    pub const NONE: Networks = Networks(0);
    /// Every mode.
    pub const ALL: Networks = Networks(0b11);

    fn bit(m: NetworkMode) -> u8 {
        match m {
            NetworkMode::None => 1,
            NetworkMode::Slirp4netns => 2,
        }
    }
    /// This set with `m` added.
    pub fn with(self, m: NetworkMode) -> Networks {
        Networks(self.0 | Self::bit(m))
    }
    /// Whether `m` is in the set.
    pub fn contains(self, m: NetworkMode) -> bool {
        self.0 & Self::bit(m) != 0
    }
    /// The modes in the set, in wire spelling.
    pub fn names(self) -> Vec<&'static str> {
        [NetworkMode::None, NetworkMode::Slirp4netns]
            .into_iter()
            .filter(|m| self.contains(*m))
            .map(NetworkMode::as_str)
            .collect()
    }
}

/// Per-project limit settings of the host.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitSettings {
    /// Used for whatever a run config leaves unset.
    pub default: Limits,
    /// Upper bounds for run configs and live updates.
    pub max: Maxima,
}

/// An absolute amount or a percentage of what the machine has (systemd's `…Scale` properties).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// bytes or tasks
    Absolute(u64),
    /// percent of physical memory / of the kernel's task limit, 1..=100
    Percent(u32),
}

/// Host-wide limits on `cocalc-projects.slice`: all projects together never take the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceSettings {
    /// `MemoryMax` of the slice.
    pub memory_max: Amount,
    /// `TasksMax` of the slice.
    pub tasks_max: Amount,
    /// `CPUWeight` of the slice and of its parent `cocalc.slice` (system.slice has 100).
    pub cpu_weight: u64,
}

impl Default for SliceSettings {
    fn default() -> Self {
        SliceSettings {
            memory_max: Amount::Percent(90),
            tasks_max: Amount::Percent(80),
            cpu_weight: 50,
        }
    }
}

/// A typed value of a unit property (systemd's D-Bus signature `t` or `u`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prop {
    /// `t`
    U64(u64),
    /// `u`
    U32(u32),
}

/// The run config's limit fields over `defaults` (no checks: see [`check`]).
pub fn resolve(cfg: &RunConfig, defaults: &Limits) -> Limits {
    Limits {
        memory: cfg.memory.unwrap_or(defaults.memory),
        swap: cfg.swap.unwrap_or(defaults.swap),
        cpu: cfg.cpu.unwrap_or(defaults.cpu),
        pids: cfg.pids.unwrap_or(defaults.pids),
        cpu_weight: cfg.cpu_weight.unwrap_or(defaults.cpu_weight),
        io_weight: cfg.io_weight.unwrap_or(defaults.io_weight),
    }
}

/// Refuses limits above the host's maxima, naming the field.
pub fn check(l: &Limits, max: &Maxima) -> Result<(), InvalidConfig> {
    let over = |field, v: String, m: String| {
        Err(InvalidConfig {
            field,
            reason: format!("{v} is above this host's maximum of {m}"),
        })
    };
    if l.memory > max.memory {
        return over("memory", l.memory.to_string(), max.memory.to_string());
    }
    if l.cpu > max.cpu {
        return over("cpu", l.cpu.to_string(), max.cpu.to_string());
    }
    if l.pids > max.pids {
        return over("pids", l.pids.to_string(), max.pids.to_string());
    }
    if l.swap && !max.swap {
        return Err(InvalidConfig {
            field: "swap",
            reason: "projects may not swap on this host (limits.max.swap)".into(),
        });
    }
    Ok(())
}

/// Refuses a run config's storage sizes above the host's maxima and a network mode outside its
/// allowlist (`network` is the mode the config resolves to: its own, else the host default).
pub fn check_config(
    cfg: &RunConfig,
    network: NetworkMode,
    max: &Maxima,
) -> Result<(), InvalidConfig> {
    for (field, v, m) in [
        ("disk", cfg.disk, max.disk),
        ("scratch", cfg.scratch, max.scratch),
        ("tmp", cfg.tmp, max.tmp),
    ] {
        if let Some(v) = v
            && v > m
        {
            return Err(InvalidConfig {
                field,
                reason: format!("{v} bytes is above this host's maximum of {m}"),
            });
        }
    }
    if !max.network.contains(network) {
        return Err(InvalidConfig {
            field: "network",
            reason: format!(
                "{} is not allowed on this host (allowed: {})",
                network.as_str(),
                max.network.names().join(", ")
            ),
        });
    }
    Ok(())
}

/// `CPUQuotaPerSecUSec` for `cores`: µs of CPU time per second of wall time.
pub fn cpu_quota_usec(cores: f64) -> u64 {
    (cores * 1_000_000.0).round() as u64
}

/// The project unit's limit properties (all `t`), set at start and by live updates.
pub fn unit_values(l: &Limits) -> Vec<(&'static str, u64)> {
    vec![
        ("MemoryMax", l.memory),
        // u64::MAX is systemd's "infinity"; effective on cgroup v2 (v1: see podman_flags)
        ("MemorySwapMax", if l.swap { u64::MAX } else { 0 }),
        ("CPUQuotaPerSecUSec", cpu_quota_usec(l.cpu)),
        ("TasksMax", l.pids),
        ("CPUWeight", l.cpu_weight),
        ("IOWeight", l.io_weight),
    ]
}

/// `--memory-swap` for "no swap limit": the kernel's own unlimited value (i64::MAX rounded down to
/// a page, `PAGE_COUNTER_MAX` pages in bytes). Not `-1`: podman 4.3's `update --memory-swap=-1`
/// leaves the old limit in place (on v1 swap stayed off and a later raise of memory above it
/// failed with 500 update_failed; on v2 `memory.swap.max` stayed 0). This number works for `run`
/// and `update`, on v1 (the memsw "unlimited") and on v2 (swap.max = it − memory).
pub const SWAP_UNLIMITED: u64 = i64::MAX as u64 & !4095;

/// The flags `podman update` can move live: memory and swap of the container's own cgroup.
pub fn podman_update_flags(l: &Limits) -> Vec<String> {
    vec![
        format!("--memory={}", l.memory),
        if l.swap {
            format!("--memory-swap={SWAP_UNLIMITED}")
        } else {
            // memory+swap = memory: no swap (cgroup v1's memsw, where MemorySwapMax does nothing)
            format!("--memory-swap={}", l.memory)
        },
    ]
}

/// `podman run` limit flags: what systemd cannot do from the unit (module doc).
pub fn podman_flags(l: &Limits, max: &Maxima) -> Vec<String> {
    let mut f = podman_update_flags(l);
    f.push(format!("--pids-limit={}", max.pids));
    f
}

fn scale(percent: u32) -> u32 {
    // systemd's …Scale properties: a fraction of u32::MAX
    ((u64::from(percent.min(100)) * u64::from(u32::MAX)) / 100) as u32
}

/// Properties of `cocalc-projects.slice` for the host-wide limits.
pub fn slice_values(s: &SliceSettings) -> Vec<(&'static str, Prop)> {
    let amount = |abs: &'static str, scaled: &'static str, a: Amount| match a {
        Amount::Absolute(n) => (abs, Prop::U64(n)),
        Amount::Percent(p) => (scaled, Prop::U32(scale(p))),
    };
    vec![
        amount("MemoryMax", "MemoryMaxScale", s.memory_max),
        amount("TasksMax", "TasksMaxScale", s.tasks_max),
        ("CPUWeight", Prop::U64(s.cpu_weight)),
    ]
}

/// A change of a project's limits (`PATCH /projects/:id/config`): absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    /// bytes
    #[serde(default)]
    pub memory: Option<u64>,
    /// may the project swap
    #[serde(default)]
    pub swap: Option<bool>,
    /// cores
    #[serde(default)]
    pub cpu: Option<f64>,
    /// tasks
    #[serde(default)]
    pub pids: Option<u64>,
    /// 1..=10000
    #[serde(default)]
    pub cpu_weight: Option<u64>,
    /// 1..=10000
    #[serde(default)]
    pub io_weight: Option<u64>,
}

impl LimitsPatch {
    /// Writes the given fields into `cfg`.
    pub fn apply(&self, cfg: &mut RunConfig) {
        let LimitsPatch {
            memory,
            swap,
            cpu,
            pids,
            cpu_weight,
            io_weight,
        } = *self;
        cfg.memory = memory.or(cfg.memory);
        cfg.swap = swap.or(cfg.swap);
        cfg.cpu = cpu.or(cfg.cpu);
        cfg.pids = pids.or(cfg.pids);
        cfg.cpu_weight = cpu_weight.or(cfg.cpu_weight);
        cfg.io_weight = io_weight.or(cfg.io_weight);
    }
}

/// The answer to a limits change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitsUpdate {
    /// The project's state.
    pub state: super::project::ProjectState,
    /// This host's id.
    pub server: String,
    /// Whether the change was applied to the running project (else: at its next start).
    pub live: bool,
    /// The limits now in force (or at the next start).
    pub limits: Limits,
}

/// A project's stored config and the limits it resolves to (`GET /projects/:id/config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigView {
    /// The config the next start uses (the last start's, with limit changes since).
    pub config: RunConfig,
    /// Its limits over the host's defaults.
    pub limits: Limits,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<T: Copy>(v: &[(&str, T)], k: &str) -> T {
        v.iter().find(|(n, _)| *n == k).unwrap().1
    }

    #[test]
    fn run_config_over_defaults() {
        let d = Limits::default();
        assert_eq!(resolve(&RunConfig::default(), &d), d);
        let cfg = RunConfig {
            memory: Some(64 << 20),
            cpu: Some(0.5),
            pids: Some(50),
            swap: Some(true),
            cpu_weight: Some(200),
            io_weight: Some(10),
            ..Default::default()
        };
        assert_eq!(
            resolve(&cfg, &d),
            Limits {
                memory: 64 << 20,
                swap: true,
                cpu: 0.5,
                pids: 50,
                cpu_weight: 200,
                io_weight: 10
            }
        );
    }

    #[test]
    fn maxima_are_enforced_with_the_field_named() {
        let max = Maxima::default();
        assert_eq!(check(&Limits::default(), &max), Ok(()));
        let at = Limits {
            memory: max.memory,
            cpu: max.cpu,
            pids: max.pids,
            ..Default::default()
        };
        assert_eq!(check(&at, &max), Ok(()));
        for (l, field) in [
            (
                Limits {
                    memory: max.memory + 1,
                    ..at
                },
                "memory",
            ),
            (
                Limits {
                    cpu: max.cpu + 0.01,
                    ..at
                },
                "cpu",
            ),
            (
                Limits {
                    pids: max.pids + 1,
                    ..at
                },
                "pids",
            ),
        ] {
            let e = check(&l, &max).unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.reason.contains("maximum"), "{e}");
        }
    }

    #[test]
    fn storage_maxima_and_network_allowlist_name_the_field() {
        let max = Maxima {
            network: Networks::NONE.with(NetworkMode::None),
            ..Maxima::default()
        };
        let none = NetworkMode::None;
        assert_eq!(check_config(&RunConfig::default(), none, &max), Ok(()));
        let at = RunConfig {
            disk: Some(max.disk),
            scratch: Some(max.scratch),
            tmp: Some(max.tmp),
            ..Default::default()
        };
        assert_eq!(check_config(&at, none, &max), Ok(()));
        for (cfg, field) in [
            (
                RunConfig {
                    disk: Some(max.disk + 1),
                    ..at.clone()
                },
                "disk",
            ),
            (
                RunConfig {
                    scratch: Some(max.scratch + 1),
                    ..at.clone()
                },
                "scratch",
            ),
            (
                RunConfig {
                    tmp: Some(max.tmp + 1),
                    ..at.clone()
                },
                "tmp",
            ),
        ] {
            let e = check_config(&cfg, none, &max).unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.reason.contains("maximum"), "{e}");
        }
        let e = check_config(&at, NetworkMode::Slirp4netns, &max).unwrap_err();
        assert_eq!(e.field, "network");
        assert!(e.reason.contains("allowed: none"), "{e}");
        assert!(check_config(&at, NetworkMode::Slirp4netns, &Maxima::default()).is_ok());
        // swap is refused unless the host allows it
        let swapping = Limits {
            swap: true,
            ..Limits::default()
        };
        assert_eq!(
            check(&swapping, &Maxima::default()).unwrap_err().field,
            "swap"
        );
        let allow = Maxima {
            swap: true,
            ..Maxima::default()
        };
        assert_eq!(check(&swapping, &allow), Ok(()));
    }

    #[test]
    fn limits_map_to_unit_properties() {
        let l = Limits {
            memory: 64 << 20,
            swap: false,
            cpu: 0.5,
            pids: 50,
            cpu_weight: 20,
            io_weight: 300,
        };
        let v = unit_values(&l);
        assert_eq!(get(&v, "MemoryMax"), 67_108_864);
        assert_eq!(get(&v, "MemorySwapMax"), 0);
        assert_eq!(get(&v, "CPUQuotaPerSecUSec"), 500_000);
        assert_eq!(get(&v, "TasksMax"), 50);
        assert_eq!(get(&v, "CPUWeight"), 20);
        assert_eq!(get(&v, "IOWeight"), 300);
        let swapping = unit_values(&Limits { swap: true, ..l });
        assert_eq!(get(&swapping, "MemorySwapMax"), u64::MAX);
        assert_eq!(cpu_quota_usec(1.0 / 3.0), 333_333);
        assert_eq!(cpu_quota_usec(16.0), 16_000_000);
    }

    #[test]
    fn limits_map_to_podman_flags() {
        let max = Maxima::default();
        let l = Limits {
            memory: 64 << 20,
            pids: 50,
            ..Default::default()
        };
        assert_eq!(
            podman_flags(&l, &max),
            [
                "--memory=67108864",
                "--memory-swap=67108864",
                "--pids-limit=16384"
            ]
        );
        assert_eq!(
            podman_update_flags(&Limits { swap: true, ..l }),
            ["--memory=67108864", "--memory-swap=9223372036854771712"]
        );
        // CPU is the unit's alone (hierarchical CFS bandwidth)
        assert!(!podman_flags(&l, &max).iter().any(|f| f.contains("cpu")));
    }

    #[test]
    fn slice_values_use_scale_for_percentages() {
        let v = slice_values(&SliceSettings::default());
        assert_eq!(get(&v, "MemoryMaxScale"), Prop::U32(3_865_470_565));
        assert_eq!(get(&v, "TasksMaxScale"), Prop::U32(3_435_973_836));
        assert_eq!(get(&v, "CPUWeight"), Prop::U64(50));
        let v = slice_values(&SliceSettings {
            memory_max: Amount::Absolute(8 << 30),
            tasks_max: Amount::Absolute(10_000),
            cpu_weight: 10,
        });
        assert_eq!(get(&v, "MemoryMax"), Prop::U64(8 << 30));
        assert_eq!(get(&v, "TasksMax"), Prop::U64(10_000));
        assert_eq!(scale(100), u32::MAX);
    }

    #[test]
    fn patches_change_only_their_fields() {
        let mut cfg = RunConfig {
            image: Some("a/b:1".into()),
            memory: Some(1 << 30),
            cpu: Some(2.0),
            ..Default::default()
        };
        let p: LimitsPatch = serde_json::from_str(r#"{"memory":268435456,"pids":99}"#).unwrap();
        p.apply(&mut cfg);
        assert_eq!(cfg.memory, Some(256 << 20));
        assert_eq!(cfg.pids, Some(99));
        assert_eq!(cfg.cpu, Some(2.0));
        assert_eq!(cfg.image.as_deref(), Some("a/b:1"));
        assert!(serde_json::from_str::<LimitsPatch>(r#"{"image":"x"}"#).is_err());
        assert!(serde_json::from_str::<LimitsPatch>(r#"{"memory":-1}"#).is_err());
    }
}
