//! systemd over the system bus: the calls the host makes (hand-written zbus proxies for the few
//! Manager methods used, all present in systemd 252), the transient unit recipe of a project, and
//! the watcher that keeps project unit state current from signals.
use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant, Variant};

use crate::backends::podman;
use crate::domain::limits::{self, Limits, SliceSettings};
use crate::domain::project::{ActiveState, ProjectId, UnitInfo};
use crate::ports::{UnitEvent, UnitEvents};

/// The slice every project unit runs in.
pub const PROJECTS_SLICE: &str = "cocalc-projects.slice";
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Variant<'_>)],
        aux: &[(&str, &[(&str, Variant<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn freeze_unit(&self, name: &str) -> zbus::Result<()>;
    fn thaw_unit(&self, name: &str) -> zbus::Result<()>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Variant<'_>)],
    ) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;
}

/// A systemd call failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// D-Bus transport or a systemd error reply.
    #[error("systemd: {0}")]
    Bus(#[from] zbus::Error),
    /// A job ended with a result other than `done`.
    #[error("job for {unit} ended with result '{result}'")]
    Job {
        /// unit name
        unit: String,
        /// systemd's job result
        result: String,
    },
    /// The cgroup freezer could not be used (cgroup v1: its files).
    #[error("freezer: {0}")]
    Freezer(String),
    /// A job did not finish in time.
    #[error("job for {unit} did not finish within {secs}s")]
    JobTimeout {
        /// unit name
        unit: String,
        /// the limit
        secs: u64,
    },
}

impl SystemdError {
    /// Whether systemd said the unit does not exist (a stopped project, not a failure).
    pub fn is_no_such_unit(&self) -> bool {
        matches!(self, SystemdError::Bus(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
    }
}

/// The system bus connection the host uses to drive systemd.
#[derive(Debug, Clone)]
pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
}

/// Escapes a string into one object-path label as systemd does (sd_bus_path_encode): every byte
/// but `[A-Za-z0-9]` (and a leading digit) becomes `_xx`.
pub fn bus_label_escape(s: &str) -> String {
    let mut p = String::with_capacity(s.len() * 2);
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

/// A unit's object path (`-` → `_2d`, `.` → `_2e`).
pub fn unit_path(unit: &str) -> String {
    format!("{UNIT_PATH_PREFIX}{}", bus_label_escape(unit))
}

/// The inverse of [`unit_path`]; `None` for anything that is not an escaped unit path.
pub fn unit_name_from_path(path: &str) -> Option<String> {
    let esc = path.strip_prefix(UNIT_PATH_PREFIX)?;
    let b = esc.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The properties of a project's transient unit (the recipe in DESIGN.md).
pub fn unit_properties(
    id: &ProjectId,
    run_argv: Vec<String>,
    stop_timeout_secs: u64,
) -> Vec<(&'static str, Variant<'static>)> {
    let exec = |argv: Vec<String>| -> Variant<'static> {
        let path = argv[0].clone();
        Variant::from(vec![(path, argv, false)])
    };
    vec![
        ("Description", Variant::from(format!("CoCalc project {id}"))),
        ("Slice", Variant::from(PROJECTS_SLICE.to_string())),
        ("Type", Variant::from("notify".to_string())),
        ("NotifyAccess", Variant::from("all".to_string())),
        ("KillMode", Variant::from("mixed".to_string())),
        (
            "CollectMode",
            Variant::from("inactive-or-failed".to_string()),
        ),
        (
            "SyslogIdentifier",
            Variant::from(format!("cocalc-project-{id}")),
        ),
        (
            "RuntimeDirectory",
            Variant::from(vec![format!("cocalc-project-{id}")]),
        ),
        (
            "Environment",
            Variant::from(vec![
                format!("COCALC_PROJECT_ID={id}"),
                format!("PODMAN_SYSTEMD_UNIT={}", id.unit_name()),
            ]),
        ),
        // the container's cgroup is created below the unit's (podman --cgroups=split)
        ("Delegate", Variant::from(true)),
        // an OOM kill inside the project kills its offender, not the whole project
        ("OOMPolicy", Variant::from("continue".to_string())),
        ("TimeoutStartUSec", Variant::from(120_000_000u64)),
        // podman's own stop timeout plus room for podman itself
        (
            "TimeoutStopUSec",
            Variant::from((stop_timeout_secs + 15) * 1_000_000),
        ),
        // each Exec* line is a fork of PID 1: no ExecStartPre (the cidfile lives in the unit's
        // RuntimeDirectory, made empty at each start and removed at its end); the stop removes
        // the container in the same podman process; ExecStopPost runs podman only after an
        // unclean end
        ("ExecStart", exec(run_argv)),
        ("ExecStop", exec(podman::stop_argv(id, stop_timeout_secs))),
        ("ExecStopPost", exec(podman::stop_post_argv(id))),
    ]
}

/// A match rule for a signal sent by systemd.
fn signal_rule(
    interface: &'static str,
    member: &'static str,
) -> zbus::match_rule::Builder<'static> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.systemd1")
        .interface(interface)
        .member(member)
}

/// The limit properties of a project unit (`limits::unit_values`), for start and live updates.
pub fn limit_properties(l: &Limits) -> Vec<(&'static str, Variant<'static>)> {
    limits::unit_values(l)
        .into_iter()
        .map(|(k, v)| (k, Variant::from(v)))
        .collect()
}

/// The host-wide limit properties of the projects' slice (`limits::slice_values`).
pub fn slice_properties(s: &SliceSettings) -> Vec<(&'static str, Variant<'static>)> {
    limits::slice_values(s)
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                limits::Prop::U64(n) => Variant::from(n),
                limits::Prop::U32(n) => Variant::from(n),
            };
            (k, v)
        })
        .collect()
}

