//! The admin CLI's client side: `list`, `status`, `start`, `stop` over the D-Bus API, as
//! `systemctl` is a client of systemd. Human output by default, `--json` for scripts; exit codes
//! as systemctl: 0 ok, 1 failure, 2 usage, 4 no such project.
use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use serde_json::{Value, json};
use zbus::{OwnedObjectPath, OwnedVariant};

use crate::dbus::{BUS_NAME, MANAGER_PATH};
use crate::project::{ProjectId, RunConfig};

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Manager",
    default_service = "com.cocalc.ProjectHost1",
    default_path = "/com/cocalc/ProjectHost1"
)]
trait Manager {
    fn list_projects(&self) -> zbus::Result<Vec<(String, String, u64, OwnedObjectPath)>>;
    fn get_project(&self, id: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_project_status(&self, id: &str) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn start_project(
        &self,
        id: &str,
        config_json: &str,
    ) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn stop_project(&self, id: &str, force: bool) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn set_project_limits(
        &self,
        id: &str,
        limits_json: &str,
    ) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn sweep_snapshots(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Project",
    default_service = "com.cocalc.ProjectHost1"
)]
trait Project {
    fn list_snapshots(&self) -> zbus::Result<Vec<(String, String, u64, u64, u64)>>;
    fn create_snapshot(&self, name: &str) -> zbus::Result<(String, String, u64, u64, u64)>;
    fn delete_snapshot(&self, name: &str) -> zbus::Result<()>;
    fn restore_snapshot(&self, name: &str) -> zbus::Result<()>;
    fn set_disk_quota(&self, bytes: u64) -> zbus::Result<()>;
}

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage (invalid id, bad option value).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no such project.
pub const EXIT_NO_SUCH_PROJECT: u8 = 4;

/// A CLI failure: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    /// exit code
    pub code: u8,
    /// what went wrong, one line
    pub message: String,
}

impl CliError {
    fn usage(m: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_USAGE,
            message: m.into(),
        }
    }
}

