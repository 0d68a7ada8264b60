//! The admin CLI's client side: `list`, `status`, `start`, `stop` over the D-Bus API, as
//! `systemctl` is a client of systemd. Human output by default, `--json` for scripts; exit codes
//! as systemctl: 0 ok, 1 failure, 2 usage, 4 no such project.
use std::io::IsTerminal;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::{Value, json};
use zbus::OwnedObjectPath;

use super::dbus::{BUS_NAME, MANAGER_PATH};
use crate::api::{
    self, BusDict, ErrorKind, LimitsAnswer, SnapshotAnswer, SnapshotTuple, StatusAnswer, WireError,
};
use crate::domain::project::{ProjectId, RunConfig};

pub use crate::api::error::{EXIT_FAILURE, EXIT_NO_SUCH_PROJECT, EXIT_OK, EXIT_USAGE};

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Manager",
    default_service = "com.cocalc.ProjectHost1",
    default_path = "/com/cocalc/ProjectHost1"
)]
trait Manager {
    fn list_projects(&self) -> zbus::Result<Vec<(String, String, u64, OwnedObjectPath)>>;
    fn get_project(&self, id: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_project_status(&self, id: &str) -> zbus::Result<BusDict>;
    fn start_project(&self, id: &str, config_json: &str) -> zbus::Result<BusDict>;
    fn stop_project(&self, id: &str, force: bool) -> zbus::Result<BusDict>;
    fn set_project_limits(&self, id: &str, limits_json: &str) -> zbus::Result<BusDict>;
    fn sweep_snapshots(&self) -> zbus::Result<String>;
    fn get_authorized_keys(&self, id: &str) -> zbus::Result<Vec<String>>;
    fn set_authorized_keys(&self, id: &str, keys: &[String]) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn master_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn outbox_depth(&self) -> zbus::Result<u64>;
}

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Project",
    default_service = "com.cocalc.ProjectHost1"
)]
trait Project {
    fn list_snapshots(&self) -> zbus::Result<Vec<SnapshotTuple>>;
    fn create_snapshot(&self, name: &str) -> zbus::Result<SnapshotTuple>;
    fn delete_snapshot(&self, name: &str) -> zbus::Result<()>;
    fn restore_snapshot(&self, name: &str) -> zbus::Result<()>;
    fn set_disk_quota(&self, bytes: u64) -> zbus::Result<()>;
}

/// A CLI failure: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    /// exit code
    pub code: u8,
    /// what went wrong, one line
    pub message: String,
}

impl From<WireError> for CliError {
    fn from(e: WireError) -> CliError {
        CliError {
            code: e.kind.exit_code(),
            message: e.message,
        }
    }
}

impl From<zbus::Error> for CliError {
    fn from(e: zbus::Error) -> CliError {
        match &e {
            zbus::Error::MethodError(name, msg, _) => {
                // the daemon's error table decides, as for HTTP's status
                let code = ErrorKind::from_dbus_name(name.as_str())
                    .map_or(EXIT_FAILURE, ErrorKind::exit_code);
                let message = match (name.as_str(), msg) {
                    ("org.freedesktop.DBus.Error.AccessDenied", _) => {
                        "access denied: this needs root or membership in group cocalc-project-host"
                            .to_string()
                    }
                    ("org.freedesktop.DBus.Error.ServiceUnknown", _) => {
                        format!(
                            "{BUS_NAME} is not running (systemctl start cocalc-project-host.socket)"
                        )
                    }
                    (_, Some(m)) => m.clone(),
                    (n, None) => n.to_string(),
                };
                CliError { code, message }
            }
            zbus::Error::FDO(f) if matches!(**f, zbus::fdo::Error::AccessDenied(_)) => CliError {
                code: EXIT_FAILURE,
                message:
                    "access denied: this needs root or membership in group cocalc-project-host"
                        .into(),
            },
            _ => CliError {
                code: EXIT_FAILURE,
                message: format!("cannot reach {BUS_NAME} on the system bus: {e}"),
            },
        }
    }
}

