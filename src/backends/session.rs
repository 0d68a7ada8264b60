//! Processes inside a running project for the SSH server: `podman exec` as the project user, run
//! as a transient systemd unit (the daemon's sandbox allows no namespace joining; podman runs
//! outside it, as every podman call of the host does). The exec'd process gets the container's
//! own env, `HOME`, working directory, user, seccomp profile, capabilities and cgroup (its
//! limits and its quota). Its stdio are pipes or a pty the daemon holds, passed to the unit by
//! file descriptor (`StandardInputFileDescriptor=` …) or by path (`TTYPath=`, which also makes
//! the pty the unit's controlling terminal, so a resize reaches podman as SIGWINCH and podman
//! resizes the container's own pty). The exit status is the unit's `ExecMainStatus`: the unit
//! stays loaded while the daemon holds a reference (`AddRef=`) and is collected after.
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::unix::pipe;
use zbus::Fd;
use zbus::Variant;

use crate::backends::podman;
use crate::backends::systemd::{Systemd, SystemdError};
use crate::domain::project::ProjectId;

/// The pty a session asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    /// `TERM` of the client
    pub term: String,
    /// columns
    pub cols: u16,
    /// rows
    pub rows: u16,
}

/// What to run in a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// the project (running)
    pub id: ProjectId,
    /// `None`: a login shell; `Some(cmd)`: `sh -c cmd`
    pub command: Option<String>,
    /// extra environment (the SSH `env` allow-list, `TERM`)
    pub env: Vec<(String, String)>,
    /// a pty, or plain pipes
    pub pty: Option<PtySpec>,
}

/// The daemon's ends of a session's stdio.
#[derive(Debug)]
pub enum SessionIo {
    /// stdin, stdout, stderr as pipes
    Pipes {
        /// to the process's stdin
        stdin: pipe::Sender,
        /// from its stdout
        stdout: pipe::Receiver,
        /// from its stderr
        stderr: pipe::Receiver,
    },
    /// a pty: the master, for reading and writing (two fds of it), and one for resizing
    Pty {
        /// writes to the terminal
        input: pipe::Sender,
        /// reads from it (EIO once the last process holding the terminal exits)
        output: pipe::Receiver,
        /// the master, for `TIOCSWINSZ`
        master: OwnedFd,
    },
}

/// How a session's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// exited with this status
    Code(u32),
    /// killed by this signal
    Signal(i32),
    /// unknown (the unit vanished before its status could be read)
    Unknown,
}

/// A session's process, for waiting on and stopping it.
#[async_trait]
pub trait SessionCtl: Send + Sync + std::fmt::Debug {
    /// Waits until the process has exited (call once its output has ended); its exit.
    async fn wait(&self) -> Exit;
    /// Stops the process (the client went away).
    async fn stop(&self);
}

/// A started session.
#[derive(Debug)]
pub struct Session {
    /// the daemon's ends of its stdio
    pub io: SessionIo,
    /// its process
    pub ctl: Box<dyn SessionCtl>,
}

/// Starts sessions in projects (the real one: [`SystemdSessions`]).
#[async_trait]
pub trait SessionRunner: Send + Sync + std::fmt::Debug {
    /// Starts `spec`; the error is one line for the user.
    async fn spawn(&self, spec: SessionSpec) -> Result<Session, String>;
}

