//! SSH into projects (russh), on the `ssh` socket (`cocalc-project-host-ssh.socket`, port 2222)
//! or `ssh.listen`. The user names the project (`<uuid>`, `project-<uuid>`, or its 32 hex
//! digits); public keys only, from the host's list for the project (`Host::login_keys`, managed
//! by the API) or the project's own `~/.ssh/authorized_keys` (while it runs, or always with
//! `ssh.autostart`). Failed logins are limited per source address ([`ratelimit`]). Sessions run
//! inside the project through `podman exec` (`backends::session`); `session` serves a channel.
pub mod hostkey;
pub mod ratelimit;
mod session;
mod sftp;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, MethodKind, MethodSet};
use tokio_util::sync::CancellationToken;

pub use hostkey::{host_key_fingerprint, load_or_create_host_key};

use crate::adapters::connlimit::PeerLimiter;
use crate::backends::safefs::RelPath;
use crate::backends::session::SessionRunner;
use crate::core::Host;
use crate::domain::project::ProjectId;
use crate::domain::ssh_keys;

/// Most SSH connections at once (more are closed at accept).
const MAX_CONNECTIONS: usize = 2048;
/// A connection must have logged in within this long (sshd's `LoginGraceTime`).
const LOGIN_GRACE: Duration = Duration::from_secs(30);

/// What every connection shares.
#[derive(Debug)]
pub struct Ctx {
    /// the core
    pub host: Arc<Host>,
    /// starts processes in projects
    pub runner: Arc<dyn SessionRunner>,
    /// failed logins per source address
    pub failed: ratelimit::FailedLogins,
    /// `ssh.autostart`
    pub autostart: bool,
}

/// The server's russh configuration.
pub fn config(host_key: russh::keys::PrivateKey, keepalive: Duration) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(
            concat!("SSH-2.0-cocalc-project-host_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // key checks take the same time known or not (a set look-up); the first "none" probe
        // of every OpenSSH client is answered at once
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        max_auth_attempts: 6,
        // idle sessions are fine; dead clients are found by keepalives
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    }
}

/// Serves SSH on `listener` until `shutdown` (sessions already open go on until they end or
/// the daemon exits).
pub async fn serve(
    listener: std::net::TcpListener,
    ctx: Arc<Ctx>,
    config: Arc<russh::server::Config>,
    max_per_peer: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = PeerLimiter::new(max_per_peer);
    loop {
        let (sock, peer) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning
                    tracing::warn!(error = %e, "ssh: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ip = peer.ip();
        if !ctx.failed.allows(ip, Instant::now()) {
            tracing::debug!(%ip, "ssh: too many failed logins from this address, closed");
            continue;
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let Some(slot) = peers.admit(ip) else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let authed = Arc::new(AtomicBool::new(false));
        let handler = Conn {
            ctx: ctx.clone(),
            peer: ip,
            tried: false,
            project: None,
            authed: authed.clone(),
            cache: None,
        };
        let config = config.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let running = match russh::server::run_stream(config, sock, handler).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%ip, error = %e, "ssh: handshake failed");
                    return;
                }
            };
            let h = running.handle();
            let grace = async {
                tokio::time::sleep(LOGIN_GRACE).await;
                if !authed.load(Ordering::Relaxed) {
                    let _ = h
                        .disconnect(
                            russh::Disconnect::ByApplication,
                            "login grace time over".into(),
                            String::new(),
                        )
                        .await;
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                r = running => if let Err(e) = r {
                    tracing::debug!(%ip, error = %e, "ssh: connection ended");
                },
                () = grace => {}
            }
        });
    }
}

/// A project and the keys that may log into it.
type LoginKeys = (ProjectId, Vec<PublicKey>);

/// One connection.
struct Conn {
    ctx: Arc<Ctx>,
    peer: IpAddr,
    /// it tried to authenticate (with anything but `none`)
    tried: bool,
    /// the project it logged into
    project: Option<ProjectId>,
    authed: Arc<AtomicBool>,
    /// the keys that may log in as the last user name asked about
    cache: Option<(String, Option<LoginKeys>)>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.tried && self.project.is_none() {
            self.ctx.failed.failed(self.peer, Instant::now());
        }
    }
}

impl Conn {
    /// The project `user` names and the keys that may log into it.
    async fn keys_for(&mut self, user: &str) -> Option<LoginKeys> {
        if let Some((u, k)) = &self.cache
            && u == user
        {
            return k.clone();
        }
        let found = match ssh_keys::project_of_user(user) {
            None => None,
            Some(id) => {
                let mut keys = self.ctx.host.login_keys(id).await.unwrap_or_else(|e| {
                    tracing::warn!(project_id = %id, error = %e, "ssh: cannot read stored keys");
                    Vec::new()
                });
                let running = self.ctx.host.is_running(id);
                if running || (self.ctx.autostart && self.ctx.host.is_known(id)) {
                    keys.extend(home_keys(&self.ctx.host, id).await);
                }
                Some((id, keys))
            }
        };
        self.cache = Some((user.to_string(), found.clone()));
        found
    }

    async fn check(&mut self, user: &str, key: &PublicKey) -> Option<ProjectId> {
        self.tried = true;
        let (id, keys) = self.keys_for(user).await?;
        ssh_keys::contains(&keys, key).then_some(id)
    }
}