/// Parses systemd's `ActiveState`.
pub fn parse_active_state(s: &str) -> ActiveState {
    match s {
        "active" => ActiveState::Active,
        "reloading" => ActiveState::Reloading,
        "inactive" | "" => ActiveState::Inactive,
        "failed" => ActiveState::Failed,
        "activating" => ActiveState::Activating,
        "deactivating" => ActiveState::Deactivating,
        _ => ActiveState::Other,
    }
}

fn prop<T: TryFrom<OwnedVariant>>(props: &HashMap<String, OwnedVariant>, name: &str) -> Option<T> {
    props
        .get(name)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

impl Systemd {
    /// Connects to the system bus and subscribes to systemd's signals.
    pub async fn connect() -> Result<Systemd, SystemdError> {
        let conn = Connection::system().await?;
        let manager = ManagerProxy::new(&conn).await?;
        match manager.subscribe().await {
            Ok(()) => {}
            Err(zbus::Error::MethodError(n, _, _)) if n.as_str().ends_with("AlreadySubscribed") => {
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Systemd { conn, manager })
    }

    async fn job_stream(&self) -> Result<MessageStream, SystemdError> {
        let rule = signal_rule("org.freedesktop.systemd1.Manager", "JobRemoved").build()?;
        Ok(MessageStream::for_match_rule(rule, &self.conn, None).await?)
    }

    async fn wait_job(
        &self,
        mut jobs: MessageStream,
        job: &OwnedObjectPath,
        unit: &str,
        timeout: Duration,
    ) -> Result<(), SystemdError> {
        let wait = async {
            while let Some(msg) = jobs.next().await {
                let msg = msg?;
                let (_, path, _, result): (u32, OwnedObjectPath, String, String) =
                    msg.body().deserialize()?;
                if path.as_str() == job.as_str() {
                    return Ok(result);
                }
            }
            Err(SystemdError::Job {
                unit: unit.into(),
                result: "bus connection closed".into(),
            })
        };
        let result =
            tokio::time::timeout(timeout, wait)
                .await
                .map_err(|_| SystemdError::JobTimeout {
                    unit: unit.into(),
                    secs: timeout.as_secs(),
                })??;
        if result == "done" {
            Ok(())
        } else {
            Err(SystemdError::Job {
                unit: unit.into(),
                result,
            })
        }
    }

    /// Starts a transient unit and waits for its start job; `Ok` only if the job result is `done`.
    pub async fn start_transient(
        &self,
        unit: &str,
        props: &[(&str, Variant<'_>)],
        timeout: Duration,
    ) -> Result<(), SystemdError> {
        self.start_transient_timed(unit, props, timeout)
            .await
            .map(|_| ())
    }

    /// [`Systemd::start_transient`], timed: how long until systemd took the start job, and how
    /// long from then until the job was done.
    pub async fn start_transient_timed(
        &self,
        unit: &str,
        props: &[(&str, Variant<'_>)],
        timeout: Duration,
    ) -> Result<(Duration, Duration), SystemdError> {
        let t0 = std::time::Instant::now();
        // listen before calling: a fast job can finish before the call returns
        let jobs = self.job_stream().await?;
        let job = self
            .manager
            .start_transient_unit(unit, "fail", props, &[])
            .await?;
        let queued = t0.elapsed();
        self.wait_job(jobs, &job, unit, timeout).await?;
        Ok((queued, t0.elapsed() - queued))
    }

    /// Runs `argv` to completion as the transient oneshot service `unit` and waits for it: how the
    /// sandboxed daemon runs a program that needs more than its sandbox allows (podman). `Ok`
    /// only if the program exited 0.
    pub async fn run_oneshot(
        &self,
        unit: &str,
        description: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<(), SystemdError> {
        let path = argv[0].clone();
        let props = [
            ("Description", Variant::from(description.to_string())),
            ("Type", Variant::from("oneshot".to_string())),
            (
                "CollectMode",
                Variant::from("inactive-or-failed".to_string()),
            ),
            ("ExecStart", Variant::from(vec![(path, argv, false)])),
        ];
        self.start_transient(unit, &props, timeout).await
    }

    /// Runs `argv` as a oneshot transient unit in a sandbox that may write only `writable`: no
    /// network, no new privileges, only the capabilities a `btrfs receive` needs (no CAP_MKNOD:
    /// a stream cannot make device nodes), the rest of the system read-only.
    pub async fn run_confined(
        &self,
        unit: &str,
        description: &str,
        argv: Vec<String>,
        writable: &std::path::Path,
        timeout: Duration,
    ) -> Result<(), SystemdError> {
        // CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_FOWNER 3, CAP_SYS_ADMIN 21
        let caps: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 21);
        let path = argv[0].clone();
        let props = [
            ("Description", Variant::from(description.to_string())),
            ("Type", Variant::from("oneshot".to_string())),
            (
                "CollectMode",
                Variant::from("inactive-or-failed".to_string()),
            ),
            ("ExecStart", Variant::from(vec![(path, argv, false)])),
            ("PrivateNetwork", Variant::from(true)),
            ("PrivateTmp", Variant::from(true)),
            ("NoNewPrivileges", Variant::from(true)),
            ("CapabilityBoundingSet", Variant::from(caps)),
            ("ProtectSystem", Variant::from("strict".to_string())),
            ("ProtectHome", Variant::from("yes".to_string())),
            (
                "ReadWritePaths",
                Variant::from(vec![writable.display().to_string()]),
            ),
        ];
        self.start_transient(unit, &props, timeout).await
    }

    /// Stops a unit and waits for the stop job. A unit that does not exist is already stopped.
    pub async fn stop(&self, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
        let jobs = self.job_stream().await?;
        match self.manager.stop_unit(unit, "replace").await {
            Ok(job) => self.wait_job(jobs, &job, unit, timeout).await,
            Err(e) => {
                let e = SystemdError::from(e);
                if e.is_no_such_unit() { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Sends `signal` to every process of the unit.
    pub async fn kill(&self, unit: &str, signal: i32) -> Result<(), SystemdError> {
        match self.manager.kill_unit(unit, "all", signal).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = SystemdError::from(e);
                if e.is_no_such_unit() { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Forgets a failed unit so its name can be used again (ignores "no such unit").
    pub async fn reset_failed(&self, unit: &str) {
        let _ = self.manager.reset_failed_unit(unit).await;
    }

    /// Freezes a unit's cgroup (cgroup v2 only); systemd answers once it is frozen.
    pub async fn freeze(&self, unit: &str) -> Result<(), SystemdError> {
        Ok(self.manager.freeze_unit(unit).await?)
    }

    /// Thaws a unit's cgroup (cgroup v2 only).
    pub async fn thaw(&self, unit: &str) -> Result<(), SystemdError> {
        Ok(self.manager.thaw_unit(unit).await?)
    }

    /// Changes properties of a unit (`runtime`: until reboot, as `systemctl set-property --runtime`).
    /// On a running unit cgroup limits take effect at once.
    pub async fn set_properties(
        &self,
        unit: &str,
        runtime: bool,
        props: &[(&str, Variant<'_>)],
    ) -> Result<(), SystemdError> {
        Ok(self
            .manager
            .set_unit_properties(unit, runtime, props)
            .await?)
    }

    /// An uncached Properties proxy on a unit's object.
    async fn props_proxy(&self, unit: &str) -> zbus::Result<zbus::fdo::PropertiesProxy<'static>> {
        zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(unit_path(unit))
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
    }

    /// Reads the state of a unit; `None` when it is not loaded. Five small `Get`s sent at once,
    /// not `GetAll` of the Unit and Service interfaces: PID 1 then serializes five values instead
    /// of a few hundred (the Service's include every `Exec*` line with its whole argv), on every
    /// start and stop.
    pub async fn unit_info(&self, unit: &str) -> Result<Option<UnitInfo>, SystemdError> {
        let props = self.props_proxy(unit).await?;
        let u = || {
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Unit")
        };
        let s = zbus::names::InterfaceName::from_static_str_unchecked(
            "org.freedesktop.systemd1.Service",
        );
        let (load, active, sub, since, pid) = tokio::join!(
            props.get(u(), "LoadState"),
            props.get(u(), "ActiveState"),
            props.get(u(), "SubState"),
            props.get(u(), "ActiveEnterTimestamp"),
            props.get(s, "MainPID"),
        );
        let load = match load {
            Ok(v) => String::try_from(v).unwrap_or_default(),
            Err(zbus::fdo::Error::UnknownObject(_))
            | Err(zbus::fdo::Error::UnknownInterface(_)) => return Ok(None),
            Err(e) => return Err(zbus::Error::from(e).into()),
        };
        if load == "not-found" {
            return Ok(None);
        }
        let string = |v: zbus::fdo::Result<OwnedVariant>| {
            v.ok()
                .and_then(|v| String::try_from(v).ok())
                .unwrap_or_default()
        };
        Ok(Some(UnitInfo {
            active_state: parse_active_state(&string(active)),
            sub_state: string(sub),
            main_pid: pid.ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
            active_enter_usec: since.ok().and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
        }))
    }

    /// Reads `MemoryCurrent` of a unit (not signalled by systemd, so read on demand).
    pub async fn memory_current(&self, unit: &str) -> Option<u64> {
        let props = self.props_proxy(unit).await.ok()?;
        let iface = zbus::names::InterfaceName::from_static_str_unchecked(
            "org.freedesktop.systemd1.Service",
        );
        let v = props.get(iface, "MemoryCurrent").await.ok()?;
        u64::try_from(v).ok().filter(|m| *m != u64::MAX)
    }

    /// How a unit's main process ended: `Ok(None)` while the unit is still up, `Some(None)` when
    /// the unit is gone, else `Some(Some((ExecMainCode, ExecMainStatus)))` (code 1: exited with
    /// status; 2, 3: killed or dumped by the signal in status).
    pub async fn main_exit(&self, unit: &str) -> Result<Option<Option<(i32, i32)>>, SystemdError> {
        let props = self.props_proxy(unit).await?;
        let iface = |s: &'static str| zbus::names::InterfaceName::from_static_str_unchecked(s);
        let u = match props.get_all(iface("org.freedesktop.systemd1.Unit")).await {
            Ok(u) => u,
            Err(zbus::fdo::Error::UnknownObject(_))
            | Err(zbus::fdo::Error::UnknownInterface(_)) => return Ok(Some(None)),
            Err(e) => return Err(zbus::Error::from(e).into()),
        };
        if prop::<String>(&u, "LoadState").as_deref() == Some("not-found") {
            return Ok(Some(None));
        }
        let active: String = prop(&u, "ActiveState").unwrap_or_default();
        if active != "inactive" && active != "failed" {
            return Ok(None);
        }
        let s = props
            .get_all(iface("org.freedesktop.systemd1.Service"))
            .await
            .unwrap_or_default();
        Ok(Some(Some((
            prop(&s, "ExecMainCode").unwrap_or(0),
            prop(&s, "ExecMainStatus").unwrap_or(0),
        ))))
    }

    /// Drops the reference a transient unit started with `AddRef=true` holds for this client
    /// (it is then collected once inactive); ignores a unit already gone.
    pub async fn unref(&self, unit: &str) {
        let _ = self
            .conn
            .call_method(
                Some("org.freedesktop.systemd1"),
                unit_path(unit).as_str(),
                Some("org.freedesktop.systemd1.Unit"),
                "Unref",
                &(),
            )
            .await;
    }

    /// CPU time used by the unit (ns), when systemd accounts it.
    pub async fn cpu_usage_nsec(&self, unit: &str) -> Option<u64> {
        let props = self.props_proxy(unit).await.ok()?;
        let iface = zbus::names::InterfaceName::from_static_str_unchecked(
            "org.freedesktop.systemd1.Service",
        );
        let v = props.get(iface, "CPUUsageNSec").await.ok()?;
        u64::try_from(v).ok().filter(|m| *m != u64::MAX)
    }

    /// The project units systemd has loaded now: one `ListUnitsByPatterns` (names and states),
    /// then `MainPID` and `ActiveEnterTimestamp` of each read concurrently (`Get`, not the whole
    /// interfaces' `GetAll`), so reconciling N running projects costs one round trip plus N
    /// pipelined small reads, not 2N sequential large ones.
    pub async fn list_project_units(&self) -> Result<Vec<(ProjectId, UnitInfo)>, SystemdError> {
        use futures_util::StreamExt as _;
        let units = self
            .manager
            .list_units_by_patterns(&[], &["cocalc-project-*.service"])
            .await?;
        let listed: Vec<(ProjectId, String, String, String)> = units
            .into_iter()
            .filter(|u| u.2 != "not-found")
            .filter_map(|u| ProjectId::from_unit_name(&u.0).map(|id| (id, u.0, u.3, u.4)))
            .collect();
        let reads = futures_util::stream::iter(listed)
            .map(|(id, unit, active, sub)| async move {
                let (pid, since) = tokio::join!(
                    self.get_u(&unit, "org.freedesktop.systemd1.Service", "MainPID"),
                    self.get_t(
                        &unit,
                        "org.freedesktop.systemd1.Unit",
                        "ActiveEnterTimestamp"
                    ),
                );
                (
                    id,
                    UnitInfo {
                        active_state: parse_active_state(&active),
                        sub_state: sub,
                        main_pid: pid.unwrap_or(0),
                        active_enter_usec: since.unwrap_or(0),
                    },
                )
            })
            .buffer_unordered(64);
        Ok(reads.collect().await)
    }

    async fn get_prop(&self, unit: &str, iface: &'static str, name: &str) -> Option<OwnedVariant> {
        let props = self.props_proxy(unit).await.ok()?;
        let iface = zbus::names::InterfaceName::from_static_str_unchecked(iface);
        props.get(iface, name).await.ok()
    }

    async fn get_u(&self, unit: &str, iface: &'static str, name: &str) -> Option<u32> {
        u32::try_from(self.get_prop(unit, iface, name).await?).ok()
    }

    async fn get_t(&self, unit: &str, iface: &'static str, name: &str) -> Option<u64> {
        u64::try_from(self.get_prop(unit, iface, name).await?).ok()
    }

    /// Streams changes of project units (PropertiesChanged on their objects, UnitRemoved). Call
    /// before reading the initial state, so nothing falls between the two.
    pub async fn watch(&self) -> Result<UnitEvents, SystemdError> {
        let changes = signal_rule("org.freedesktop.DBus.Properties", "PropertiesChanged")
            .path_namespace(UNIT_PATH_PREFIX.trim_end_matches('/'))
            .build()?;
        let removed = signal_rule("org.freedesktop.systemd1.Manager", "UnitRemoved").build()?;
        let changes = MessageStream::for_match_rule(changes, &self.conn, None).await?;
        let removed = MessageStream::for_match_rule(removed, &self.conn, None).await?;
        let all = futures_util::stream::select(changes, removed)
            .filter_map(|msg| futures_util::future::ready(msg.ok().and_then(|m| decode_event(&m))));
        Ok(Box::pin(all))
    }
}

fn decode_event(msg: &zbus::Message) -> Option<UnitEvent> {
    let h = msg.header();
    match h.member()?.as_str() {
        "UnitRemoved" => {
            let (name, _): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            Some(UnitEvent::Removed(ProjectId::from_unit_name(&name)?))
        }
        "PropertiesChanged" => {
            let unit = unit_name_from_path(h.path()?.as_str())?;
            let id = ProjectId::from_unit_name(&unit)?;
            let (_iface, changed, _inv): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                msg.body().deserialize().ok()?;
            let ev = UnitEvent::Changed {
                id,
                active_state: prop::<String>(&changed, "ActiveState")
                    .map(|s| parse_active_state(&s)),
                sub_state: prop(&changed, "SubState"),
                main_pid: prop(&changed, "MainPID"),
                active_enter_usec: prop(&changed, "ActiveEnterTimestamp"),
            };
            match &ev {
                UnitEvent::Changed {
                    active_state: None,
                    sub_state: None,
                    main_pid: None,
                    active_enter_usec: None,
                    ..
                } => None,
                _ => Some(ev),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_states_map_to_seed_states() {
        use crate::domain::project::ProjectState;
        let state = |s: &str| ProjectState::from_active_state(parse_active_state(s));
        assert_eq!(state("active"), ProjectState::Running);
        assert_eq!(state("reloading"), ProjectState::Running);
        assert_eq!(state("activating"), ProjectState::Starting);
        assert_eq!(state("deactivating"), ProjectState::Stopping);
        assert_eq!(state("failed"), ProjectState::Opened);
        assert_eq!(state("maintenance"), ProjectState::Opened);
        assert_eq!(state(""), ProjectState::Opened);
    }

    #[test]
    fn unit_paths_escape_like_systemd() {
        let u = "cocalc-project-6f1c2d3e-0000-4000-8000-000000000001.service";
        let p = unit_path(u);
        assert_eq!(
            p,
            "/org/freedesktop/systemd1/unit/cocalc_2dproject_2d6f1c2d3e_2d0000_2d4000_2d8000_2d000000000001_2eservice"
        );
        assert_eq!(unit_name_from_path(&p).as_deref(), Some(u));
        assert_eq!(
            unit_path("1a.service"),
            "/org/freedesktop/systemd1/unit/_31a_2eservice"
        );
        assert_eq!(
            unit_name_from_path("/org/freedesktop/systemd1/unit/x_2"),
            None
        );
        assert_eq!(unit_name_from_path("/elsewhere/x"), None);
    }

    #[test]
    fn unit_properties_follow_the_recipe() {
        let id: ProjectId = "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap();
        let props = unit_properties(&id, vec!["/usr/bin/podman".into(), "run".into()], 10);
        let get = |n: &str| {
            props
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        };
        assert_eq!(get("Type").as_deref(), Some("\"notify\""));
        assert_eq!(get("Slice").as_deref(), Some("\"cocalc-projects.slice\""));
        assert_eq!(get("KillMode").as_deref(), Some("\"mixed\""));
        assert_eq!(
            get("CollectMode").as_deref(),
            Some("\"inactive-or-failed\"")
        );
        assert_eq!(get("TimeoutStopUSec").as_deref(), Some("uint64 25000000"));
        assert_eq!(get("Delegate").as_deref(), Some("true"));
        assert_eq!(get("OOMPolicy").as_deref(), Some("\"continue\""));
        // ExecStart is a(sasb) with argv[0] repeated in the argv
        let exec = props.iter().find(|(k, _)| *k == "ExecStart").unwrap();
        assert_eq!(exec.1.value_signature().to_string(), "a(sasb)");
        for (k, v) in &props {
            assert!(!v.value_signature().to_string().is_empty(), "{k}");
        }
        // every Exec* line is a fork of PID 1 on the start or stop path
        let execs: Vec<&str> = props
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.starts_with("Exec"))
            .collect();
        assert_eq!(execs, ["ExecStart", "ExecStop", "ExecStopPost"]);
        let stop = get("ExecStop").unwrap();
        assert!(stop.contains("\"rm\", \"--force\""), "{stop}");
    }

    #[test]
    fn limit_properties_are_uint64() {
        for (k, v) in limit_properties(&Limits::default()) {
            assert_eq!(v.value_signature().to_string(), "t", "{k}");
        }
        let sl = slice_properties(&SliceSettings::default());
        let sig = |n: &str| {
            sl.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.value_signature().to_string())
        };
        assert_eq!(sig("MemoryMaxScale").as_deref(), Some("u"));
        assert_eq!(sig("TasksMaxScale").as_deref(), Some("u"));
        assert_eq!(sig("CPUWeight").as_deref(), Some("t"));
    }
}
