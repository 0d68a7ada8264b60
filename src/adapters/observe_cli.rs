//! The CLI's `logs`, `events` and `top`, over the bus like the other commands (root or group
//! `cocalc-project-host`): `logs` asks `GetProjectLogs` and follows by asking again after the last
//! cursor; `events` polls `GetEvents` after the last id; `top` (see `super::top`) reads `GetTop`.
//! Polling keeps the bus API plain method calls (no per-client stream state in the daemon).
use std::process::ExitCode;
use std::time::Duration;

use super::cli::CliError;
use super::dbus::{BUS_NAME, MANAGER_PATH};
use crate::api::{ErrorKind, EventAnswer, LogAnswer, WireError};
use crate::core::Replay;
use crate::domain::project::ProjectId;
use crate::ports::LogQuery;

/// How often `logs -f` and `events` ask again.
const POLL: Duration = Duration::from_millis(250);

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Manager",
    default_service = "com.cocalc.ProjectHost1",
    default_path = "/com/cocalc/ProjectHost1"
)]
pub(super) trait Observe {
    fn get_project_logs(&self, id: &str, lines: u32, since: &str) -> zbus::Result<Vec<String>>;
    fn get_events(&self, after: u64) -> zbus::Result<(u64, Vec<String>)>;
    #[allow(clippy::type_complexity)]
    fn get_top(&self) -> zbus::Result<Vec<(String, String, u64, u64, u64, u64, u64)>>;
}

/// The query of `GetProjectLogs` (`lines` 0: the default; `since` `""`: none).
pub fn log_query(lines: u32, since: &str) -> Result<LogQuery, WireError> {
    let max = crate::backends::journal_read::MAX_LINES;
    if lines > max {
        return Err(WireError::new(
            ErrorKind::InvalidQuery,
            format!("lines: at most {max}"),
        ));
    }
    Ok(LogQuery {
        lines: if lines == 0 {
            crate::backends::journal_read::DEFAULT_LINES
        } else {
            lines
        },
        since: match since {
            "" => None,
            s => Some(super::sse::log_since(s)?),
        },
    })
}

/// A replay of the event ring as `GetEvents` answers it: the newest id, and JSON events (a
/// `lost` one first for a gap).
pub fn replay(r: &Replay) -> (u64, Vec<String>) {
    let mut out = Vec::with_capacity(r.events.len() + 1);
    if let Some((from, to)) = r.lost {
        let e = EventAnswer::lost(from, to, crate::core::now_ms());
        out.push(serde_json::to_string(&e).unwrap_or_default());
    }
    for n in &r.events {
        out.push(serde_json::to_string(&EventAnswer::from(n)).unwrap_or_default());
    }
    (r.newest, out)
}

pub(super) async fn proxy() -> Result<ObserveProxy<'static>, CliError> {
    let conn = zbus::Connection::system().await?;
    Ok(ObserveProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await?)
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, CliError> {
    serde_json::from_str(s).map_err(|e| {
        CliError::from(WireError::new(
            ErrorKind::Internal,
            format!("cannot decode the daemon's answer: {e}"),
        ))
    })
}

/// One log line for a person: `time  message` (warnings and worse marked).
fn human_log(l: &LogAnswer) -> String {
    let time = l.time.get(..23).unwrap_or(&l.time).replace('T', " ");
    let mark = match l.priority {
        0..=3 => " ERR",
        4 => " WRN",
        _ => "",
    };
    format!("{time}{mark} {}", l.message)
}

fn human_event(e: &EventAnswer) -> String {
    let time = crate::domain::snapshots::utc(e.time).strftime("%Y-%m-%d %H:%M:%S");
    let what = match e.kind.as_str() {
        "lost" => format!(
            "events {}..{} were lost (not kept)",
            e.from.unwrap_or(0),
            e.to.unwrap_or(0)
        ),
        "state" => e.state.clone().unwrap_or_default(),
        "start_failed" => format!("start failed: {}", e.reason.as_deref().unwrap_or("")),
        "snapshot_created" | "snapshot_deleted" => {
            format!("{} {}", e.kind, e.name.as_deref().unwrap_or(""))
        }
        "quota_hit" => format!(
            "disk quota reached: {} of {} bytes",
            e.used.unwrap_or(0),
            e.quota.unwrap_or(0)
        ),
        other => other.to_string(),
    };
    format!(
        "{time} {:>20} {} {what}",
        e.id,
        e.project_id.as_deref().unwrap_or("-")
    )
}

/// `logs ID [-n N] [-f] [--json]`.
pub async fn logs(id: ProjectId, lines: u32, follow: bool, json: bool) -> Result<(), CliError> {
    // checked here too: a bad count is a usage error before any bus call
    log_query(lines, "")?;
    let p = proxy().await?;
    let id = id.to_string();
    let mut since = String::new();
    let mut lines = lines;
    loop {
        for s in p.get_project_logs(&id, lines, &since).await? {
            let l: LogAnswer = parse(&s)?;
            if json {
                println!("{s}");
            } else {
                println!("{}", human_log(&l));
            }
            since = l.cursor;
        }
        if !follow {
            return Ok(());
        }
        if since.is_empty() {
            // nothing yet: from now on (µs), not the whole journal
            since = (crate::core::now_ms() * 1000).to_string();
        }
        lines = crate::backends::journal_read::MAX_LINES;
        tokio::time::sleep(POLL).await;
    }
}

/// `events [--json]`: follows from now until interrupted.
pub async fn events(json: bool) -> Result<(), CliError> {
    let p = proxy().await?;
    let (mut after, _) = p.get_events(0).await?;
    loop {
        tokio::time::sleep(POLL).await;
        let (newest, evs) = p.get_events(after.max(1)).await?;
        for s in &evs {
            let e: EventAnswer = parse(s)?;
            if json {
                println!("{s}");
            } else {
                println!("{}", human_event(&e));
            }
        }
        after = newest;
    }
}

/// Runs a future of these commands to its end on a small runtime; the exit code.
pub fn main(f: impl std::future::Future<Output = Result<(), CliError>>) -> ExitCode {
    super::cli::block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_queries_from_the_bus_are_checked() {
        assert_eq!(log_query(0, "").unwrap(), LogQuery::default());
        assert_eq!(log_query(5, "").unwrap().lines, 5);
        assert_eq!(
            log_query(10_001, "").unwrap_err().kind,
            ErrorKind::InvalidQuery
        );
        assert_eq!(
            log_query(1, "--flag").unwrap_err().kind,
            ErrorKind::InvalidQuery
        );
    }

    #[test]
    fn human_lines() {
        let l = LogAnswer {
            cursor: "c".into(),
            time: "2026-12-02T00:25:38.739531Z".into(),
            usec: 0,
            priority: 3,
            message: "boom".into(),
            suppressed: None,
        };
        assert_eq!(human_log(&l), "2026-12-02 00:25:38.739 ERR boom");
        let e = EventAnswer::lost(3, 9, 0);
        assert!(human_event(&e).ends_with("- events 3..9 were lost (not kept)"));
    }
}
