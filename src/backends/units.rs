//! The [`Units`] port over systemd (transient units on the system bus) running podman: unit names,
//! unit properties, the projects' seccomp profile, the retry while an old unit is collected, the
//! journal of a failed attempt, helper jobs as oneshot units.
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use zbus::Variant;

use crate::backends::systemd::{self, Systemd, SystemdError};
use crate::backends::{egress, journal, podman};
use crate::cmd;
use crate::config::Settings;
use crate::domain::limits::{self, Limits, SliceSettings};
use crate::domain::project::{ProjectId, UnitInfo};
use crate::ports::{
    Helper, LogLine, LogQuery, StartError, StartPlan, StartTimings, UnitEvents, Units,
};
use crate::seccomp;

/// The unit property of a project's CPU limit.
const CPU_QUOTA: &str = "CPUQuotaPerSecUSec";
/// podman's default seccomp profile, the base of the projects' profile.
pub const BASE_SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// Project units as systemd transient services running `podman run`.
#[derive(Debug)]
pub struct SystemdUnits {
    systemd: Systemd,
    settings: Settings,
    netns: super::netns::Netns,
    cgroups: super::cgroup::Cgroups,
    /// The projects' seccomp profile last made, with the base profile's size and mtime it was
    /// made from: each start compares, and parses podman's profile again only when it changed.
    seccomp: std::sync::Mutex<Option<(SeccompBase, std::sync::Arc<String>)>>,
}

/// Which base seccomp profile a made profile came from.
type SeccompBase = (u64, Option<SystemTime>);

impl SystemdUnits {
    /// Connects to systemd on the system bus.
    pub async fn connect(settings: Settings) -> Result<SystemdUnits, SystemdError> {
        Ok(SystemdUnits {
            systemd: Systemd::connect().await?,
            settings,
            netns: super::netns::Netns::new(),
            cgroups: super::cgroup::Cgroups::host(),
            seccomp: std::sync::Mutex::new(None),
        })
    }

