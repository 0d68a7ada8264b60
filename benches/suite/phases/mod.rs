//! The measurements, one file per phase (the table [`PHASES`]). Each phase prints its figures as
//! it goes and adds rows (figure, baseline measured in the same run, ratio, target) to the
//! report; `results.json` gets the rows and the raw samples (for the plot).
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::http::{self, Target};
use crate::stats::{self, Summary, ms, sh, sh_quiet};

mod burst;
mod cold;
mod density;
mod freeze;
mod latency;
mod moves;
mod proxy;
mod setup;
mod snapshot;
mod ssh;
mod throughput;

use cold::*;
use latency::*;
use setup::*;
use throughput::*;

const IMAGE: &str = "localhost/cocalc-project:latest";
const STORAGE: &str = "/var/lib/cocalc-project-host/projects";
const DAEMON: &str = "cocalc-project-host.service";
const WORK: &str = "/run/cocalc-bench";
const PODMAN_SOCK: &str = "/run/cocalc-bench/podman.sock";
const PODMAN_API_UNIT: &str = "cocalc-bench-podman-api.service";
const NGINX_ADDR: &str = "127.0.0.1:9080";
const STOP_SECS: &str = "10";

fn api() -> Target {
    Target::Tcp("127.0.0.1:9002".parse().unwrap())
}
fn podman_api() -> Target {
    Target::Unix(PODMAN_SOCK.into())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a row's figure must satisfy.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// no target: information
    None,
    /// value / baseline ≤ x
    RatioAtMost(f64),
    /// value / baseline < 1 (faster than the baseline)
    Below,
    /// value / baseline ≥ x
    RatioAtLeast(f64),
    /// value ≤ x (in the row's unit)
    AtMost(f64),
}

#[derive(Debug, serde::Serialize)]
struct Row {
    section: String,
    measure: String,
    value: f64,
    unit: String,
    baseline: String,
    baseline_value: Option<f64>,
    ratio: Option<f64>,
    target: String,
    verdict: String,
}

/// One row of the report as a phase describes it: the figure, what it is compared with and the
/// goal; the ratio, the verdict and all formatting are [`Ctx::row`]'s. A phase lists its rows as
/// one table (`ctx.rows(section, [r(…).vs(…).goal(…), …])`).
struct R {
    measure: String,
    value: f64,
    unit: &'static str,
    baseline: Option<(String, f64)>,
    goal: Goal,
}

/// A row with no baseline and no goal.
fn r(measure: impl Into<String>, value: f64, unit: &'static str) -> R {
    R {
        measure: measure.into(),
        value,
        unit,
        baseline: None,
        goal: Goal::None,
    }
}

impl R {
    /// Compared with `label`, measured in the same run as `value`.
    fn vs(self, label: impl Into<String>, value: f64) -> R {
        R {
            baseline: Some((label.into(), value)),
            ..self
        }
    }
    fn goal(self, goal: Goal) -> R {
        R { goal, ..self }
    }
}

struct Ctx {
    out: PathBuf,
    n: usize,
    warmup: usize,
    burst: usize,
    burst_reps: usize,
    density: usize,
    conns: usize,
    load_secs: u64,
    restarts: usize,
    snap_big_mb: u64,
    nginx: String,
    rows: Vec<Row>,
    detail: BTreeMap<String, Value>,
    token: AtomicU64,
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Ctx {
    fn next_token(&self) -> String {
        self.token.fetch_add(1, Ordering::Relaxed).to_string()
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        section: &str,
        measure: &str,
        value: f64,
        unit: &str,
        baseline: Option<(&str, f64)>,
        goal: Goal,
    ) {
        let ratio = baseline.and_then(|(_, b)| (b > 0.0).then_some(value / b));
        let (target, ok) = match goal {
            Goal::None => (String::new(), None),
            Goal::RatioAtMost(x) => (format!("≤ {x}× baseline"), ratio.map(|r| r <= x)),
            Goal::Below => ("< baseline".into(), ratio.map(|r| r < 1.0)),
            Goal::RatioAtLeast(x) => (format!("≥ {x}× baseline"), ratio.map(|r| r >= x)),
            Goal::AtMost(x) => (format!("≤ {} {unit}", fmt_num(x)), Some(value <= x)),
        };
        let verdict = match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        }
        .to_string();
        println!(
            "  {:<44} {:>10} {:<6} {:<34} {:>10} {:>8} {:<20} {}",
            measure,
            fmt_num(value),
            unit,
            baseline.map_or("", |b| b.0),
            baseline.map_or(String::new(), |b| fmt_num(b.1)),
            ratio.map_or(String::new(), |r| if r < 0.1 {
                format!("{r:.4}×")
            } else {
                format!("{r:.2}×")
            }),
            target,
            verdict
        );
        self.rows.push(Row {
            section: section.into(),
            measure: measure.into(),
            value,
            unit: unit.into(),
            baseline: baseline.map_or(String::new(), |b| b.0.to_string()),
            baseline_value: baseline.map(|b| b.1),
            ratio,
            target,
            verdict,
        });
    }

    /// Adds a table of rows to `section` (see [`R`]).
    fn rows(&mut self, section: &str, rows: impl IntoIterator<Item = R>) {
        for x in rows {
            let baseline = x.baseline.as_ref().map(|(l, v)| (l.as_str(), *v));
            self.row(section, &x.measure, x.value, x.unit, baseline, x.goal);
        }
    }

