//! One SSH `session` channel: its requests (`pty-req`, `env`, `window-change`, then one of
//! `shell`, `exec`, `subsystem`), the process it runs in the project, and the streams between
//! the two. Output goes out as the client's window allows (flow control); input waits while the
//! process's stdin is full, which holds back the connection's reads (TCP backpressure).
use std::sync::Arc;

use russh::ChannelId;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::AsyncWriteExt;

use super::Ctx;
use crate::backends::session::{self, Exit, PtySpec, SessionIo, SessionSpec};
use crate::domain::project::ProjectId;

/// Most `env` requests honoured per channel.
const MAX_ENV: usize = 32;
/// Longest `env` value passed.
const MAX_ENV_VALUE: usize = 4096;

/// Whether the client may set this variable (`env` request): the locale and the terminal only.
pub fn env_allowed(name: &str) -> bool {
    name == "LANG"
        || name == "TERM"
        || (name.starts_with("LC_") && name.len() > 3)
            && name[3..]
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_')
}

/// What the channel was asked to run.
enum Run {
    Command(Option<String>),
    Sftp,
}

/// Serves one session channel to its end.
pub async fn run(ch: Channel<Msg>, handle: Handle, ctx: Arc<Ctx>, id: ProjectId) {
    let mut ch = ch;
    let chid = ch.id();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut pty: Option<PtySpec> = None;
    let run = loop {
        let Some(msg) = ch.wait().await else { return };
        let ok = match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            } => {
                pty = Some(PtySpec {
                    term: term.chars().take(64).collect(),
                    cols: clamp(col_width),
                    rows: clamp(row_height),
                });
                true
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                let ok = env_allowed(&variable_name)
                    && env.len() < MAX_ENV
                    && variable_value.len() <= MAX_ENV_VALUE
                    && !variable_value.contains('\0');
                if ok {
                    env.push((variable_name, variable_value));
                }
                ok
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Some(p) = pty.as_mut() {
                    p.cols = clamp(col_width);
                    p.rows = clamp(row_height);
                }
                continue;
            }
            ChannelMsg::RequestShell { .. } => break Run::Command(None),
            ChannelMsg::Exec { command, .. } => match String::from_utf8(command) {
                Ok(c) if !c.contains('\0') => break Run::Command(Some(c)),
                _ => false,
            },
            ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" => break Run::Sftp,
            ChannelMsg::RequestSubsystem { .. } => false,
            ChannelMsg::Eof => continue,
            ChannelMsg::Close => return,
            _ => continue,
        };
        let _ = if ok {
            handle.channel_success(chid).await
        } else {
            handle.channel_failure(chid).await
        };
    };
    match run {
        Run::Sftp => super::sftp::run(ch, handle, ctx, id).await,
        Run::Command(command) => {
            if let Some(p) = &pty {
                // the client's TERM unless it set one through `env`
                if !env.iter().any(|(k, _)| k == "TERM") && !p.term.is_empty() {
                    env.push(("TERM".into(), p.term.clone()));
                }
            }
            let spec = SessionSpec {
                id,
                command,
                env,
                pty,
            };
            let (rd, wr) = ch.split();
            run_process(rd, wr, handle, ctx, spec).await;
        }
    }
}

fn clamp(v: u32) -> u16 {
    v.clamp(1, 10_000) as u16
}

