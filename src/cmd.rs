//! The one runner for external programs (podman, btrfs, mkfs, mount, journalctl): logs the argv,
//! enforces a timeout, and folds the tail of stderr into the error.
use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// An external program failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// It could not be started (missing binary, …).
    #[error("{program}: cannot run: {source}")]
    Spawn {
        /// argv[0]
        program: String,
        /// why
        source: std::io::Error,
    },
    /// It ran longer than allowed and was killed.
    #[error("{program}: timed out after {secs}s")]
    Timeout {
        /// argv[0]
        program: String,
        /// the limit
        secs: u64,
    },
    /// It exited unsuccessfully.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// argv[0]
        program: String,
        /// exit status
        status: String,
        /// last lines of stderr
        stderr: String,
    },
}

/// Runs `program args…` with a timeout; returns stdout on success.
pub async fn run<I, S>(program: &str, args: I, timeout: Duration) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_env(program, args, &[], timeout).await
}

/// [`run`] with extra environment variables (e.g. `TZ=UTC0` for a tool that prints local times).
pub async fn run_env<I, S>(
    program: &str,
    args: I,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    tracing::debug!(program, args = ?args, "run");
    let child = Command::new(program)
        .args(&args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CmdError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| CmdError::Spawn {
            program: program.to_owned(),
            source,
        })?,
        Err(_) => {
            return Err(CmdError::Timeout {
                program: program.to_owned(),
                secs: timeout.as_secs(),
            });
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CmdError::Failed {
            program: program.to_owned(),
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 5),
        })
    }
}

/// The last `n` non-empty lines of `s`, joined with "; ".
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

/// Starts `program args…` with stdout and stderr piped, for a caller that streams its output
/// (`btrfs send`); the child is killed when dropped. The caller waits for it and reads stderr.
pub fn spawn_piped<I, S>(program: &str, args: I) -> Result<tokio::process::Child, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    tracing::debug!(program, args = ?args, "spawn");
    Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CmdError::Spawn {
            program: program.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_and_reports_failures_with_stderr() {
        let t = Duration::from_secs(5);
        assert_eq!(run("sh", ["-c", "echo hi"], t).await.unwrap(), "hi\n");
        let e = run("sh", ["-c", "echo one >&2; echo two >&2; exit 3"], t)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "sh failed (exit status: 3): one; two");
        let e = run("/nonexistent/prog", ["x"], t).await.unwrap_err();
        assert!(matches!(e, CmdError::Spawn { .. }), "{e}");
        let e = run("sleep", ["5"], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, CmdError::Timeout { .. }), "{e}");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b; c");
        assert_eq!(tail("", 2), "");
    }
}