    /// Writes the projects' seccomp profile (podman's default minus the btrfs subvolume ioctls)
    /// into the state directory when it is missing or out of date; returns its path.
    fn seccomp_profile(&self) -> Result<PathBuf, String> {
        let meta = std::fs::metadata(BASE_SECCOMP_PROFILE)
            .map_err(|e| format!("{BASE_SECCOMP_PROFILE}: {e}"))?;
        let key: SeccompBase = (meta.len(), meta.modified().ok());
        let cached = {
            let c = self.seccomp.lock().unwrap_or_else(|p| p.into_inner());
            c.as_ref()
                .filter(|(k, _)| *k == key)
                .map(|(_, t)| t.clone())
        };
        let text = match cached {
            Some(t) => t,
            None => {
                let base = std::fs::read_to_string(BASE_SECCOMP_PROFILE)
                    .map_err(|e| format!("{BASE_SECCOMP_PROFILE}: {e}"))?;
                let base: serde_json::Value = serde_json::from_str(&base)
                    .map_err(|e| format!("{BASE_SECCOMP_PROFILE}: {e}"))?;
                let profile = seccomp::project_profile(&base).map_err(|e| e.to_string())?;
                let t = std::sync::Arc::new(
                    serde_json::to_string(&profile).map_err(|e| e.to_string())?,
                );
                *self.seccomp.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, t.clone()));
                t
            }
        };
        let text = text.as_str();
        let path = self.settings.state_dir.join("seccomp-projects.json");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            // a name of its own: concurrent starts may write at the same time, and each rename
            // must put a complete file in place
            let tmp = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(path)
    }

    /// StartTransientUnit, retrying while an old unit of the same name is being collected.
    async fn start_unit(
        &self,
        unit: &str,
        props: &[(&str, Variant<'_>)],
    ) -> Result<(Duration, Duration), SystemdError> {
        let timeout = Duration::from_secs(150);
        for _ in 0..50 {
            match self
                .systemd
                .start_transient_timed(unit, props, timeout)
                .await
            {
                Err(SystemdError::Bus(zbus::Error::MethodError(n, _, _)))
                    if n.as_str() == "org.freedesktop.systemd1.UnitExists" =>
                {
                    self.systemd.reset_failed(unit).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
        self.systemd
            .start_transient_timed(unit, props, timeout)
            .await
    }

    /// podman's own `Error:` line of the unit's last start attempt (see `journal`).
    async fn podman_error(&self, unit: &str, since: SystemTime) -> Option<String> {
        let secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let args = journal::journalctl_args(unit, secs);
        let out = cmd::run("/usr/bin/journalctl", &args, Duration::from_secs(10))
            .await
            .ok()?;
        journal::podman_error(&out)
    }

    async fn journal_tail(&self, unit: &str, since: SystemTime) -> String {
        let secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let args = [
            "-u",
            unit,
            "--since",
            &format!("@{secs}"),
            "-n",
            "15",
            "-o",
            "cat",
            "--no-pager",
            "-q",
        ];
        // journald may still be writing the last lines of the failed unit
        tokio::time::sleep(Duration::from_millis(200)).await;
        match cmd::run("/usr/bin/journalctl", args, Duration::from_secs(10)).await {
            // only this attempt: from the last "Starting …" line on
            Ok(out) => {
                let lines: Vec<&str> = out.lines().collect();
                let from = lines
                    .iter()
                    .rposition(|l| l.starts_with("Starting "))
                    .unwrap_or(0);
                lines[from..].join("\n")
            }
            Err(e) => format!("(journal unavailable: {e})"),
        }
    }
}

#[async_trait]
impl Units for SystemdUnits {
    fn unit_name(&self, id: ProjectId) -> String {
        id.unit_name()
    }

    async fn watch(&self) -> Result<UnitEvents, SystemdError> {
        self.systemd.watch().await
    }

    async fn list(&self) -> Result<Vec<(ProjectId, UnitInfo)>, SystemdError> {
        self.systemd.list_project_units().await
    }

    async fn info(&self, id: ProjectId) -> Result<Option<UnitInfo>, SystemdError> {
        self.systemd.unit_info(&id.unit_name()).await
    }

    async fn start(&self, plan: StartPlan) -> Result<StartTimings, StartError> {
        let StartPlan {
            id,
            config,
            image,
            id_base,
            home,
            snapshots,
            scratch,
            tmp,
            limits,
        } = plan;
        let unit = id.unit_name();
        egress::ensure_hooks_dir(&self.settings.state_dir).map_err(|reason| {
            StartError::Prepare(format!("cannot write the egress hook: {reason}"))
        })?;
        let mut argv = podman::run_argv(&id, &self.settings, &config, &image, id_base, &home);
        let seccomp = self.seccomp_profile().map_err(|reason| {
            StartError::Prepare(format!("cannot write the seccomp profile: {reason}"))
        })?;
        podman::insert_options(
            &mut argv,
            podman::storage_options(&seccomp, &snapshots, scratch.as_deref(), tmp),
        );
        let mut props =
            systemd::unit_properties(&id, argv, self.settings.projects.stop_timeout.as_secs());
        let p = &self.settings.projects;
        props.extend(journal::rate_limit_properties(
            p.log_rate_limit_interval,
            p.log_rate_limit_burst,
        ));
        // podman's own start (and later stop) work runs in the unit's cgroup too: the project's CPU
        // quota is put on once it runs (set_cpu_quota), and lifted before a stop, so a project
        // limited to a sliver of a core still starts and stops at full speed
        props.extend(
            systemd::limit_properties(&limits)
                .into_iter()
                .filter(|(k, _)| *k != CPU_QUOTA),
        );
        // CPUUsageNSec for /metrics (on cgroup v1 systemd reads cpuacct only with accounting on;
        // on v2 it is always there)
        props.push(("CPUAccounting", Variant::from(true)));
        let since = SystemTime::now();
        let t0 = std::time::Instant::now();
        match self.start_unit(&unit, &props).await {
            // the retries while an old unit of the name is collected count as the unit's phase
            Ok((_, podman)) => Ok(StartTimings {
                unit: t0.elapsed().saturating_sub(podman),
                podman,
            }),
            Err(e) => {
                let journal = self.journal_tail(&unit, since).await;
                // podman says what went wrong in its "Error: …" line: only podman's own, cut (the
                // container's output is the tenant's and must not write the API's message)
                let reason = match self.podman_error(&unit, since).await {
                    Some(podman) => podman,
                    None => e.to_string(),
                };
                Err(StartError::Unit { reason, journal })
            }
        }
    }

    async fn stop(&self, id: ProjectId, timeout: Duration) -> Result<(), SystemdError> {
        self.systemd.stop(&id.unit_name(), timeout).await
    }

    async fn kill(&self, id: ProjectId) -> Result<(), SystemdError> {
        self.systemd
            .kill(&id.unit_name(), nix::sys::signal::Signal::SIGKILL as i32)
            .await
    }

    async fn reset_failed(&self, id: ProjectId) {
        self.systemd.reset_failed(&id.unit_name()).await
    }

    async fn set_limits(&self, id: ProjectId, l: &Limits) -> Result<(), SystemdError> {
        self.systemd
            .set_properties(&id.unit_name(), true, &systemd::limit_properties(l))
            .await
    }

    async fn set_cpu_quota(&self, id: ProjectId, cores: Option<f64>) -> Result<(), SystemdError> {
        let usec = cores.map_or(u64::MAX, limits::cpu_quota_usec);
        let quota = [(CPU_QUOTA, Variant::from(usec))];
        self.systemd
            .set_properties(&id.unit_name(), true, &quota)
            .await
    }

    /// Puts the configured host-wide limits on the projects' slice (and its CPU weight on the
    /// parent `cocalc.slice` too: CPU weights only compete between siblings, and the sibling of
    /// `cocalc.slice` is `system.slice`, where this daemon runs). Runtime properties: the config
    /// is their only source, applied anew at every start.
    async fn set_slice_limits(&self, s: &SliceSettings) -> Result<(), SystemdError> {
        let props = systemd::slice_properties(s);
        self.systemd
            .set_properties(systemd::PROJECTS_SLICE, true, &props)
            .await?;
        let weight = [("CPUWeight", Variant::from(s.cpu_weight))];
        self.systemd
            .set_properties("cocalc.slice", true, &weight)
            .await?;
        tracing::info!(slice = systemd::PROJECTS_SLICE, settings = ?s, "host-wide project limits set");
        Ok(())
    }

    /// From the unit's cgroup file (what systemd's `MemoryCurrent` reads), not from PID 1.
    async fn memory_current(&self, id: ProjectId) -> Option<u64> {
        self.cgroups.memory_current(&id.unit_name())
    }

    async fn connect(
        &self,
        id: ProjectId,
        main_pid: u32,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        self.netns.connect(id, main_pid, port, timeout).await
    }

    fn forget(&self, id: ProjectId) {
        self.netns.forget(id)
    }

    /// From the unit's cgroup file (what systemd's `CPUUsageNSec` reads), not from PID 1.
    async fn cpu_usage_nsec(&self, id: ProjectId) -> Option<u64> {
        self.cgroups.cpu_usage_nsec(&id.unit_name())
    }

    /// cgroup v2: systemd's `FreezeUnit` (the unit's whole subtree, conmon and container).
    /// cgroup v1, where systemd cannot freeze units: the v1 freezer of the unit's path, which
    /// holds the container's cgroup (`backends::cgroup`).
    async fn freeze(&self, id: ProjectId) -> Result<(), SystemdError> {
        let unit = id.unit_name();
        match self.cgroups.layout() {
            super::cgroup::Layout::V2 => self.systemd.freeze(&unit).await,
            super::cgroup::Layout::V1 => self
                .cgroups
                .v1_freeze(&unit, Duration::from_secs(2))
                .await
                .map_err(SystemdError::Freezer),
        }
    }

    async fn thaw(&self, id: ProjectId) -> Result<(), SystemdError> {
        let unit = id.unit_name();
        match self.cgroups.layout() {
            super::cgroup::Layout::V2 => match self.systemd.thaw(&unit).await {
                Err(SystemdError::Bus(zbus::Error::MethodError(n, _, _)))
                    if n.as_str() == "org.freedesktop.systemd1.NoSuchUnit"
                        || n.as_str() == "org.freedesktop.systemd1.UnitInactive" =>
                {
                    Ok(())
                }
                r => r,
            },
            super::cgroup::Layout::V1 => self.cgroups.v1_thaw(&unit).map_err(SystemdError::Freezer),
        }
    }

    fn is_frozen(&self, id: ProjectId) -> Option<bool> {
        self.cgroups
            .freezer(&id.unit_name())
            .map(|f| f != super::cgroup::Freezer::Thawed)
    }

    async fn journal(&self, id: ProjectId, q: &LogQuery) -> Result<Vec<LogLine>, String> {
        crate::backends::journal_read::read(&id.unit_name(), q).await
    }

    /// Helpers run as oneshot units: podman needs more than the daemon's sandbox allows. The
    /// error carries podman's own message from the helper's journal.
    async fn run_helper(&self, helper: Helper) -> Result<(), String> {
        if let Helper::Receive { mv, spool, staging } = &helper {
            return self
                .systemd
                .run_confined(
                    &format!("cocalc-move-receive-{mv}.service"),
                    &format!("Receive move {mv} into its staging area"),
                    crate::backends::btrfs::sendrecv::receive_argv(
                        spool,
                        staging,
                        &crate::backends::btrfs::sendrecv::mount_root(staging),
                    ),
                    crate::backends::btrfs::sendrecv::receive_writable(staging),
                    Duration::from_secs(3600),
                )
                .await
                .map_err(|e| format!("btrfs receive: {e}"));
        }
        let (unit, desc, args, what) = match &helper {
            Helper::RemoveContainer(id) => (
                format!("cocalc-project-cleanup-{id}.service"),
                format!("Remove the container of CoCalc project {id}"),
                podman::rm_by_name_argv(id),
                "podman rm",
            ),
            Helper::UpdateContainer(id, l) => (
                format!("cocalc-project-update-{id}.service"),
                format!("Update the limits of CoCalc project {id}'s container"),
                podman::update_argv(id, l),
                "podman update",
            ),
            Helper::Receive { .. } => unreachable!("handled above"),
        };
        let argv: Vec<String> = std::iter::once(podman::PODMAN.to_string())
            .chain(args)
            .collect();
        let since = SystemTime::now();
        match self
            .systemd
            .run_oneshot(&unit, &desc, argv, Duration::from_secs(30))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(helper, Helper::RemoveContainer(_)) => Err(e.to_string()),
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(match self.podman_error(&unit, since).await {
                    Some(podman) => format!("{what}: {podman}"),
                    None => format!("{what}: {e}"),
                })
            }
        }
    }
}