/// Parses a project id given on the command line (usage error otherwise).
pub fn parse_id(s: &str) -> Result<ProjectId, CliError> {
    Ok(api::parse_id(s)?)
}

fn print_json<T: Serialize>(v: &T) -> Result<(), CliError> {
    // as HTTP encodes it (through a JSON value: keys in the same order)
    let v =
        serde_json::to_value(v).map_err(|e| WireError::new(ErrorKind::Internal, e.to_string()))?;
    println!("{v}");
    Ok(())
}

/// `state` padded to `width`, coloured when writing to a terminal.
fn colour(state: &str, width: usize, tty: bool) -> String {
    let padded = format!("{state:<width$}");
    let c = match state {
        "running" => "32",
        "starting" | "stopping" => "33",
        // frozen for being idle: up, not using the CPU
        "frozen" => "36",
        _ => return padded,
    };
    if tty {
        format!("\x1b[{c}m{padded}\x1b[0m")
    } else {
        padded
    }
}

fn fmt_ms(ms: u64) -> String {
    crate::domain::snapshots::utc(ms)
        .strftime("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

fn print_status(id: &ProjectId, d: &BusDict, json_out: bool) -> Result<(), CliError> {
    let st = StatusAnswer::from_bus(d)?;
    if json_out {
        return print_json(&st);
    }
    let tty = std::io::stdout().is_terminal();
    println!("{id}: {}", colour(&st.state, 0, tty));
    let line = |label: &str, v: &dyn std::fmt::Display| println!("  {label:>10}: {v}");
    line("unit", &st.unit);
    if let Some(v) = &st.sub_state {
        line("sub-state", v);
    }
    if let Some(v) = st.main_pid {
        line("main pid", &v);
    }
    if let Some(v) = st.memory_current {
        line("memory", &v);
    }
    line("server", &st.server);
    if let Some(t) = st.started_at {
        line("started", &fmt_ms(t));
    }
    if let Some(d) = st.disk {
        let used = d.used.map_or("-".to_string(), fmt_bytes);
        let quota = d.quota.map_or("none".to_string(), fmt_bytes);
        line("disk", &format!("{used} used, quota {quota}"));
    }
    if let Some(f) = st.storage_full {
        line(
            "storage",
            &format!(
                "FULL: {} free, below the reserve of {}; starts and writes refused",
                fmt_bytes(f.free),
                fmt_bytes(f.reserve)
            ),
        );
    }
    Ok(())
}

async fn manager() -> Result<ManagerProxy<'static>, CliError> {
    let conn = zbus::Connection::system().await?;
    Ok(ManagerProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await?)
}

/// The keys of an `authorized_keys`-style text: one per line; blank lines and `#` comments
/// skipped (each key is validated by the daemon).
pub fn key_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// What the CLI was asked to do.
#[derive(Debug)]
pub enum Action {
    /// `list`
    List,
    /// `status ID`
    Status(ProjectId),
    /// `start ID [config]`
    Start(ProjectId, Box<RunConfig>),
    /// `stop ID [--force]`
    Stop(ProjectId, bool),
    /// `set-limits ID …`: the JSON body of a limits change
    SetLimits(ProjectId, Value),
    /// `set-quota ID SIZE|none`
    SetQuota(ProjectId, Option<u64>),
    /// `snapshot list ID`
    SnapshotList(ProjectId),
    /// `snapshot create ID [NAME]`
    SnapshotCreate(ProjectId, Option<String>),
    /// `snapshot delete ID NAME`
    SnapshotDelete(ProjectId, String),
    /// `snapshot restore ID NAME`
    SnapshotRestore(ProjectId, String),
    /// `snapshot-sweep`
    SnapshotSweep,
    /// `authorized-keys ID [--set FILE]`: the keys to set (`None`: show them)
    AuthorizedKeys(ProjectId, Option<Vec<String>>),
    /// `master-status`
    MasterStatus,
}

/// The project object of a project this host knows (exit 4 otherwise).
async fn project(
    m: &ManagerProxy<'static>,
    id: &ProjectId,
) -> Result<ProjectProxy<'static>, CliError> {
    let path = m.get_project(&id.to_string()).await?;
    Ok(ProjectProxy::builder(m.inner().connection())
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await?)
}

