//! Ranges and cross-checks of the merged settings. Each check answers with the dotted key at
//! fault; the loader adds the file that set it last.
use super::Settings;
use crate::domain::limits::{Amount, Networks};
use std::time::Duration;

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

/// Checks merged settings: `Err((dotted key, what is wrong))`.
pub(super) fn validate(s: &Settings) -> Result<(), (&'static str, String)> {
    if !s.state_dir.is_absolute() {
        return Err(("state_dir", "must be an absolute path".into()));
    }
    if let Some(m) = &s.storage.mount
        && !m.is_absolute()
    {
        return Err(("storage.mount", "must be an absolute path".into()));
    }
    if s.storage.image_size < 256 << 20 {
        return Err((
            "storage.image_size",
            "must be at least 256M (btrfs needs room)".into(),
        ));
    }
    for (key, v, min) in [
        (
            "storage.disk_quota",
            s.storage.disk_quota,
            crate::domain::project::MIN_DISK,
        ),
        (
            "storage.scratch",
            s.storage.scratch,
            crate::domain::project::MIN_DISK,
        ),
        (
            "storage.tmp",
            s.storage.tmp,
            crate::domain::project::MIN_TMP,
        ),
    ] {
        if let Some(v) = v
            && v < min
        {
            return Err((key, format!("must be at least {min} bytes")));
        }
    }
    if let Amount::Percent(p) = s.storage.reserve
        && p > 50
    {
        return Err(("storage.reserve", format!("{p}% is more than 50%")));
    }
    if !(1..=4096).contains(&s.http.max_connections_per_peer) {
        return Err(("http.max_connections_per_peer", "must be 1 to 4096".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(365 * 86_400)).contains(&s.moves.staging_ttl)
    {
        return Err(("moves.staging_ttl", "must be 1s to 365d".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&s.moves.stall_timeout) {
        return Err(("moves.stall_timeout", "must be 1s to 1h".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&s.moves.receive_idle) {
        return Err(("moves.receive_idle", "must be 1s to 1h".into()));
    }
    validate_tls(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&s.ssh.keepalive) {
        return Err(("ssh.keepalive", "must be 1s to 1h".into()));
    }
    let r = &s.snapshots.retention;
    if [r.frequent, r.daily, r.weekly, r.monthly]
        .iter()
        .any(|n| *n > 1000)
    {
        return Err((
            "snapshots.counts",
            "frequent, daily, weekly and monthly must each be at most 1000".into(),
        ));
    }
    let image_ok = crate::domain::project::RunConfig {
        image: Some(s.projects.image.clone()),
        ..Default::default()
    };
    if let Err(e) = image_ok.validate() {
        return Err(("projects.image", e.reason));
    }
    if let Err(e) = crate::domain::images::Allowlist::new(&s.projects.image, &[]) {
        return Err(("projects.image", e));
    }
    if let Err(e) = crate::domain::images::Allowlist::new(&s.projects.image, &s.projects.images) {
        return Err(("projects.images", e));
    }
    if s.projects.log_rate_limit_interval.as_secs() > 3600 {
        return Err((
            "projects.log_rate_limit_interval",
            "must be at most 3600 seconds".into(),
        ));
    }
    if let Some(cmd) = &s.projects.cmd
        && cmd.is_empty()
    {
        return Err((
            "projects.cmd",
            "must not be empty (leave it unset for the image's CMD)".into(),
        ));
    }
    let idle = &s.projects.idle;
    for (key, d) in [
        ("projects.idle_freeze", idle.freeze_after),
        ("projects.idle_stop", idle.stop_after),
    ] {
        if d.is_some_and(|d| d > crate::domain::idle::MAX_IDLE) {
            return Err((key, "must be at most 365d (0: never)".into()));
        }
    }
    if !(idle.cpu_busy.is_finite() && idle.cpu_busy > 0.0 && idle.cpu_busy <= 1024.0) {
        return Err((
            "projects.idle_cpu",
            format!("{} is not a number of cores in (0, 1024]", idle.cpu_busy),
        ));
    }
    if s.projects.stop_timeout.as_secs() > 3600 {
        return Err((
            "projects.stop_timeout",
            "must be at most 3600 seconds".into(),
        ));
    }
    if s.projects.uid_base == 0 {
        return Err((
            "projects.uid_base",
            "must not be 0: container root must not be host root".into(),
        ));
    }
    if s.projects.uid_count < 65_536 {
        return Err(("projects.uid_count", "must be at least 65536".into()));
    }
    if s.projects
        .uid_base
        .checked_add(s.projects.uid_count)
        .is_none()
    {
        return Err((
            "projects.uid_count",
            "uid_base + uid_count overflows".into(),
        ));
    }
    if s.projects.user_uid == 0 || s.projects.user_uid >= s.projects.uid_count {
        return Err((
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
        return Err((
            "projects.capabilities",
            format!(
                "{c:?} may not be granted (allowed: {})",
                ALLOWED_CAPABILITIES.join(", ")
            ),
        ));
    }
    validate_limits(s)?;
    s.proxy.validate()?;
    s.master.validate()?;
    s.auth.validate()
}

/// `[http]` TLS (both files or neither, absolute) and `[moves]`' trust for targets (a CA file
/// or a pin, not both).
fn validate_tls(s: &Settings) -> Result<(), (&'static str, String)> {
    match (&s.http.tls_cert, &s.http.tls_key) {
        (Some(c), Some(k)) => {
            for (key, p) in [("http.tls_cert", c), ("http.tls_key", k)] {
                if !p.is_absolute() {
                    return Err((key, "must be an absolute path".into()));
                }
            }
        }
        (None, None) => {}
        // the error names the key that is set (and so the file that set it)
        (Some(_), None) => {
            return Err((
                "http.tls_cert",
                "needs http.tls_key too (both or neither)".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "http.tls_key",
                "needs http.tls_cert too (both or neither)".into(),
            ));
        }
    }
    if let Some(p) = &s.moves.ca_file
        && !p.is_absolute()
    {
        return Err(("moves.ca_file", "must be an absolute path".into()));
    }
    if let Some(p) = &s.moves.pin_sha256 {
        super::parse_pin(p).map_err(|e| ("moves.pin_sha256", e))?;
        if s.moves.ca_file.is_some() {
            return Err((
                "moves.pin_sha256",
                "set either moves.ca_file or moves.pin_sha256, not both".into(),
            ));
        }
    }
    Ok(())
}

/// Limit settings: each in the range a run config may ask for, defaults at most the maxima.
fn validate_limits(s: &Settings) -> Result<(), (&'static str, String)> {
    use crate::domain::project::RunConfig;
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
            (false, "swap") => "limits.swap",
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
    crate::domain::limits::check(d, max).map_err(|e| {
        (
            key(false, e.field),
            format!("{} (limits.max.{})", e.reason, e.field),
        )
    })?;
    // the host's own defaults stay within its maxima
    let st = &s.storage;
    for (k, v, m, mk) in [
        ("storage.disk_quota", st.disk_quota, max.disk, "disk"),
        ("storage.scratch", st.scratch, max.scratch, "scratch"),
        ("storage.tmp", st.tmp, max.tmp, "tmp"),
    ] {
        if let Some(v) = v
            && v > m
        {
            return Err((k, format!("{v} is above limits.max.{mk} ({m})")));
        }
    }
    if max.network == Networks::NONE {
        return Err(("limits.max.network", "must allow at least one mode".into()));
    }
    if !max.network.contains(s.projects.network) {
        return Err((
            "limits.max.network",
            format!(
                "does not allow projects.network = {:?}",
                s.projects.network.as_str()
            ),
        ));
    }
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
