//! Logging: structured fields to journald when our stderr is the journal (as under systemd), plain
//! lines on stderr otherwise.
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The identifier every journal entry of the daemon carries.
pub const SYSLOG_IDENTIFIER: &str = "cocalc-project-host";

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub fn init(default_level: &str) {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // JOURNAL_STREAM is set by systemd when stderr goes to the journal
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| {
            l.with_syslog_identifier(SYSLOG_IDENTIFIER.into())
                .with_field_prefix(None)
        });
    match journald {
        Some(j) => tracing_subscriber::registry()
            .with(j.with_filter(filter()))
            .init(),
        None => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_filter(filter()),
            )
            .init(),
    }
}
