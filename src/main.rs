//! `cocalc-project-host`: the daemon (`serve`) and its admin commands.
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cocalc_project_host::adapters::cli::{self as client, Action};
use cocalc_project_host::adapters::tls::Tls;
use cocalc_project_host::adapters::{dbus, http, observe_cli, ssh};
use cocalc_project_host::backends::btrfs;
use cocalc_project_host::core::Host;
use cocalc_project_host::domain::project::RunConfig;
use cocalc_project_host::{activation, auth, config, docgen, logging};

#[derive(Debug, Parser)]
#[command(
    name = "cocalc-project-host",
    version,
    about = "Runner node for CoCalc projects: systemd units wrapping podman on btrfs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Client(ClientCommand),
    #[command(flatten)]
    Daemon(DaemonCommand),
}

/// Subcommands that talk to the daemon over D-Bus (they need no config).
#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// List known projects (most recently touched first).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a project's status (exit 4 if this host does not know it).
    Status {
        /// Project id (lowercase UUID).
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Start a project (no-op if running). Options replace its stored config.
    Start {
        /// Project id (lowercase UUID).
        id: String,
        /// Container image.
        #[arg(long)]
        image: Option<String>,
        /// Memory limit (bytes, or with K/M/G/T suffix).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// CPU limit in cores (e.g. 0.5).
        #[arg(long)]
        cpu: Option<f64>,
        /// Maximum number of tasks.
        #[arg(long)]
        pids: Option<u64>,
        /// Environment variable for the project (repeatable).
        #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a project (no-op if stopped).
    Stop {
        /// Project id (lowercase UUID).
        id: String,
        /// Kill at once instead of a graceful stop.
        #[arg(long)]
        force: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set a project's disk quota (SIZE with K/M/G/T suffix, or `none`), at once and for later starts.
    SetQuota {
        /// Project id (lowercase UUID).
        id: String,
        /// The quota, or `none` for no limit.
        #[arg(value_parser = parse_quota)]
        size: Quota,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a project's SSH public keys, or replace them with the keys of FILE
    /// (`authorized_keys` format, one per line; `-` reads stdin; an empty file removes them all).
    AuthorizedKeys {
        /// Project id (lowercase UUID).
        id: String,
        /// Replace the keys with the ones in this file.
        #[arg(long, value_name = "FILE")]
        set: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Read-only snapshots of a project's home.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Show the link to the master (state, reports waiting).
    MasterStatus {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Take and prune the rolling snapshots of all projects now
    /// (cocalc-project-host-snapshots.timer runs this every 15 minutes).
    SnapshotSweep,
    /// Show a project's journal (its container's output and its unit's messages).
    Logs {
        /// Project id (lowercase UUID).
        id: String,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest lines (1..=10000).
        #[arg(short = 'n', long, default_value_t = 200)]
        lines: u32,
        /// One JSON object per line (cursor, time, usec, priority, message, suppressed).
        #[arg(long)]
        json: bool,
    },
    /// Follow the host's lifecycle events (start, stop, snapshots, quota, failures) until ^C.
    Events {
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// A live view of the running projects (CPU, memory, uptime, disk); q quits.
    Top {
        /// Sort by (c and m switch while running).
        #[arg(long, value_enum, default_value = "cpu")]
        sort: cocalc_project_host::adapters::top::SortBy,
    },
    /// Move a project to another host, its snapshots included (a progress bar on a terminal);
    /// running the same command after a failure resumes the move. ^C cancels it.
    Move {
        /// Project id (lowercase UUID).
        id: String,
        /// The target host's API: https://host:port (http:// only to loopback, or with
        /// moves.allow_http).
        #[arg(long, value_name = "URL")]
        to: String,
        /// The master's move token for the target (default: $COCALC_MOVE_TOKEN).
        #[arg(long, value_name = "T")]
        token: Option<String>,
        /// Accept only this certificate from the target: sha256:<64 hex digits of the SHA-256
        /// of its DER> (default: moves.pin_sha256, else a CA chain naming the host).
        #[arg(long, value_name = "sha256:HEX")]
        pin: Option<String>,
        /// Leave the project stopped on the target.
        #[arg(long)]
        no_start: bool,
    },
    /// Change a project's limits: at once when it runs, and for its next start.
    SetLimits {
        /// Project id (lowercase UUID).
        id: String,
        /// Memory limit (bytes, or with K/M/G/T suffix).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// CPU limit in cores (e.g. 0.5).
        #[arg(long)]
        cpu: Option<f64>,
        /// Maximum number of tasks.
        #[arg(long)]
        pids: Option<u64>,
        /// Whether the project may swap (true/false).
        #[arg(long)]
        swap: Option<bool>,
        /// Relative CPU weight, 1..=10000.
        #[arg(long)]
        cpu_weight: Option<u64>,
        /// Relative IO weight, 1..=10000.
        #[arg(long)]
        io_weight: Option<u64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `snapshot …`
#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// List a project's snapshots, oldest first.
    List {
        /// Project id.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Take a snapshot (default name manual-<UTC time>).
    Create {
        /// Project id.
        id: String,
        /// Snapshot name: letters, digits, `.`, `_`, `-`; not starting with `auto-`.
        name: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete {
        /// Project id.
        id: String,
        /// Snapshot name.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Replace the project's home with a snapshot (the project must be stopped).
    Restore {
        /// Project id.
        id: String,
        /// Snapshot name.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// A disk quota on the command line: bytes, or none.
#[derive(Debug, Clone, Copy)]
struct Quota(Option<u64>);

fn parse_quota(s: &str) -> Result<Quota, String> {
    if s == "none" {
        Ok(Quota(None))
    } else {
        config::parse_size(s).map(|b| Quota(Some(b)))
    }
}

/// Subcommands that are, or prepare, the daemon.
#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Run the daemon (socket-activated under systemd, or binding --listen).
    Serve {
        /// Address to bind when not socket-activated (default: `listen` from the config).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Create and mount the project storage if needed (run by cocalc-project-host-storage.service).
    StorageSetup,
    /// Print the merged configuration, or the first error in it.
    CheckConfig,
    /// Print the SSH host key's fingerprint (SHA256:…) and its public key line.
    SshHostKey,
    /// OCI prestart hook run by podman for slirp4netns projects: reads the OCI state on stdin
    /// and puts the egress rules into the container's network namespace.
    #[command(hide = true)]
    EgressHook,
    /// Write the man pages or the shell completions into DIR (run when the packages are built).
    #[command(hide = true)]
    Generate {
        /// What to write.
        what: Generated,
        /// Where (created if missing).
        dir: std::path::PathBuf,
    },
}

/// `generate …`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Generated {
    /// cocalc-project-host.8 and cocalc-project-host.toml.5
    Man,
    /// bash, zsh and fish completions
    Completions,
}

/// `generate`: from this binary's own clap definitions and config code (no config is read).
fn generate(what: Generated, dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory as _;
    let r = match what {
        Generated::Man => docgen::man_pages(Cli::command(), dir),
        Generated::Completions => docgen::completions(Cli::command(), dir),
    };
    match r {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cocalc-project-host generate: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

fn client(cmd: ClientCommand) -> ExitCode {
    let parsed = |id: &str| client::parse_id(id);
    let (action, json) = match cmd {
        ClientCommand::Logs {
            id,
            follow,
            lines,
            json,
        } => {
            return match parsed(&id) {
                Ok(id) => observe_cli::main(observe_cli::logs(id, lines, follow, json)),
                Err(e) => {
                    eprintln!("cocalc-project-host: {}", e.message);
                    ExitCode::from(e.code)
                }
            };
        }
        ClientCommand::Move {
            id,
            to,
            token,
            pin,
            no_start,
        } => {
            return match parsed(&id) {
                Ok(id) => observe_cli::main(cocalc_project_host::adapters::move_cli::run(
                    id, to, token, pin, !no_start,
                )),
                Err(e) => {
                    eprintln!("cocalc-project-host: {}", e.message);
                    ExitCode::from(e.code)
                }
            };
        }
        ClientCommand::Events { json } => return observe_cli::main(observe_cli::events(json)),
        ClientCommand::Top { sort } => {
            return observe_cli::main(cocalc_project_host::adapters::top::run(sort));
        }
        ClientCommand::List { json } => (Ok(Action::List), json),
        ClientCommand::Status { id, json } => (parsed(&id).map(Action::Status), json),
        ClientCommand::Start {
            id,
            image,
            memory,
            cpu,
            pids,
            env,
            json,
        } => {
            let cfg = RunConfig {
                image,
                memory,
                cpu,
                pids,
                env: env.into_iter().collect(),
                ..Default::default()
            };
            (parsed(&id).map(|id| Action::Start(id, Box::new(cfg))), json)
        }
        ClientCommand::Stop { id, force, json } => {
            (parsed(&id).map(|id| Action::Stop(id, force)), json)
        }
        ClientCommand::SetQuota { id, size, json } => {
            (parsed(&id).map(|id| Action::SetQuota(id, size.0)), json)
        }
        ClientCommand::SnapshotSweep => (Ok(Action::SnapshotSweep), true),
        ClientCommand::AuthorizedKeys { id, set, json } => {
            let keys = match set.as_deref().map(|p| {
                if p == std::path::Path::new("-") {
                    std::io::read_to_string(std::io::stdin())
                } else {
                    std::fs::read_to_string(p)
                }
                .map_err(|e| format!("{}: {e}", p.display()))
            }) {
                None => None,
                Some(Ok(text)) => Some(client::key_lines(&text)),
                Some(Err(e)) => {
                    eprintln!("cocalc-project-host: {e}");
                    return ExitCode::from(cocalc_project_host::api::error::EXIT_USAGE);
                }
            };
            (parsed(&id).map(|id| Action::AuthorizedKeys(id, keys)), json)
        }
        ClientCommand::MasterStatus { json } => (Ok(Action::MasterStatus), json),
        ClientCommand::Snapshot(c) => match c {
            SnapshotCommand::List { id, json } => (parsed(&id).map(Action::SnapshotList), json),
            SnapshotCommand::Create { id, name, json } => {
                (parsed(&id).map(|id| Action::SnapshotCreate(id, name)), json)
            }
            SnapshotCommand::Delete { id, name, json } => {
                (parsed(&id).map(|id| Action::SnapshotDelete(id, name)), json)
            }
            SnapshotCommand::Restore { id, name, json } => (
                parsed(&id).map(|id| Action::SnapshotRestore(id, name)),
                json,
            ),
        },
        ClientCommand::SetLimits {
            id,
            memory,
            cpu,
            pids,
            swap,
            cpu_weight,
            io_weight,
            json,
        } => {
            let fields = [
                ("memory", memory.map(serde_json::Value::from)),
                ("cpu", cpu.map(serde_json::Value::from)),
                ("pids", pids.map(serde_json::Value::from)),
                ("swap", swap.map(serde_json::Value::from)),
                ("cpu_weight", cpu_weight.map(serde_json::Value::from)),
                ("io_weight", io_weight.map(serde_json::Value::from)),
            ];
            let patch: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect();
            (
                parsed(&id).map(|id| Action::SetLimits(id, serde_json::Value::Object(patch))),
                json,
            )
        }
    };
    match action {
        Ok(a) => client::main(a, json),
        Err(e) => {
            eprintln!("cocalc-project-host: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn main() -> ExitCode {
    let command = match Cli::parse().command {
        Command::Client(c) => return client(c),
        // podman runs the hook with no configuration of ours to read
        Command::Daemon(DaemonCommand::EgressHook) => return egress_hook(),
        Command::Daemon(DaemonCommand::Generate { what, dir }) => return generate(what, &dir),
        Command::Daemon(d) => d,
    };
    logging::init("info");
    let roots = config::roots_from_env();
    let settings = match config::load(&roots) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("cocalc-project-host: invalid configuration: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match command {
        DaemonCommand::Serve { listen } => serve(settings, listen),
        DaemonCommand::StorageSetup => runtime().and_then(|rt| {
            let mount = rt.block_on(btrfs::setup(&settings))?;
            println!("project storage ready at {}", mount.display());
            Ok(())
        }),
        DaemonCommand::EgressHook | DaemonCommand::Generate { .. } => {
            unreachable!("handled before the configuration is read")
        }
        DaemonCommand::SshHostKey => {
            ssh::host_key_fingerprint(&settings.state_dir).and_then(|fp| {
                println!("{fp}");
                println!("{}", ssh::hostkey::host_public_key(&settings.state_dir)?);
                Ok(())
            })
        }
        DaemonCommand::CheckConfig => {
            for f in config::fragment_files(&roots) {
                println!("# read {}", f.display());
            }
            println!("{settings:#?}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("cocalc-project-host: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// How long shutdown waits for in-flight starts and stops (under systemd's default 90s stop
/// timeout of the daemon, after HTTP's own 30s at most).
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(45);

fn egress_hook() -> ExitCode {
    use std::io::Read as _;
    logging::init("info");
    let mut state = String::new();
    let r = match std::io::stdin().read_to_string(&mut state) {
        Ok(_) => runtime()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(cocalc_project_host::backends::egress::run_hook(&state))),
        Err(e) => Err(format!("reading the OCI state: {e}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocalc-project-host egress-hook: {e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The master client `[master]` asks for; `None` (standalone, said in the log) without a url,
/// without the credential, or with TLS settings that cannot be used: never a crash loop.
fn master_client(
    m: &config::MasterSettings,
) -> Option<cocalc_project_host::backends::master::HttpMaster> {
    use cocalc_project_host::backends::master::{HttpMaster, load_credential};
    let url = m.url.as_deref()?;
    let credential = match load_credential() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                message_id = "c2a7e41b0d9f4e3a8b5c6d7e8f901a23",
                master = url,
                error = %e,
                "master link: no credential (systemd credential master-credential): running standalone"
            );
            return None;
        }
    };
    match HttpMaster::new(m, credential) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(
                message_id = "c2a7e41b0d9f4e3a8b5c6d7e8f901a23",
                master = url,
                error = %e,
                "master link: cannot set up the client: running standalone"
            );
            None
        }
    }
}

fn serve(settings: config::Settings, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    // before any thread exists: listenfd reads and clears LISTEN_* from the environment
    let mut listeners = activation::take_listeners(listen.unwrap_or(settings.listen))
        .context("cannot get the HTTP listener")?;
    // the public side: systemd's socket, else `proxy.listen` when set (no proxy otherwise)
    let proxy_listener = match (listeners.take("proxy"), settings.proxy.listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("cannot bind proxy.listen {addr}"))?,
        ),
        (None, None) => None,
    };
    let ssh_listener = listeners.take("ssh");
    let rt = runtime()?;
    let auth_settings = settings.auth.clone();
    rt.block_on(async move {
        let store = Host::open_store(&settings)?;
        // before the host reconciles: the changes it finds are reported too
        let master = master_client(&settings.master);
        if master.is_some() {
            store.outbox().enable(settings.master.outbox_limit);
        }
        let has_master = settings.master.url.is_some();
        let host = Host::new(settings, store.clone()).await?;
        let auth = std::sync::Arc::new(
            auth::Auth::load(&auth_settings, host.host_id())
                .context("cannot load the API's tokens and keys")?
                .with_revocations(
                    auth::revocation::Revocations::load(store.clone(), auth::now_secs())
                        .await
                        .context("cannot read the token revocation list")?,
                ),
        );
        let (admin_tokens, master_keys) = auth.counts();
        if admin_tokens + master_keys == 0 {
            tracing::warn!(
                "no admin token and no master key: every request but /healthz is refused"
            );
        }
        let bus = dbus::serve(host.clone())
            .await
            .with_context(|| format!("cannot own {} on the system bus", dbus::BUS_NAME))?;
        match ssh::start(ssh_listener, host.clone()).await? {
            Some(a) => tracing::info!(address = %a, "ssh: serving"),
            None => tracing::info!("ssh: no ssh socket and no ssh.listen: SSH is off"),
        }
        // after the SSH server: register carries its host key
        if has_master {
            let keys = auth_settings.master_public_keys.clone();
            let trust = auth::fleet::FleetTrust::load(auth.clone(), store.clone(), keys)
                .await
                .context("cannot read the master's stored keys")?;
            if let Some(m) = master {
                host.start_link(std::sync::Arc::new(m), std::sync::Arc::new(trust));
            }
        }
        let addr = listeners.http.local_addr()?;
        let activated = listeners.activated;
        let untaken = listeners.untaken().join(",");
        if !untaken.is_empty() {
            tracing::warn!(
                sockets = untaken,
                "socket activation passed sockets this build does not serve"
            );
        }
        let listener = tokio::net::TcpListener::from_std(listeners.http)?;
        // TLS for connections to non-loopback addresses: without its certificate the daemon
        // does not start (never plain HTTP where TLS was configured)
        let hs = &host.settings().http;
        let api_tls = Tls::from_pair(&hs.tls_cert, &hs.tls_key, "http.tls_cert/http.tls_key")
            .map_err(anyhow::Error::msg)?;
        let tls_on = api_tls.is_some();
        let watchdog = activation::spawn_watchdog();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // the proxy stops with the API (same signal, same order: before the bus and the core)
        let proxy_stop = tokio_util::sync::CancellationToken::new();
        let proxy_task = match proxy_listener {
            Some(l) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                let ps = &host.settings().proxy;
                // a TLS listener without its certificate must not fall back to plain HTTP
                let tls = Tls::from_pair(&ps.tls_cert, &ps.tls_key, "proxy TLS")
                    .map_err(anyhow::Error::msg)?;
                tracing::info!(address = %l.local_addr()?, tls = tls.is_some(), "serving the proxy");
                let px = cocalc_project_host::adapters::proxy::Proxy::new(
                    host.clone(),
                    auth.clone(),
                    tls,
                )
                .context("cannot set up the proxy (its cookie key in the state directory)")?;
                let stop = proxy_stop.clone();
                Some(tokio::spawn(cocalc_project_host::adapters::proxy::serve(
                    l,
                    px,
                    async move { stop.cancelled().await },
                )))
            }
            None => None,
        };
        let signal_stop = proxy_stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            activation::notify_stopping();
            tracing::info!(
                message_id = "8d0d3c3b2c7d4e0f9a1b6c5d4e3f2a10",
                "stopping: finishing in-flight requests"
            );
            let _ = stop_tx.send(());
            signal_stop.cancel();
        });
        tracing::info!(
            message_id = "5b1e9b0e7a4c4c2a8f3d2e1c0b9a8f70",
            listener = if activated { "socket-activation" } else { "bound" },
            address = %addr,
            version = env!("CARGO_PKG_VERSION"),
            host_id = host.host_id(),
            watchdog_ms = watchdog.map(|d| d.as_millis() as u64),
            admin_tokens,
            master_keys,
            tls = tls_on,
            "serving"
        );
        activation::notify_ready(&format!("serving on {addr}"));
        http::serve(listener, host.clone(), auth, api_tls, async {
            let _ = stop_rx.await;
        })
        .await;
        proxy_stop.cancel();
        if let Some(t) = proxy_task {
            let _ = t.await;
        }
        // The shutdown order: HTTP has stopped accepting and finished its requests; the bus name
        // goes next (no new D-Bus calls), then the core drains the starts and stops in flight
        // (D-Bus-started ones included: they are not cut off by the runtime's drop) and ends
        // its loops; the bus connection goes last.
        if let Err(e) = bus.release_name(dbus::BUS_NAME).await {
            tracing::warn!(error = %e, "cannot release the bus name");
        }
        tracing::info!("stopping: bus name released, draining the core");
        host.shutdown(SHUTDOWN_DRAIN).await;
        drop(bus);
        tracing::info!("stopped");
        Ok(())
    })
}