/// The keys of the project's own `~/.ssh/authorized_keys`, read through `backends::safefs`
/// (resolved beneath the home: a symlink to a host file is refused), at most
/// [`ssh_keys::MAX_AUTHORIZED_KEYS_FILE`] bytes of it. Missing or unreadable: none.
async fn home_keys(host: &Arc<Host>, id: ProjectId) -> Vec<PublicKey> {
    use std::io::Read as _;
    let fs = match host.project_files(id).await {
        Ok(fs) => fs,
        Err(_) => return Vec::new(),
    };
    let read = tokio::task::spawn_blocking(move || {
        let p = RelPath::parse(".ssh/authorized_keys")?;
        let (f, _) = fs.home.open_read(&p)?;
        let mut text = String::new();
        f.take(ssh_keys::MAX_AUTHORIZED_KEYS_FILE)
            .read_to_string(&mut text)?;
        Ok::<_, crate::backends::safefs::FsError>(text)
    })
    .await;
    match read {
        Ok(Ok(text)) => ssh_keys::parse_authorized_keys(&text),
        Ok(Err(crate::backends::safefs::FsError::NotFound)) => Vec::new(),
        Ok(Err(e)) => {
            tracing::info!(project_id = %id, error = %e, "ssh: ~/.ssh/authorized_keys not read");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.tried = true;
        tracing::info!(ip = %self.peer, user, "ssh: password login refused");
        Ok(Auth::reject())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        self.tried = true;
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.check(user, offer.public_key).await {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check(user, key.public_key).await {
            Some(id) => {
                self.project = Some(id);
                self.authed.store(true, Ordering::Relaxed);
                tracing::info!(
                    ip = %self.peer,
                    project_id = %id,
                    key = %key.public_key.fingerprint(Default::default()),
                    "ssh: login"
                );
                Ok(Auth::Accept)
            }
            None => {
                tracing::info!(ip = %self.peer, user, "ssh: key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(id) = self.project else {
            return Ok(()); // dropping `reply` refuses the channel
        };
        reply.accept().await;
        tokio::spawn(session::run(
            channel,
            session.handle(),
            self.ctx.clone(),
            id,
        ));
        Ok(())
    }

    /// `ssh -L`: a connection to `127.0.0.1:<port>` inside the project's network namespace
    /// (`Host::connect_port`; works with `network: none`). Any other destination is refused.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(id) = self.project else {
            return Ok(());
        };
        let port = match (host_to_connect, u16::try_from(port_to_connect)) {
            ("127.0.0.1" | "localhost", Ok(p)) if p != 0 => p,
            _ => {
                tracing::info!(project_id = %id, host_to_connect, port_to_connect, "ssh: forward refused");
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
        };
        let host = self.ctx.host.clone();
        // connecting may take a moment: not on the connection's own loop
        tokio::spawn(async move {
            match host.connect_port(id, port).await {
                Ok(mut tcp) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Err(e) => {
                    tracing::info!(project_id = %id, port, error = %e, "ssh: forward failed");
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }
}

/// Starts the SSH server on `listener` (systemd's `ssh` socket) or, without one, on
/// `ssh.listen` when set; `Ok(None)` when there is neither. Makes the host key on first use.
/// The server ends with the host (`Host::shutdown_token`).
pub async fn start(
    listener: Option<std::net::TcpListener>,
    host: Arc<Host>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use anyhow::Context as _;
    let settings = host.settings().clone();
    let listener = match (listener, settings.ssh.listen) {
        (Some(l), _) => l,
        (None, Some(addr)) => std::net::TcpListener::bind(addr)
            .with_context(|| format!("ssh.listen: cannot bind {addr}"))?,
        (None, None) => return Ok(None),
    };
    let addr = listener.local_addr()?;
    let key = load_or_create_host_key(&settings.state_dir)?;
    host.set_ssh_host_key(
        key.public_key()
            .to_openssh()
            .context("ssh: cannot encode the host's public key")?,
    );
    let runner = crate::backends::session::SystemdSessions::connect()
        .await
        .context("ssh: cannot reach systemd")?;
    let ctx = Arc::new(Ctx {
        host: host.clone(),
        runner: Arc::new(runner),
        failed: ratelimit::FailedLogins::default(),
        autostart: settings.ssh.autostart,
    });
    let config = Arc::new(config(key, settings.ssh.keepalive));
    let shutdown = host.shutdown_token();
    let per_peer = settings.http.max_connections_per_peer;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, ctx, config, per_peer, shutdown).await {
            tracing::error!(error = %e, "ssh: server failed");
        }
    });
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use crate::adapters::http::{Route, route};
    use crate::auth::Action;

    const ID: &str = "6f1c2d3e-0000-4000-8000-000000000001";

    #[test]
    fn the_keys_routes_need_the_ssh_keys_action_on_their_project() {
        let path = format!("/projects/{ID}/authorized-keys");
        let id = ID.parse().expect("id");
        assert_eq!(route(&Method::GET, &path), Ok(Route::AuthorizedKeys(id)));
        assert_eq!(route(&Method::PUT, &path), Ok(Route::SetAuthorizedKeys(id)));
        for r in [Route::AuthorizedKeys(id), Route::SetAuthorizedKeys(id)] {
            assert_eq!(r.permission(), Some((Action::SshKeys, Some(id))));
        }
        assert_eq!(Action::parse("ssh_keys"), Some(Action::SshKeys));
        for m in [Method::POST, Method::DELETE, Method::PATCH] {
            let e = route(&m, &path).unwrap_err();
            assert_eq!(e.status.as_u16(), 405, "{m}");
        }
        let e = route(&Method::GET, "/projects/nope/authorized-keys").unwrap_err();
        assert_eq!(e.code, "invalid_project_id");
    }
}