    fn detail(&mut self, key: &str, v: Value) {
        self.detail.insert(key.into(), v);
    }

    fn save(&self) -> Result<()> {
        let v = json!({"rows": self.rows, "detail": self.detail});
        std::fs::write(
            self.out.join("results.json"),
            serde_json::to_vec_pretty(&v)?,
        )?;
        Ok(())
    }
}

fn section(title: &str) {
    println!("\n== {title}");
}

type PhaseFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// One phase of the suite, in its own file. The full run takes them in this order; `BENCH_PHASES`
/// (`scripts/bench --phase KEY`) picks some by key or alias.
struct Phase {
    key: &'static str,
    aliases: &'static [&'static str],
    title: &'static str,
    run: fn(&mut Ctx) -> PhaseFuture<'_>,
}

const PHASES: &[Phase] = &[
    Phase {
        key: "cold",
        aliases: &[],
        title: "5a. daemon cold start",
        run: |c| Box::pin(cold::daemon_cold(c)),
    },
    Phase {
        key: "latency",
        aliases: &["start"],
        title: "1. start / stop latency",
        run: |c| Box::pin(latency::latency(c)),
    },
    Phase {
        key: "burst",
        aliases: &[],
        title: "2. burst",
        run: |c| Box::pin(burst::burst(c)),
    },
    Phase {
        key: "density",
        aliases: &["throughput"],
        title: "3-5. density, API throughput, restart",
        run: |c| Box::pin(density::density(c)),
    },
    Phase {
        key: "snapshot",
        aliases: &["snapshots"],
        title: "6. snapshots",
        run: |c| Box::pin(snapshot::snapshots(c)),
    },
    Phase {
        key: "ssh",
        aliases: &[],
        title: "7. ssh",
        run: |c| Box::pin(ssh::ssh(c)),
    },
    Phase {
        key: "proxy",
        aliases: &[],
        title: "8. proxy",
        run: |c| Box::pin(proxy::proxy(c)),
    },
    Phase {
        key: "freeze",
        aliases: &["thaw"],
        title: "9. idle freeze and thaw",
        run: |c| Box::pin(freeze::freeze(c)),
    },
    Phase {
        key: "move",
        aliases: &["moves"],
        title: "10. move",
        run: |c| Box::pin(moves::moves(c)),
    },
];

/// The phases `BENCH_PHASES` (comma-separated keys or aliases; empty: all) asks for. An unknown
/// name is an error: a typo must not make a run that measures nothing.
fn wanted(only: &str) -> Result<Vec<bool>> {
    let names: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    for n in &names {
        if !PHASES.iter().any(|p| p.key == *n || p.aliases.contains(n)) {
            let known: Vec<String> = PHASES
                .iter()
                .map(|p| {
                    std::iter::once(p.key)
                        .chain(p.aliases.iter().copied())
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect();
            bail!(
                "BENCH_PHASES: no phase {n:?} (phases: {})",
                known.join(", ")
            );
        }
    }
    Ok(PHASES
        .iter()
        .map(|p| names.is_empty() || names.iter().any(|n| p.key == *n || p.aliases.contains(n)))
        .collect())
}

pub async fn run(out: PathBuf) -> Result<()> {
    let only = std::env::var("BENCH_PHASES").unwrap_or_default();
    let wanted = wanted(&only)?;
    std::fs::create_dir_all(&out)?;
    let mut ctx = Ctx {
        out,
        n: env_num("BENCH_N", 30) as usize,
        warmup: env_num("BENCH_WARMUP", 2) as usize,
        burst: env_num("BENCH_BURST", 50) as usize,
        burst_reps: env_num("BENCH_BURST_REPS", 3) as usize,
        density: env_num("BENCH_DENSITY", 200) as usize,
        conns: env_num("BENCH_CONNS", 64) as usize,
        load_secs: env_num("BENCH_LOAD_SECS", 10),
        restarts: env_num("BENCH_RESTARTS", 3) as usize,
        snap_big_mb: env_num("BENCH_SNAP_BIG_MB", 1024),
        nginx: std::env::var("BENCH_NGINX").unwrap_or_else(|_| "/xchg/nginx/usr/sbin/nginx".into()),
        rows: Vec::new(),
        detail: BTreeMap::new(),
        token: AtomicU64::new(100_000),
    };
    let t0 = Instant::now();
    preflight(&mut ctx).await?;
    for (phase, wanted) in PHASES.iter().zip(wanted) {
        if !wanted {
            println!("\n== {} (skipped: BENCH_PHASES={only})", phase.title);
            continue;
        }
        section(phase.title);
        let t = Instant::now();
        if let Err(e) = (phase.run)(&mut ctx).await {
            println!("  !! phase failed: {e:#}");
            ctx.detail(&format!("error {}", phase.title), json!(format!("{e:#}")));
        }
        println!("  ({}: {:.0} s)", phase.title, t.elapsed().as_secs_f64());
        ctx.save()?;
    }
    cleanup().await;
    ctx.detail("suite_secs", json!(t0.elapsed().as_secs_f64()));
    ctx.save()?;
    println!(
        "\nsuite done in {:.0} s; results in {}",
        t0.elapsed().as_secs_f64(),
        ctx.out.join("results.json").display()
    );
    Ok(())
}