impl From<zbus::Error> for CliError {
    fn from(e: zbus::Error) -> CliError {
        match &e {
            zbus::Error::MethodError(name, msg, _) => {
                let short = name.as_str().rsplit('.').next().unwrap_or_default();
                let code = match short {
                    "NotFound" | "NoSuchSnapshot" => EXIT_NO_SUCH_PROJECT,
                    "InvalidProjectId"
                    | "InvalidConfig"
                    | "InvalidSnapshotName"
                    | "ImageNotAllowed" => EXIT_USAGE,
                    _ => EXIT_FAILURE,
                };
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
    s.parse()
        .map_err(|e: crate::project::InvalidProjectId| CliError::usage(e.to_string()))
}

fn variant_json(v: &OwnedVariant) -> Value {
    if let Ok(s) = String::try_from(v.try_clone().unwrap_or_else(|_| OwnedVariant::from(0u8))) {
        return Value::from(s);
    }
    if let Ok(n) = u64::try_from(v) {
        return Value::from(n);
    }
    if let Ok(b) = bool::try_from(v) {
        return Value::from(b);
    }
    if let Ok(f) = f64::try_from(v) {
        return Value::from(f);
    }
    if let Ok(n) = u32::try_from(v) {
        return Value::from(n);
    }
    Value::Null
}

/// A status dict as JSON, in the HTTP API's shape.
pub fn status_json(d: &HashMap<String, OwnedVariant>) -> Value {
    let mut m = serde_json::Map::new();
    let mut keys: Vec<&String> = d.keys().collect();
    keys.sort();
    for k in keys {
        m.insert(k.clone(), variant_json(&d[k]));
    }
    Value::Object(m)
}

/// `state` padded to `width`, coloured when writing to a terminal.
fn colour(state: &str, width: usize, tty: bool) -> String {
    let padded = format!("{state:<width$}");
    let c = match state {
        "running" => "32",
        "starting" | "stopping" => "33",
        _ => return padded,
    };
    if tty {
        format!("\x1b[{c}m{padded}\x1b[0m")
    } else {
        padded
    }
}

fn fmt_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = crate::snapshots::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_status(id: &ProjectId, v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
        return;
    }
    let tty = std::io::stdout().is_terminal();
    let state = v["state"].as_str().unwrap_or("unknown");
    println!("{id}: {}", colour(state, 0, tty));
    for (label, key) in [
        ("unit", "unit"),
        ("sub-state", "sub_state"),
        ("main pid", "main_pid"),
        ("memory", "memory_current"),
        ("server", "server"),
    ] {
        match &v[key] {
            Value::Null => {}
            Value::String(s) => println!("  {label:>10}: {s}"),
            other => println!("  {label:>10}: {other}"),
        }
    }
    if let Some(t) = v["started_at"].as_u64() {
        println!("  {:>10}: {}", "started", fmt_ms(t));
    }
}

async fn manager() -> Result<ManagerProxy<'static>, CliError> {
    let conn = zbus::Connection::system().await?;
    Ok(ManagerProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await?)
}

/// What the CLI was asked to do.
#[derive(Debug)]
pub enum Action {
    /// `list`
    List,
    /// `status ID`
    Status(ProjectId),
    /// `start ID [config]`
    Start(ProjectId, RunConfig),
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

fn snapshot_json(t: &(String, String, u64, u64, u64)) -> Value {
    let opt = |n: u64| if n == 0 { Value::Null } else { Value::from(n) };
    json!({"name": t.0, "kind": t.1, "created": opt(t.2), "exclusive": opt(t.3), "referenced": opt(t.4)})
}

fn fmt_bytes(n: u64) -> String {
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
            let v = status_json(&m.get_project_status(&id.to_string()).await?);
            print_status(&id, &v, json_out);
        }
        Action::Start(id, cfg) => {
            let cfg_json = if cfg == RunConfig::default() {
                String::new()
            } else {
                serde_json::to_string(&cfg).map_err(|e| CliError::usage(e.to_string()))?
            };
            let v = status_json(&m.start_project(&id.to_string(), &cfg_json).await?);
            print_status(&id, &v, json_out);
        }
        Action::SetLimits(id, patch) => {
            let d = m
                .set_project_limits(&id.to_string(), &patch.to_string())
                .await?;
            let v = status_json(&d);
            if json_out {
                println!("{v}");
            } else {
                let when = if v["live"] == true {
                    "now"
                } else {
                    "at its next start"
                };
                println!("{id}: limits in force {when}");
                for k in ["memory", "swap", "cpu", "pids", "cpu_weight", "io_weight"] {
                    println!("  {k:>10}: {}", v[k]);
                }
            }
        }
        Action::SetQuota(id, bytes) => {
            project(&m, &id)
                .await?
                .set_disk_quota(bytes.unwrap_or(0))
                .await?;
            let v = status_json(&m.get_project_status(&id.to_string()).await?);
            print_status(&id, &v, json_out);
        }
        Action::SnapshotList(id) => {
            let snaps = project(&m, &id).await?.list_snapshots().await?;
            if json_out {
                println!(
                    "{}",
                    json!({ "snapshots": snaps.iter().map(snapshot_json).collect::<Vec<_>>() })
                );
            } else {
                println!(
                    "{:<40}  {:<6}  {:<23}  {:>9}  {:>10}",
                    "NAME", "KIND", "CREATED", "EXCLUSIVE", "REFERENCED"
                );
                for t in &snaps {
                    let created = if t.2 == 0 {
                        "-".to_string()
                    } else {
                        fmt_ms(t.2)
                    };
                    println!(
                        "{:<40}  {:<6}  {:<23}  {:>9}  {:>10}",
                        t.0,
                        t.1,
                        created,
                        fmt_bytes(t.3),
                        fmt_bytes(t.4)
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
            if json_out {
                println!("{}", snapshot_json(&t));
            } else {
                println!("{id}: snapshot {} taken", t.0);
            }
        }
        Action::SnapshotDelete(id, name) => {
            project(&m, &id).await?.delete_snapshot(&name).await?;
            if json_out {
                println!("{}", json!({ "deleted": name }));
            } else {
                println!("{id}: snapshot {name} deleted");
            }
        }
        Action::SnapshotRestore(id, name) => {
            project(&m, &id).await?.restore_snapshot(&name).await?;
            if json_out {
                println!("{}", json!({ "restored": name }));
            } else {
                println!("{id}: home restored from snapshot {name}");
            }
        }
        Action::SnapshotSweep => {
            // always JSON: the timer's journal keeps it
            println!("{}", m.sweep_snapshots().await?);
        }
        Action::Stop(id, force) => {
            let v = status_json(&m.stop_project(&id.to_string(), force).await?);
            print_status(&id, &v, json_out);
        }
    }
    Ok(())
}

/// Runs the action on a small runtime and turns the outcome into an exit code, printing errors
/// as one line on stderr.
pub fn main(action: Action, json_out: bool) -> ExitCode {
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
    match rt.block_on(run(action, json_out)) {
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