/// Resizes a session's pty (podman, its controlling process, gets SIGWINCH).
pub fn resize(master: &OwnedFd, cols: u16, rows: u16) -> std::io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// The command line inside the container: a login shell (bash when the image has it), or the
/// client's command through `sh -c`, as sshd runs it through the user's shell.
pub fn inner_argv(command: Option<&str>) -> Vec<String> {
    let script = match command {
        None => "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi",
        Some(c) => c,
    };
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// `podman exec` of a session: interactive (stdin kept open), with a terminal when asked, as
/// the container's user in its working directory (both from `podman run`), plus `env`.
pub fn exec_argv(spec: &SessionSpec) -> Vec<String> {
    let mut a = vec![podman::PODMAN.to_string(), "exec".into(), "-i".into()];
    if spec.pty.is_some() {
        a.push("-t".into());
    }
    for (k, v) in &spec.env {
        a.push(format!("--env={k}={v}"));
    }
    a.push("--".into());
    a.push(spec.id.container_name());
    a.extend(inner_argv(spec.command.as_deref()));
    a
}

/// Sessions as transient units over systemd (see the module doc).
#[derive(Debug)]
pub struct SystemdSessions {
    systemd: Systemd,
}

impl SystemdSessions {
    /// Connects to systemd on the system bus.
    pub async fn connect() -> Result<SystemdSessions, SystemdError> {
        Ok(SystemdSessions {
            systemd: Systemd::connect().await?,
        })
    }
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A new pty: (master, path of the slave, the slave opened, so the terminal is not hung up
/// before the unit opens it).
fn open_pty(cols: u16, rows: u16) -> Result<(OwnedFd, String, OwnedFd), String> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let e = |e: rustix::io::Errno| format!("cannot allocate a pty: {e}");
    let master =
        openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).map_err(e)?;
    grantpt(&master).map_err(e)?;
    unlockpt(&master).map_err(e)?;
    let path = ptsname(&master, Vec::new())
        .map_err(e)?
        .into_string()
        .map_err(|_| "pty name is not UTF-8".to_string())?;
    let slave = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(e)?;
    resize(&master, cols, rows).map_err(io_err("cannot size the pty"))?;
    rustix::io::ioctl_fionbio(&master, true).map_err(e)?;
    Ok((master, path, slave))
}

#[async_trait]
impl SessionRunner for SystemdSessions {
    async fn spawn(&self, spec: SessionSpec) -> Result<Session, String> {
        let unit = format!(
            "cocalc-ssh-{}-{}.service",
            spec.id,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let argv = exec_argv(&spec);
        let mut props: Vec<(&str, Variant<'_>)> = vec![
            (
                "Description",
                Variant::from(format!("SSH session into CoCalc project {}", spec.id)),
            ),
            ("Type", Variant::from("exec".to_string())),
            ("AddRef", Variant::from(true)),
            (
                "CollectMode",
                Variant::from("inactive-or-failed".to_string()),
            ),
            (
                "ExecStart",
                Variant::from(vec![(argv[0].clone(), argv.clone(), false)]),
            ),
        ];
        // the daemon's ends, and the unit's (dropped once the unit has them)
        let (io, passed): (SessionIo, Vec<OwnedFd>) = match &spec.pty {
            Some(p) => {
                let (master, path, slave) = open_pty(p.cols, p.rows)?;
                let rd = master.try_clone().map_err(io_err("pty"))?;
                let wr = master.try_clone().map_err(io_err("pty"))?;
                props.push(("TTYPath", Variant::from(path)));
                for k in ["StandardInput", "StandardOutput", "StandardError"] {
                    props.push((k, Variant::from("tty".to_string())));
                }
                let io = SessionIo::Pty {
                    input: pipe::Sender::from_owned_fd_unchecked(wr).map_err(io_err("pty"))?,
                    output: pipe::Receiver::from_owned_fd_unchecked(rd).map_err(io_err("pty"))?,
                    master,
                };
                (io, vec![slave])
            }
            None => {
                let (in_r, in_w) = std::io::pipe().map_err(io_err("pipe"))?;
                let (out_r, out_w) = std::io::pipe().map_err(io_err("pipe"))?;
                let (err_r, err_w) = std::io::pipe().map_err(io_err("pipe"))?;
                let io = SessionIo::Pipes {
                    stdin: pipe::Sender::from_owned_fd(in_w.into()).map_err(io_err("pipe"))?,
                    stdout: pipe::Receiver::from_owned_fd(out_r.into()).map_err(io_err("pipe"))?,
                    stderr: pipe::Receiver::from_owned_fd(err_r.into()).map_err(io_err("pipe"))?,
                };
                (io, vec![in_r.into(), out_w.into(), err_w.into()])
            }
        };
        if spec.pty.is_none() {
            for (k, fd) in [
                "StandardInputFileDescriptor",
                "StandardOutputFileDescriptor",
                "StandardErrorFileDescriptor",
            ]
            .into_iter()
            .zip(&passed)
            {
                props.push((k, Variant::from(Fd::from(fd.as_fd()))));
            }
        }
        let started = self
            .systemd
            .start_transient(&unit, &props, Duration::from_secs(30))
            .await;
        drop(props);
        // the unit has its own copies now (or failed): ours would keep the session's stdio open
        drop(passed);
        if let Err(e) = started {
            tracing::warn!(unit, error = %e, "ssh session unit did not start");
            self.systemd.unref(&unit).await;
            return Err(format!("cannot start the session: {e}"));
        }
        Ok(Session {
            io,
            ctl: Box::new(UnitCtl {
                systemd: self.systemd.clone(),
                unit,
            }),
        })
    }
}

#[derive(Debug)]
struct UnitCtl {
    systemd: Systemd,
    unit: String,
}

#[async_trait]
impl SessionCtl for UnitCtl {
    async fn wait(&self) -> Exit {
        // the output has ended; the unit follows within moments (podman exits after its process)
        let mut exit = Exit::Unknown;
        for _ in 0..600 {
            match self.systemd.main_exit(&self.unit).await {
                Ok(Some(Some((1, status)))) => {
                    exit = Exit::Code(status as u32);
                    break;
                }
                Ok(Some(Some((_, sig)))) => {
                    exit = Exit::Signal(sig);
                    break;
                }
                Ok(Some(None)) => break,
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => break,
            }
        }
        self.systemd.unref(&self.unit).await;
        exit
    }

    async fn stop(&self) {
        let _ = self.systemd.kill(&self.unit, libc_sighup()).await;
    }
}

/// SIGHUP: what a session's process gets when its client hangs up (as under sshd).
fn libc_sighup() -> i32 {
    nix::sys::signal::Signal::SIGHUP as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ProjectId {
        "6f1c2d3e-0000-4000-8000-000000000001".parse().expect("id")
    }

    #[test]
    fn exec_argv_runs_the_command_through_sh_in_the_container() {
        let spec = SessionSpec {
            id: id(),
            command: Some("id -u; echo $HOME".into()),
            env: vec![("LANG".into(), "C.UTF-8".into())],
            pty: None,
        };
        assert_eq!(
            exec_argv(&spec),
            [
                "/usr/bin/podman",
                "exec",
                "-i",
                "--env=LANG=C.UTF-8",
                "--",
                &id().container_name(),
                "/bin/sh",
                "-c",
                "id -u; echo $HOME",
            ]
        );
    }

    #[test]
    fn a_shell_gets_a_terminal_and_a_login_shell() {
        let spec = SessionSpec {
            id: id(),
            command: None,
            env: vec![("TERM".into(), "xterm".into())],
            pty: Some(PtySpec {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
            }),
        };
        let a = exec_argv(&spec);
        assert_eq!(
            &a[..5],
            ["/usr/bin/podman", "exec", "-i", "-t", "--env=TERM=xterm"]
        );
        assert!(a.last().expect("script").contains("exec sh -l"));
        // a client's command is never an option of podman: it comes after `--` and the name
        let spec = SessionSpec {
            command: Some("--privileged".into()),
            pty: None,
            env: vec![],
            ..spec
        };
        let a = exec_argv(&spec);
        let dd = a.iter().position(|x| x == "--").expect("--");
        assert!(a.iter().position(|x| x == "--privileged").expect("cmd") > dd + 1);
    }

    #[test]
    fn a_pty_opens_and_resizes() {
        let (master, path, _slave) = open_pty(100, 30).expect("pty");
        assert!(path.starts_with("/dev/pts/"), "{path}");
        let ws = rustix::termios::tcgetwinsize(&master).expect("size");
        assert_eq!((ws.ws_col, ws.ws_row), (100, 30));
        resize(&master, 120, 40).expect("resize");
        let ws = rustix::termios::tcgetwinsize(&master).expect("size");
        assert_eq!((ws.ws_col, ws.ws_row), (120, 40));
    }
}