/// A byte count for people (`-` for 0); also `top`'s.
pub(crate) fn fmt_bytes(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= 1 << 30 => format!("{:.1}G", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}M", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}K", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

/// Runs one action against the daemon; prints the result.
pub async fn run(action: Action, json_out: bool) -> Result<(), CliError> {
    let m = manager().await?;
    match action {
        Action::List => {
            let projects = m.list_projects().await?;
            if json_out {
                let v: Vec<Value> = projects
                    .iter()
                    .map(|(id, state, last, path)| json!({"project_id": id, "state": state, "last": last, "path": path.as_str()}))
                    .collect();
                println!("{}", json!({ "projects": v }));
                return Ok(());
            }
            let tty = std::io::stdout().is_terminal();
            println!("{:<36}  {:<8}  LAST TOUCHED", "PROJECT", "STATE");
            for (id, state, last, _) in &projects {
                println!("{id:<36}  {}  {}", colour(state, 8, tty), fmt_ms(*last));
            }
            println!("\n{} project(s)", projects.len());
        }
        Action::Status(id) => {
            // systemctl-like: a project this host does not know is "no such project"
            m.get_project(&id.to_string()).await?;
            print_status(&id, &m.get_project_status(&id.to_string()).await?, json_out)?;
        }
        Action::Start(id, cfg) => {
            let cfg_json = if *cfg == RunConfig::default() {
                String::new()
            } else {
                serde_json::to_string(&cfg)
                    .map_err(|e| WireError::new(ErrorKind::InvalidConfig, e.to_string()))?
            };
            let d = m.start_project(&id.to_string(), &cfg_json).await?;
            print_status(&id, &d, json_out)?;
        }
        Action::SetLimits(id, patch) => {
            let d = m
                .set_project_limits(&id.to_string(), &patch.to_string())
                .await?;
            let a = LimitsAnswer::from_bus(&d)?;
            if json_out {
                print_json(&a)?;
            } else {
                let l = &a.limits;
                let when = if a.live { "now" } else { "at its next start" };
                println!("{id}: limits in force {when}");
                let values: [(&str, &dyn std::fmt::Display); 6] = [
                    ("memory", &l.memory),
                    ("swap", &l.swap),
                    ("cpu", &l.cpu),
                    ("pids", &l.pids),
                    ("cpu_weight", &l.cpu_weight),
                    ("io_weight", &l.io_weight),
                ];
                for (k, v) in values {
                    println!("  {k:>10}: {v}");
                }
            }
        }
        Action::AuthorizedKeys(id, set) => {
            let keys = match set {
                Some(keys) => m.set_authorized_keys(&id.to_string(), &keys).await?,
                None => m.get_authorized_keys(&id.to_string()).await?,
            };
            if json_out {
                print_json(&api::AuthorizedKeys { keys })?;
            } else {
                for k in &keys {
                    println!("{k}");
                }
            }
        }
        Action::SetQuota(id, bytes) => {
            project(&m, &id)
                .await?
                .set_disk_quota(bytes.unwrap_or(0))
                .await?;
            print_status(&id, &m.get_project_status(&id.to_string()).await?, json_out)?;
        }
        Action::SnapshotList(id) => {
            let snaps: Vec<SnapshotAnswer> = project(&m, &id)
                .await?
                .list_snapshots()
                .await?
                .iter()
                .map(SnapshotAnswer::from_bus)
                .collect();
            if json_out {
                print_json(&api::SnapshotList { snapshots: snaps })?;
            } else {
                println!(
                    "{:<40}  {:<6}  {:<23}  {:>9}  {:>10}",
                    "NAME", "KIND", "CREATED", "EXCLUSIVE", "REFERENCED"
                );
                for t in &snaps {
                    let created = t.created.map_or("-".to_string(), fmt_ms);
                    println!(
                        "{:<40}  {:<6}  {:<23}  {:>9}  {:>10}",
                        t.name,
                        t.kind,
                        created,
                        fmt_bytes(t.exclusive.unwrap_or(0)),
                        fmt_bytes(t.referenced.unwrap_or(0))
                    );
                }
                println!("\n{} snapshot(s)", snaps.len());
            }
        }
        Action::SnapshotCreate(id, name) => {
            let t = project(&m, &id)
                .await?
                .create_snapshot(name.as_deref().unwrap_or(""))
                .await?;
            let t = SnapshotAnswer::from_bus(&t);
            if json_out {
                print_json(&t)?;
            } else {
                println!("{id}: snapshot {} taken", t.name);
            }
        }
        Action::SnapshotDelete(id, name) => {
            project(&m, &id).await?.delete_snapshot(&name).await?;
            if json_out {
                print_json(&api::SnapshotDone::Deleted(name))?;
            } else {
                println!("{id}: snapshot {name} deleted");
            }
        }
        Action::SnapshotRestore(id, name) => {
            project(&m, &id).await?.restore_snapshot(&name).await?;
            if json_out {
                print_json(&api::SnapshotDone::Restored(name))?;
            } else {
                println!("{id}: home restored from snapshot {name}");
            }
        }
        Action::MasterStatus => {
            let state = m.master_state().await?;
            let depth = m.outbox_depth().await?;
            if json_out {
                print_json(&json!({"state": state, "outbox_depth": depth}))?;
            } else {
                println!("master link: {state}");
                println!("outbox: {depth} report(s) waiting");
            }
        }
        Action::SnapshotSweep => {
            // always JSON: the timer's journal keeps it
            let a: api::SweepAnswer =
                serde_json::from_str(&m.sweep_snapshots().await?).map_err(|e| {
                    WireError::new(ErrorKind::Internal, format!("unexpected sweep answer: {e}"))
                })?;
            print_json(&a)?;
        }
        Action::Stop(id, force) => {
            let d = m.stop_project(&id.to_string(), force).await?;
            print_status(&id, &d, json_out)?;
        }
    }
    Ok(())
}

/// Runs the action on a small runtime and turns the outcome into an exit code, printing errors
/// as one line on stderr.
pub fn main(action: Action, json_out: bool) -> ExitCode {
    block_on(run(action, json_out))
}

/// Runs a command's future to its end on a small runtime; its exit code (errors printed as one
/// line on stderr). Shared by every subcommand module.
pub(crate) fn block_on(f: impl std::future::Future<Output = Result<(), CliError>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocalc-project-host: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("cocalc-project-host: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_in_utc() {
        assert_eq!(fmt_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_ms(1_795_966_945_890), "2026-11-29 15:42:25 UTC");
        assert_eq!(fmt_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn bus_errors_map_to_exit_codes() {
        let err = |name: &str| {
            let n = zbus::names::OwnedErrorName::try_from(name.to_string()).unwrap();
            let msg = zbus::message::Message::method_call("/", "X")
                .build(&())
                .unwrap();
            CliError::from(zbus::Error::MethodError(n, Some("m".into()), msg))
        };
        assert_eq!(
            err("com.cocalc.ProjectHost1.Error.NotFound").code,
            EXIT_NO_SUCH_PROJECT
        );
        assert_eq!(
            err("com.cocalc.ProjectHost1.Error.InvalidConfig").code,
            EXIT_USAGE
        );
        assert_eq!(
            err("com.cocalc.ProjectHost1.Error.StartFailed").code,
            EXIT_FAILURE
        );
        let d = err("org.freedesktop.DBus.Error.AccessDenied");
        assert_eq!(d.code, EXIT_FAILURE);
        assert!(d.message.contains("group cocalc-project-host"));
        assert_eq!(parse_id("nope").unwrap_err().code, EXIT_USAGE);
    }
}
