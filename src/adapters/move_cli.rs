//! The CLI's `move ID --to URL [--token T] [--pin sha256:HEX] [--no-start]`, over the bus like
//! the other commands (root or group `cocalc-project-host`): `MoveProjectWith` (the HTTP body's
//! JSON) starts (or resumes) the move, then
//! `GetOperation` is polled until it ends; a progress bar on a terminal, one line per phase
//! otherwise. Exit 0 when the project lives on the target, non-zero otherwise (the error
//! table's code when the daemon refused the move, 1 when it failed on the way). ^C cancels the
//! move (`CancelOperation`): the project stays whole here.
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use serde::Deserialize;

use super::cli::{CliError, EXIT_FAILURE};
use crate::domain::project::ProjectId;

/// How often the operation is asked for.
const POLL: Duration = Duration::from_millis(200);
/// The environment variable the move token may come from (instead of `--token`, which other
/// local users can read in the process list).
pub const TOKEN_ENV: &str = "COCALC_MOVE_TOKEN";

#[zbus::proxy(
    interface = "com.cocalc.ProjectHost1.Manager",
    default_service = "com.cocalc.ProjectHost1",
    default_path = "/com/cocalc/ProjectHost1"
)]
pub(super) trait Moves {
    fn move_project_with(&self, id: &str, body_json: &str) -> zbus::Result<String>;
    fn get_operation(&self, op: &str) -> zbus::Result<String>;
    fn cancel_operation(&self, op: &str) -> zbus::Result<String>;
}

/// What the CLI reads of an operation (`core::moves::OperationView` as JSON).
#[derive(Debug, Deserialize)]
pub struct View {
    /// the operation
    pub op: String,
    /// its phase
    pub phase: String,
    /// bytes sent
    #[serde(default)]
    pub bytes_sent: u64,
    /// bytes per second
    #[serde(default)]
    pub rate: u64,
    /// the downtime, once known
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// why it failed
    #[serde(default)]
    pub error: Option<String>,
    /// subvolumes sent whole
    #[serde(default)]
    pub sent: Vec<String>,
    /// subvolumes the target held already
    #[serde(default)]
    pub skipped: Vec<String>,
    /// whether a retry resumes it
    #[serde(default)]
    pub resumable: bool,
}

fn parse(s: &str) -> Result<View, CliError> {
    serde_json::from_str(s).map_err(|e| CliError {
        code: EXIT_FAILURE,
        message: format!("unexpected operation from the daemon: {e}"),
    })
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// One progress line: a bar while sending (its length grows with the subvolumes sent, the total
/// is not known in advance), the phase, bytes, rate.
pub fn progress_line(v: &View, tick: usize) -> String {
    const W: usize = 20;
    let done = v.sent.len() + v.skipped.len();
    let bar: String = if matches!(v.phase.as_str(), "done" | "deleting_source") {
        "#".repeat(W)
    } else {
        let filled = (done * 3).min(W - 1);
        let mut b = "#".repeat(filled);
        let spin = ['|', '/', '-', '\\'][tick % 4];
        b.push(spin);
        b.push_str(&" ".repeat(W - filled - 1));
        b
    };
    format!(
        "[{bar}] {:<15} {:>10} {:>10}/s  {} subvolume(s){}",
        v.phase,
        human_bytes(v.bytes_sent),
        human_bytes(v.rate),
        done,
        v.downtime_ms
            .map(|d| format!("  downtime {d} ms"))
            .unwrap_or_default()
    )
}

/// `--pin`'s value: `sha256:` and the certificate's hash (the prefix may be left out); the daemon
/// checks the hash itself as `master.pin_sha256`.
pub fn pin_arg(s: &str) -> String {
    s.strip_prefix("sha256:").unwrap_or(s).to_string()
}

/// `move ID --to URL`: runs the move to its end.
pub async fn run(
    id: ProjectId,
    target: String,
    token: Option<String>,
    pin: Option<String>,
    start: bool,
) -> Result<(), CliError> {
    let token = match token.or_else(|| std::env::var(TOKEN_ENV).ok()) {
        Some(t) if !t.is_empty() => t,
        _ => {
            return Err(CliError {
                code: super::cli::EXIT_USAGE,
                message: format!(
                    "a move token for the target is needed: --token T or {TOKEN_ENV}=T"
                ),
            });
        }
    };
    let conn = zbus::Connection::system().await?;
    let p = MovesProxy::new(&conn).await?;
    let body = super::moves::MoveBody {
        target: target.clone(),
        token,
        start,
        pin_sha256: pin.as_deref().map(pin_arg),
    };
    let body = serde_json::to_string(&body).map_err(|e| CliError {
        code: EXIT_FAILURE,
        message: e.to_string(),
    })?;
    let v = parse(&p.move_project_with(&id.to_string(), &body).await?)?;
    let op = v.op.clone();
    let tty = std::io::stderr().is_terminal();
    if !tty {
        eprintln!("move {op}: project {id} to {target}");
    }
    let mut last_phase = String::new();
    let mut tick = 0usize;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut cancelled = false;
    let v = loop {
        let v = parse(&p.get_operation(&op).await?)?;
        if tty {
            eprint!("\r\x1b[2K{}", progress_line(&v, tick));
            let _ = std::io::stderr().flush();
        } else if v.phase != last_phase {
            eprintln!(
                "{}: {} sent, {}/s",
                v.phase,
                human_bytes(v.bytes_sent),
                human_bytes(v.rate)
            );
        }
        last_phase.clone_from(&v.phase);
        if matches!(v.phase.as_str(), "done" | "failed") {
            break v;
        }
        tick += 1;
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                if tty { eprintln!(); }
                eprintln!("cancelling move {op}");
                p.cancel_operation(&op).await?;
            }
        }
    };
    if tty {
        eprintln!();
    }
    if v.phase == "done" {
        println!(
            "project {id} moved to {target} (operation {op}, {} sent{})",
            human_bytes(v.bytes_sent),
            v.downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    Err(CliError {
        code: EXIT_FAILURE,
        message: format!(
            "move {op} failed: {}{}",
            v.error.as_deref().unwrap_or("unknown error"),
            if v.resumable {
                " (the project is whole here; run the same command again to resume)"
            } else {
                " (the project is whole here)"
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_option_drops_its_sha256_prefix_only() {
        let h = "ab".repeat(32);
        assert_eq!(pin_arg(&format!("sha256:{h}")), h);
        assert_eq!(pin_arg(&h), h);
        // anything else reaches the daemon as given, which refuses it (400 / InvalidBody)
        assert_eq!(pin_arg("md5:ab"), "md5:ab");
    }

    #[test]
    fn progress_lines() {
        let v: View = serde_json::from_str(
            r#"{"op":"x","phase":"precopy","bytes_sent":1572864,"rate":1048576,"sent":["a"],"skipped":[]}"#,
        )
        .unwrap();
        let l = progress_line(&v, 1);
        assert!(l.starts_with("[###/"), "{l}");
        assert!(
            l.contains("precopy") && l.contains("1.5 MiB") && l.contains("1.0 MiB/s"),
            "{l}"
        );
        let v: View = serde_json::from_str(
            r#"{"op":"x","phase":"done","bytes_sent":10,"rate":1,"downtime_ms":812}"#,
        )
        .unwrap();
        let l = progress_line(&v, 0);
        assert!(
            l.contains(&"#".repeat(20)) && l.contains("downtime 812 ms"),
            "{l}"
        );
        assert_eq!(human_bytes(0), "0 B");
        assert!(parse("nope").is_err());
    }
}
