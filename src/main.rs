//! `cocalc-project-host`: the daemon (`serve`) and its admin commands.
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cocalc_project_host::{activation, auth, btrfs, config, dbus, host::Host, http, logging};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = match cli.command {
        Command::Serve { listen } => serve(settings, listen),
        Command::StorageSetup => runtime().and_then(|rt| {
            let mount = rt.block_on(btrfs::setup(&settings))?;
            println!("project storage ready at {}", mount.display());
            Ok(())
        }),
        Command::CheckConfig => {
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(settings: config::Settings, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    // before any thread exists: listenfd reads and clears LISTEN_* from the environment
    let http_listener = activation::take_http_listener(listen.unwrap_or(settings.listen))
        .context("cannot get the HTTP listener")?;
    let rt = runtime()?;
    let auth_settings = settings.auth.clone();
    rt.block_on(async move {
        let host = Host::new(settings).await?;
        let auth = std::sync::Arc::new(
            auth::Auth::load(&auth_settings, host.host_id())
                .context("cannot load the API's tokens and keys")?,
        );
        let (admin_tokens, master_keys) = auth.counts();
        if admin_tokens + master_keys == 0 {
            tracing::warn!(
                "no admin token and no master key: every request but /healthz is refused"
            );
        }
        let _bus = dbus::serve(host.clone())
            .await
            .with_context(|| format!("cannot own {} on the system bus", dbus::BUS_NAME))?;
        let addr = http_listener.listener.local_addr()?;
        let activated = http_listener.activated;
        let listener = tokio::net::TcpListener::from_std(http_listener.listener)?;
        let watchdog = activation::spawn_watchdog();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
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
            "serving"
        );
        activation::notify_ready(&format!("serving on {addr}"));
        http::serve(listener, host, auth, async {
            let _ = stop_rx.await;
        })
        .await;
        tracing::info!("stopped");
        Ok(())
    })
}