/// Ends the channel with a message on stderr and an exit status.
pub async fn refuse(wr: &ChannelWriteHalf<Msg>, handle: &Handle, chid: ChannelId, msg: &str) {
    let _ = handle.channel_failure(chid).await;
    let _ = wr
        .extended_data_bytes(1, format!("cocalc-project-host: {msg}\r\n").into_bytes())
        .await;
    let _ = wr.exit_status(1).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

/// Makes sure the project runs: thaws it when frozen, starts it when `ssh.autostart` says so;
/// the guard keeps it from being frozen or stopped for being idle while the session lasts
/// (`Host::open_session`). `Err` is the user's message.
pub async fn ensure_running(ctx: &Ctx, id: ProjectId) -> Result<crate::core::SessionGuard, String> {
    match ctx.host.open_session(id, ctx.autostart).await {
        Ok(g) => Ok(g),
        Err(crate::core::Error::ProjectNotRunning(_)) if !ctx.autostart => Err(format!(
            "project {id} is not running: start it first (this host does not start projects on login)"
        )),
        Err(crate::core::Error::ProjectNotRunning(_)) => Err(format!("project {id} did not start")),
        Err(e) => Err(format!("project {id} could not be started: {e}")),
    }
}

async fn run_process(
    mut rd: ChannelReadHalf,
    wr: ChannelWriteHalf<Msg>,
    handle: Handle,
    ctx: Arc<Ctx>,
    spec: SessionSpec,
) {
    let chid = wr.id();
    let id = spec.id;
    let _held = match ensure_running(&ctx, id).await {
        Ok(g) => g,
        Err(m) => return refuse(&wr, &handle, chid, &m).await,
    };
    let mut events = ctx.host.subscribe();
    let s = match ctx.runner.spawn(spec).await {
        Ok(s) => s,
        Err(m) => return refuse(&wr, &handle, chid, &m).await,
    };
    let _ = handle.channel_success(chid).await;
    tracing::info!(project_id = %id, "ssh session started");
    let session::Session { io, ctl } = s;
    // input: the client's data, EOF, resizes; ends when the client closes the channel
    let (mut stdin, master, out, err) = match io {
        SessionIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => (Some(stdin), None, stdout, Some(stderr)),
        SessionIo::Pty {
            input,
            output,
            master,
        } => (Some(input), Some(master), output, None),
    };
    let input = async {
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                // a terminal's EOF is ^D, typed by the client; a pipe's is its close
                ChannelMsg::Eof if master.is_none() => stdin = None,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => {
                    if let Some(m) = &master {
                        let _ = session::resize(m, clamp(col_width), clamp(row_height));
                    }
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    let output = async {
        let o = wr.data(out);
        match err {
            Some(e) => {
                let _ = tokio::join!(o, wr.extended_data(1, e));
            }
            None => {
                let _ = o.await;
            }
        }
    };
    // the project stopping ends the session (podman exec ends with the container)
    let stopped = async {
        loop {
            match events.recv().await {
                Ok(crate::core::HostEvent::State(p, st)) if p == id && !st.is_up() => {
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
                _ => {}
            }
        }
    };
    let mut project_stopped = false;
    tokio::select! {
        () = output => {}
        () = input => {
            // the client closed the channel: end the process as sshd would (SIGHUP)
            ctl.stop().await;
            let exit = ctl.wait().await;
            tracing::info!(project_id = %id, ?exit, "ssh session closed by the client");
            return;
        }
        () = stopped => { project_stopped = true; }
    }
    if project_stopped || !ctx.host.is_running(id) {
        let _ = wr
            .extended_data_bytes(
                1,
                format!("\r\ncocalc-project-host: project {id} stopped; closing the session\r\n")
                    .into_bytes(),
            )
            .await;
        ctl.stop().await;
    }
    let exit = ctl.wait().await;
    tracing::info!(project_id = %id, ?exit, "ssh session ended");
    let _ = match exit {
        Exit::Code(c) => wr.exit_status(c).await,
        // no portable name for every signal on the wire: the shell's 128+n convention
        Exit::Signal(s) => wr.exit_status(128 + s.unsigned_abs()).await,
        Exit::Unknown => wr.exit_status(255).await,
    };
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_locale_and_term_pass() {
        for ok in ["LANG", "TERM", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"] {
            assert!(env_allowed(ok), "{ok}");
        }
        for no in [
            "LC_",
            "LC_all",
            "LD_PRELOAD",
            "PATH",
            "HOME",
            "BASH_ENV",
            "lang",
            "TERMCAP",
            "LANGX",
        ] {
            assert!(!env_allowed(no), "{no}");
        }
    }
}
