//! The measurements. Each phase prints its figures as it goes and adds rows (figure, baseline
//! measured in the same run, ratio, target) to the report; `results.json` gets the rows and the
//! raw samples (for the plot).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::http::{self, Target};
use crate::stats::{self, Summary, ms, sh, sh_quiet};

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

pub async fn run(out: PathBuf) -> Result<()> {
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
    // BENCH_PHASES=cold,latency,burst,density,snapshot runs only those (default: all)
    let only = std::env::var("BENCH_PHASES").unwrap_or_default();
    let wanted = |key: &str| only.is_empty() || only.split(',').any(|p| p.trim() == key);
    macro_rules! phase {
        ($key:expr, $name:expr, $f:expr) => {{
            if !wanted($key) {
                println!("\n== {} (skipped: BENCH_PHASES={only})", $name);
            } else {
                section($name);
                let t = Instant::now();
                if let Err(e) = $f.await {
                    println!("  !! phase failed: {e:#}");
                    ctx.detail(&format!("error {}", $name), json!(format!("{e:#}")));
                }
                println!("  ({}: {:.0} s)", $name, t.elapsed().as_secs_f64());
                ctx.save()?;
            }
        }};
    }
    phase!("cold", "5a. daemon cold start", daemon_cold(&mut ctx));
    phase!("latency", "1. start / stop latency", latency(&mut ctx));
    phase!("burst", "2. burst", burst(&mut ctx));
    phase!(
        "density",
        "3-5. density, API throughput, restart",
        density(&mut ctx)
    );
    phase!("snapshot", "6. snapshots", snapshots(&mut ctx));
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

// ---------------------------------------------------------------------------------------------
// setup

async fn preflight(ctx: &mut Ctx) -> Result<()> {
    section("machine");
    let info = json!({
        "kernel": sh_quiet("uname -r").await,
        "cpus": sh_quiet("nproc").await,
        "cpu_model": sh_quiet("sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1").await,
        "mem": sh_quiet("awk '/MemTotal/{printf \"%.1f GiB\", $2/1048576}' /proc/meminfo").await,
        "systemd": sh_quiet("systemctl --version | head -1").await,
        "podman": sh_quiet("podman --version").await,
        "oci_runtime": sh_quiet("podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Version}}' | head -1").await,
        "conmon": sh_quiet("conmon --version | head -1").await,
        "cgroups": sh_quiet("podman info --format '{{.Host.CgroupsVersion}} {{.Host.CgroupManager}}'").await,
        "package": sh_quiet("dpkg-query -W -f '${Version}' cocalc-project-host").await,
        "nginx": sh_quiet(&format!("{} -v 2>&1", ctx.nginx)).await,
    });
    for (k, v) in info.as_object().unwrap() {
        println!("  {k:<12} {}", v.as_str().unwrap_or(""));
    }
    ctx.detail("machine", info);
    if !Path::new("/usr/bin/cocalc-project-host").exists() {
        bail!("cocalc-project-host is not installed in this machine");
    }
    sh(&format!("podman image exists {IMAGE}"))
        .await
        .context("the testbed image is missing")?;
    std::fs::create_dir_all(WORK)?;
    http::json(&api(), "GET", "/healthz", None)
        .await
        .context("the daemon does not answer")?;
    // podman's REST API, always warm (its own socket-activated cold start is measured apart)
    sh_quiet(&format!("systemctl stop {PODMAN_API_UNIT}")).await;
    sh(&format!(
        "systemd-run --quiet --unit={PODMAN_API_UNIT} --collect -- /usr/bin/podman system service --time=0 unix://{PODMAN_SOCK}"
    ))
    .await?;
    wait_for("podman REST API", Duration::from_secs(30), || async {
        http::call(&podman_api(), "GET", "/_ping", None)
            .await
            .is_ok()
    })
    .await?;
    Ok(())
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn cleanup() {
    let _ = sh_quiet(
        "podman ps -a --format '{{.Names}}' | grep '^bench-' | xargs -r podman rm -f -t 0",
    )
    .await;
    let _ = sh_quiet("systemctl stop 'bench-*.service'").await;
    let _ = sh_quiet(&format!("systemctl stop {PODMAN_API_UNIT}")).await;
}

/// A btrfs subvolume in the project storage owned by the container's `user`, as the daemon makes
/// project homes; reused if it exists.
async fn make_home(name: &str) -> Result<String> {
    let p = format!("{STORAGE}/{name}");
    if !Path::new(&p).exists() {
        sh(&format!(
            "btrfs -q subvolume create {p} && chown 101000:101000 {p} && chmod 750 {p}"
        ))
        .await?;
    }
    Ok(p)
}

/// The options that make a baseline container the same container as a project's: image,
/// user namespace, user, home volume, network, init, log driver, env (src/podman.rs, minus the
/// systemd-only flags --cidfile --cgroups=no-conmon --sdnotify --replace).
fn container_flags(home: &str, tag: &str) -> Vec<String> {
    vec![
        "--init".into(),
        "--log-driver=journald".into(),
        "--network=none".into(),
        "--uidmap=0:100000:65536".into(),
        "--gidmap=0:100000:65536".into(),
        "--user=1000:1000".into(),
        format!("--volume={home}:/home/user"),
        "--workdir=/home/user".into(),
        "--env=HOME=/home/user".into(),
        format!("--env=COCALC_PROJECT_ID={tag}"),
        "--pull=never".into(),
    ]
}

/// The same container as a libpod REST create spec.
fn rest_spec(name: &str, home: &str, token: &str) -> Value {
    let map = json!([{"container_id": 0, "host_id": 100000, "size": 65536}]);
    json!({
        "name": name, "image": IMAGE, "command": ["sleep", token],
        "init": true, "remove": true, "user": "1000:1000", "work_dir": "/home/user",
        "env": {"HOME": "/home/user", "COCALC_PROJECT_ID": name},
        "userns": {"nsmode": "private"},
        "idmappings": {"UIDMap": map, "GIDMap": map},
        "mounts": [{"destination": "/home/user", "source": home, "type": "bind", "options": ["rbind"]}],
        "netns": {"nsmode": "none"},
        "log_configuration": {"driver": "journald"},
    })
}

fn start_body(token: &str) -> String {
    json!({"config": {"cmd": ["sleep", token]}}).to_string()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. start / stop latency

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Api,
    Raw,
    SystemdRun,
    Rest,
}

impl Method {
    const ALL: [Method; 4] = [Method::Api, Method::Raw, Method::SystemdRun, Method::Rest];
    fn key(self) -> &'static str {
        match self {
            Method::Api => "api",
            Method::Raw => "podman_run",
            Method::SystemdRun => "systemd_run",
            Method::Rest => "podman_rest",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Method::Api => "cocalc-project-host API",
            Method::Raw => "(a) podman run -d",
            Method::SystemdRun => "(b) systemd-run + podman run",
            Method::Rest => "(c) podman REST create+start",
        }
    }
}

/// Starts the container of `slot` with `method`; returns when the call returned AND the
/// payload `sleep <token>` runs.
async fn start_with(method: Method, slot: &str, home: &str, token: &str) -> Result<Duration> {
    let above = stats::max_pid();
    let t0 = Instant::now();
    match method {
        Method::Api => {
            let v = http::json(
                &api(),
                "POST",
                &format!("/projects/{slot}/start"),
                Some(&start_body(token)),
            )
            .await?;
            if v["state"] != "running" {
                bail!("start {slot}: {v}");
            }
        }
        Method::Raw => {
            let mut a: Vec<String> = vec![
                "podman".into(),
                "run".into(),
                "-d".into(),
                "--rm".into(),
                format!("--name={slot}"),
            ];
            a.extend(container_flags(home, slot));
            a.extend(["--".into(), IMAGE.into(), "sleep".into(), token.into()]);
            stats::run(&a.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
        Method::SystemdRun => {
            // JupyterHub systemdspawner style: a transient unit whose main process is the
            // foreground `podman run`. ExecStop/ExecStopPost as in our recipe, else a stop leaves
            // the container behind (see DESIGN.md).
            let mut a: Vec<String> = vec![
                "systemd-run".into(),
                "--quiet".into(),
                format!("--unit={slot}"),
                "--slice=bench.slice".into(),
                "--collect".into(),
                "-p".into(),
                "KillMode=mixed".into(),
                "-p".into(),
                format!("ExecStop=/usr/bin/podman stop --ignore -t {STOP_SECS} {slot}"),
                "-p".into(),
                format!("ExecStopPost=/usr/bin/podman rm -f --ignore -t 0 {slot}"),
                "--".into(),
                "/usr/bin/podman".into(),
                "run".into(),
                "--rm".into(),
                format!("--name={slot}"),
            ];
            a.extend(container_flags(home, slot));
            a.extend(["--".into(), IMAGE.into(), "sleep".into(), token.into()]);
            stats::run(&a.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
        Method::Rest => {
            let spec = rest_spec(slot, home, token).to_string();
            http::json(
                &podman_api(),
                "POST",
                "/v4.0.0/libpod/containers/create",
                Some(&spec),
            )
            .await?;
            http::json(
                &podman_api(),
                "POST",
                &format!("/v4.0.0/libpod/containers/{slot}/start"),
                None,
            )
            .await?;
        }
    }
    stats::wait_payload(token, above, Duration::from_secs(60)).await?;
    Ok(t0.elapsed())
}

/// Stops (and removes) the container of `slot`; returns when it is gone.
async fn stop_with(method: Method, slot: &str) -> Result<Duration> {
    let t0 = Instant::now();
    match method {
        Method::Api => {
            let v = http::json(
                &api(),
                "POST",
                &format!("/projects/{slot}/stop"),
                Some("{}"),
            )
            .await?;
            if v["state"] != "opened" {
                bail!("stop {slot}: {v}");
            }
        }
        Method::Raw => {
            stats::run(&["podman", "stop", "--ignore", "-t", STOP_SECS, slot]).await?;
            stats::run(&["podman", "rm", "-f", "--ignore", "-t", "0", slot]).await?;
        }
        Method::SystemdRun => {
            stats::run(&["systemctl", "stop", &format!("{slot}.service")]).await?;
        }
        Method::Rest => {
            http::call(
                &podman_api(),
                "POST",
                &format!("/v4.0.0/libpod/containers/{slot}/stop?timeout={STOP_SECS}&ignore=true"),
                None,
            )
            .await?;
            http::call(
                &podman_api(),
                "DELETE",
                &format!("/v4.0.0/libpod/containers/{slot}?force=true&ignore=true&timeout=0"),
                None,
            )
            .await?;
        }
    }
    Ok(t0.elapsed())
}

async fn latency(ctx: &mut Ctx) -> Result<()> {
    let home = make_home("bench-latency-home").await?;
    let project = new_id();
    let mut start: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut stop: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    // API rounds: (request sent, unit left inactive, unit READY, answer received), monotonic µs
    let mut api_rounds: Vec<(f64, f64, f64, f64)> = Vec::new();
    let rounds = ctx.warmup + ctx.n;
    println!(
        "  {rounds} rounds ({} warm-up) of start+stop with each method, order rotated each round",
        ctx.warmup
    );
    for r in 0..rounds {
        for k in 0..4 {
            let m = Method::ALL[(r + k) % 4];
            let slot = match m {
                Method::Api => project.clone(),
                Method::Raw => format!("bench-a-{r}"),
                Method::SystemdRun => format!("bench-b-{r}"),
                Method::Rest => format!("bench-c-{r}"),
            };
            let token = ctx.next_token();
            let s = start_with(m, &slot, &home, &token)
                .await
                .with_context(|| format!("start with {}", m.label()))?;
            let t1 = stats::mono_us();
            if m == Method::Api && r >= ctx.warmup {
                // where the time went: systemd's own timestamps of the unit (the daemon's journal
                // lines are matched after the phase)
                let t = unit_timestamps(&format!("cocalc-project-{slot}.service")).await?;
                api_rounds.push((t1 - ms(s) * 1000.0, t.inactive_exit, t.active_enter, t1));
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            let p = stop_with(m, &slot)
                .await
                .with_context(|| format!("stop with {}", m.label()))?;
            tokio::time::sleep(Duration::from_millis(150)).await;
            if r >= ctx.warmup {
                start.entry(m.key()).or_default().push(ms(s));
                stop.entry(m.key()).or_default().push(ms(p));
            }
        }
        if (r + 1) % 8 == 0 {
            println!("  … {} rounds", r + 1);
        }
    }
    // where systemd (PID 1) and the daemon spend their CPU during API start/stop cycles (not
    // part of the figures: perf costs a little)
    let daemon = daemon_main_pid().await?;
    if perf_request(ctx, &[1, daemon], 8, "api_start_stop").await {
        let t0 = Instant::now();
        let mut cycles = 0;
        while t0.elapsed() < Duration::from_secs(7) {
            let token = ctx.next_token();
            start_with(Method::Api, &project, &home, &token).await?;
            stop_with(Method::Api, &project).await?;
            cycles += 1;
        }
        println!("  profiled {cycles} API start/stop cycles (PID 1 and the daemon)");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for (what, samples) in [("start", &start), ("stop", &stop)] {
        let s = |m: Method| Summary::of(&samples[m.key()]);
        let api = s(Method::Api);
        for (q, pick) in [("p50", 0), ("p95", 1)] {
            let v = |x: &Summary| if pick == 0 { x.p50 } else { x.p95 };
            for m in [Method::Raw, Method::SystemdRun, Method::Rest] {
                let goal = match (what, m) {
                    ("start", Method::Raw) => Goal::RatioAtMost(1.15),
                    ("start", _) => Goal::Below,
                    _ => Goal::None,
                };
                ctx.row(
                    "1. start/stop latency",
                    &format!("{what} {q}: API vs {}", m.label()),
                    v(&api),
                    "ms",
                    Some((m.label(), v(&s(m)))),
                    goal,
                );
            }
        }
        if what == "start" {
            start_parts(ctx, &project, &api_rounds, s(Method::Raw).p50).await;
        }
        ctx.detail(
            &format!("{what}_latency_ms"),
            json!(
                samples
                    .iter()
                    .map(|(k, v)| (
                        k.to_string(),
                        json!({"samples": v, "summary": Summary::of(v)})
                    ))
                    .collect::<serde_json::Map<_, _>>()
            ),
        );
    }
    Ok(())
}

/// Splits the API's start latency with the daemon's journal ("starting project" is logged just
/// before StartTransientUnit, "project started" after the store write) and the unit's timestamps.
async fn start_parts(ctx: &mut Ctx, project: &str, rounds: &[(f64, f64, f64, f64)], raw_p50: f64) {
    let journal = stats::daemon_journal(&format!("PROJECT_ID={project}")).await;
    let find = |msg: &str, a: f64, b: f64| {
        journal
            .iter()
            .find(|(t, m)| m == msg && *t >= a && *t <= b)
            .map(|(t, _)| *t)
    };
    let mut parts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for &(t0, u0, u1, t1) in rounds {
        let (Some(d0), Some(d1)) = (
            find("starting project", t0, t1),
            find("project started", t0, t1),
        ) else {
            continue;
        };
        for (k, a, b) in [
            ("a_request_to_starting", t0, d0),
            ("b_starting_to_unit_job", d0, u0),
            ("c_unit_job_to_ready", u0, u1),
            ("d_ready_to_started", u1, d1),
            ("e_started_to_answer", d1, t1),
        ] {
            parts.entry(k).or_default().push((b - a) / 1000.0);
        }
    }
    let p = |k: &str| Summary::of(parts.get(k).map_or(&[][..], Vec::as_slice)).p50;
    let sec = "1. start/stop latency";
    let n = parts.get("a_request_to_starting").map_or(0, Vec::len);
    println!("  API start split ({n} rounds matched with the journal), p50 of each part:");
    if n == 0 {
        return;
    }
    ctx.row(
        sec,
        "  part: request → daemon logs \"starting project\" (checks unit, home)",
        p("a_request_to_starting"),
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "  part: → systemd starts the unit's job (StartTransientUnit)",
        p("b_starting_to_unit_job"),
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "  part: unit job → READY (ExecStartPre rm + podman run)",
        p("c_unit_job_to_ready"),
        "ms",
        Some((Method::Raw.label(), raw_p50)),
        Goal::None,
    );
    ctx.row(
        sec,
        "  part: READY → daemon logs \"project started\" (job signal, unit read, store write)",
        p("d_ready_to_started"),
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "  part: → HTTP answer received",
        p("e_started_to_answer"),
        "ms",
        None,
        Goal::None,
    );
    ctx.detail("api_start_parts_ms", json!(parts));
}

struct UnitTimes {
    inactive_exit: f64,
    exec_main_start: f64,
    active_enter: f64,
}

/// A running unit's monotonic timestamps (µs).
async fn unit_timestamps(unit: &str) -> Result<UnitTimes> {
    let out = sh(&format!(
        "systemctl show -p InactiveExitTimestampMonotonic -p ExecMainStartTimestampMonotonic -p ActiveEnterTimestampMonotonic {unit}"
    ))
    .await?;
    let get = |k: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("{unit}: no {k} in {out:?}"))
    };
    Ok(UnitTimes {
        inactive_exit: get("InactiveExitTimestampMonotonic")?,
        exec_main_start: get("ExecMainStartTimestampMonotonic")?,
        active_enter: get("ActiveEnterTimestampMonotonic")?,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. burst

async fn burst(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.burst;
    let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
    let mut homes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        make_home(&format!("project-{id}")).await?;
        homes.push(make_home(&format!("bench-burst-home-{i}")).await?);
    }
    let mut api_all = Vec::new();
    let mut raw_all = Vec::new();
    let mut api_stop = Vec::new();
    let mut raw_stop = Vec::new();
    let mut api_each = Vec::new();
    for rep in 0..ctx.burst_reps {
        for first_api in [rep % 2 == 0, rep % 2 != 0] {
            if first_api {
                let (all, each) = burst_api(ctx, &ids).await?;
                api_all.push(all);
                api_each.extend(each);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t0 = Instant::now();
                let mut js = JoinSet::new();
                for id in ids.clone() {
                    js.spawn(async move { stop_with(Method::Api, &id).await });
                }
                while let Some(r) = js.join_next().await {
                    r??;
                }
                api_stop.push(ms(t0.elapsed()));
            } else {
                let tokens: Vec<String> = (0..n).map(|_| ctx.next_token()).collect();
                let names: Vec<String> = (0..n).map(|i| format!("bench-burst-{rep}-{i}")).collect();
                let above = stats::max_pid();
                let t0 = Instant::now();
                let mut js = JoinSet::new();
                for i in 0..n {
                    let (name, home, token) =
                        (names[i].clone(), homes[i].clone(), tokens[i].clone());
                    js.spawn(async move {
                        let mut a: Vec<String> = vec![
                            "podman".into(),
                            "run".into(),
                            "-d".into(),
                            "--rm".into(),
                            format!("--name={name}"),
                        ];
                        a.extend(container_flags(&home, &name));
                        a.extend(["--".into(), IMAGE.into(), "sleep".into(), token]);
                        stats::run(&a.iter().map(String::as_str).collect::<Vec<_>>()).await
                    });
                }
                while let Some(r) = js.join_next().await {
                    r??;
                }
                stats::wait_payloads(&tokens, above, Duration::from_secs(120)).await?;
                raw_all.push(ms(t0.elapsed()));
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t0 = Instant::now();
                let mut js = JoinSet::new();
                for name in names {
                    js.spawn(async move { stop_with(Method::Raw, &name).await });
                }
                while let Some(r) = js.join_next().await {
                    r??;
                }
                raw_stop.push(ms(t0.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!(
            "  rep {}: API {:.0} ms, podman run {:.0} ms (all {n} running)",
            rep + 1,
            api_all.last().unwrap_or(&0.0),
            raw_all.last().unwrap_or(&0.0)
        );
    }
    let med = |v: &[f64]| Summary::of(v).p50;
    ctx.row(
        "2. burst",
        &format!(
            "{n} concurrent starts → all running (median of {})",
            ctx.burst_reps
        ),
        med(&api_all),
        "ms",
        Some((&format!("{n} concurrent podman run -d"), med(&raw_all))),
        Goal::None,
    );
    let each = Summary::of(&api_each);
    ctx.row(
        "2. burst",
        "  one API start within the burst, p50",
        each.p50,
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        "2. burst",
        "  one API start within the burst, p95",
        each.p95,
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        "2. burst",
        &format!("{n} concurrent stops → all gone (median)"),
        med(&api_stop),
        "ms",
        Some((&format!("{n} concurrent podman stop+rm"), med(&raw_stop))),
        Goal::None,
    );
    ctx.detail(
        "burst_ms",
        json!({"api_all": api_all, "podman_run_all": raw_all, "api_stop_all": api_stop,
               "podman_stop_all": raw_stop, "api_each": api_each}),
    );
    Ok(())
}

/// Starts every project at once through the API; returns the time until all run, and each call's
/// latency.
async fn burst_api(ctx: &Ctx, ids: &[String]) -> Result<(f64, Vec<f64>)> {
    let tokens: Vec<String> = ids.iter().map(|_| ctx.next_token()).collect();
    let above = stats::max_pid();
    let t0 = Instant::now();
    let mut js = JoinSet::new();
    for (id, token) in ids.iter().zip(&tokens) {
        let (id, token) = (id.clone(), token.clone());
        js.spawn(async move {
            let t = Instant::now();
            let v = http::json(
                &api(),
                "POST",
                &format!("/projects/{id}/start"),
                Some(&start_body(&token)),
            )
            .await?;
            if v["state"] != "running" {
                bail!("start {id}: {v}");
            }
            anyhow::Ok(ms(t.elapsed()))
        });
    }
    let mut each = Vec::new();
    while let Some(r) = js.join_next().await {
        each.push(r??);
    }
    stats::wait_payloads(&tokens, above, Duration::from_secs(120)).await?;
    Ok((ms(t0.elapsed()), each))
}

// ---------------------------------------------------------------------------------------------
// 5a. daemon cold start

async fn daemon_main_pid() -> Result<u32> {
    let p: u32 = sh(&format!("systemctl show -p MainPID --value {DAEMON}"))
        .await?
        .parse()?;
    if p == 0 {
        bail!("{DAEMON} has no main process");
    }
    Ok(p)
}

/// `systemctl restart` (returns at READY=1); also the daemon's own exec → READY time.
async fn restart_daemon() -> Result<(f64, f64, f64)> {
    let t0 = Instant::now();
    sh(&format!("systemctl restart {DAEMON}")).await?;
    let wall = ms(t0.elapsed());
    let t = unit_timestamps(DAEMON).await?;
    let internal = (t.active_enter - t.exec_main_start) / 1000.0;
    // the daemon logs "reconciled …" when its picture of systemd and the store is complete
    let reconciled = stats::daemon_journal("MESSAGE=reconciled with systemd and the store")
        .await
        .into_iter()
        .map(|(m, _)| m)
        .find(|m| *m >= t.exec_main_start && *m <= t.active_enter + 1e6)
        .map_or(f64::NAN, |m| (m - t.exec_main_start) / 1000.0);
    Ok((wall, internal, reconciled))
}

async fn daemon_cold(ctx: &mut Ctx) -> Result<()> {
    let reps = 10;
    let mut cold = Vec::new();
    for i in 0..=reps {
        sh(&format!("systemctl stop {DAEMON}")).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        http::json(&api(), "GET", "/healthz", None).await?;
        if i > 0 {
            cold.push(ms(t0.elapsed()));
        }
    }
    // the same for podman's own socket-activated API (podman.socket → podman.service)
    let mut podman_cold = Vec::new();
    if sh("systemctl start podman.socket").await.is_ok() {
        let sock = Target::Unix("/run/podman/podman.sock".into());
        for i in 0..=reps {
            sh_quiet("systemctl stop podman.service").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t0 = Instant::now();
            let (s, _) = http::call(&sock, "GET", "/_ping", None).await?;
            if !s.is_success() {
                bail!("podman.socket /_ping: {s}");
            }
            if i > 0 {
                podman_cold.push(ms(t0.elapsed()));
            }
        }
        sh_quiet("systemctl stop podman.socket podman.service").await;
    }
    let mut warm = Vec::new();
    for _ in 0..100 {
        let t0 = Instant::now();
        http::json(&api(), "GET", "/healthz", None).await?;
        warm.push(ms(t0.elapsed()));
    }
    let c = Summary::of(&cold);
    let p = Summary::of(&podman_cold);
    let w = Summary::of(&warm);
    ctx.row(
        "5. daemon",
        "socket-activated cold start → /healthz, p50",
        c.p50,
        "ms",
        Some(("podman.socket cold start → /_ping", p.p50)),
        Goal::Below,
    );
    ctx.row(
        "5. daemon",
        "  same, against the warm daemon's /healthz",
        c.p50,
        "ms",
        Some(("warm /healthz (new connection)", w.p50)),
        Goal::None,
    );
    let mut restart = Vec::new();
    let mut internal = Vec::new();
    let mut reconcile = Vec::new();
    for _ in 0..ctx.restarts {
        let (a, b, c) = restart_daemon().await?;
        restart.push(a);
        internal.push(b);
        reconcile.push(c);
    }
    ctx.detail(
        "daemon_ms",
        json!({"cold_healthz": cold, "podman_socket_cold_ping": podman_cold, "warm_healthz": warm,
               "restart_0_projects": restart, "exec_to_ready_0_projects": internal,
               "exec_to_reconciled_0_projects": reconcile}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3-5. density, API throughput, restart with many projects

async fn density(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.density;
    // baseline for per-project overhead: conmon of plain `podman run -d` containers
    let home = make_home("bench-density-home").await?;
    let mut raw_rss = Vec::new();
    let mut raw_pss = Vec::new();
    for i in 0..10 {
        let name = format!("bench-d-{i}");
        let token = ctx.next_token();
        start_with(Method::Raw, &name, &home, &token).await?;
        let cpid: u32 = sh(&format!(
            "podman inspect -f '{{{{.State.ConmonPid}}}}' {name}"
        ))
        .await?
        .parse()?;
        raw_rss.push(stats::status_kb(cpid, "VmRSS").unwrap_or(0) as f64);
        raw_pss.push(stats::pss_kb(cpid).unwrap_or(0) as f64);
    }
    sh_quiet("podman ps -a --format '{{.Names}}' | grep '^bench-d-' | xargs -r podman rm -f -t 0")
        .await;

    sh(&format!("systemctl restart {DAEMON}")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = daemon_main_pid().await?;
    let rss_idle = stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    let known_idle = http::json(&api(), "GET", "/projects", None).await?["projects"]
        .as_array()
        .map_or(0, Vec::len);

    // start n projects through the API, 8 at a time (each first start makes its subvolume)
    let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut js = JoinSet::new();
    for id in ids.clone() {
        let token = ctx.next_token();
        let sem = sem.clone();
        js.spawn(async move {
            let _p = sem.acquire_owned().await?;
            let t = Instant::now();
            let v = http::json(
                &api(),
                "POST",
                &format!("/projects/{id}/start"),
                Some(&start_body(&token)),
            )
            .await?;
            if v["state"] != "running" {
                bail!("start {id}: {v}");
            }
            anyhow::Ok(ms(t.elapsed()))
        });
    }
    let mut each = Vec::new();
    while let Some(r) = js.join_next().await {
        each.push(r??);
    }
    let start_all = ms(t0.elapsed());
    println!(
        "  started {n} projects in {:.1} s (8 at a time)",
        start_all / 1000.0
    );
    // let the 5 s MemoryCurrent refresh run at least once
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_n = stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;

    // per-project host overhead: the processes of the project's unit (conmon; the container's
    // own processes live in their libpod scope) and the unit's MemoryCurrent
    let mut unit_rss = Vec::new();
    let mut unit_pss = Vec::new();
    let mut unit_procs = Vec::new();
    let mut memcur = Vec::new();
    for id in ids.iter().take(50) {
        let cg = sh(&format!(
            "systemctl show -p ControlGroup --value cocalc-project-{id}.service"
        ))
        .await?;
        let pids = stats::cgroup_pids(&cg);
        unit_procs.push(json!(
            pids.iter()
                .map(|p| stats::comm(*p))
                .collect::<Vec<_>>()
                .join(",")
        ));
        unit_rss.push(
            pids.iter()
                .filter_map(|p| stats::status_kb(*p, "VmRSS"))
                .sum::<u64>() as f64,
        );
        unit_pss.push(pids.iter().filter_map(|p| stats::pss_kb(*p)).sum::<u64>() as f64);
        let st = http::json(&api(), "GET", &format!("/projects/{id}/status"), None).await?;
        if let Some(m) = st["memory_current"].as_f64() {
            memcur.push(m / 1024.0);
        }
    }
    let procs_kinds: std::collections::BTreeSet<String> = unit_procs
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    println!("  processes in a project's unit: {procs_kinds:?}");

    // list / status of them all
    let mut list = Vec::new();
    let mut list_len = 0;
    for _ in 0..30 {
        let t = Instant::now();
        let v = http::json(&api(), "GET", "/projects", None).await?;
        list.push(ms(t.elapsed()));
        list_len = v["projects"].as_array().map_or(0, Vec::len);
    }
    let t = Instant::now();
    let mut running = 0;
    for id in &ids {
        let v = http::json(&api(), "GET", &format!("/projects/{id}/status"), None).await?;
        running += usize::from(v["state"] == "running");
    }
    let status_all = ms(t.elapsed());
    let mut cli = Vec::new();
    let mut ps = Vec::new();
    let mut rest_list = Vec::new();
    for _ in 0..5 {
        cli.push(ms(
            stats::timed(&["cocalc-project-host", "list", "--json"]).await?
        ));
        ps.push(ms(
            stats::timed(&["podman", "ps", "--format", "json"]).await?
        ));
        let t = Instant::now();
        http::json(&podman_api(), "GET", "/v4.0.0/libpod/containers/json", None).await?;
        rest_list.push(ms(t.elapsed()));
    }

    section(&format!("4. density ({n} projects running)"));
    let sec = "4. density";
    ctx.row(
        sec,
        &format!("daemon RSS, {n} projects running"),
        rss_n,
        "MiB",
        Some((
            &format!("daemon RSS idle ({known_idle} known, 0 running)"),
            rss_idle,
        )),
        Goal::AtMost(40.0),
    );
    let hwm = stats::status_kb(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    ctx.row(
        sec,
        "  daemon peak RSS (VmHWM) so far",
        hwm,
        "MiB",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "  daemon RSS growth per project",
        (rss_n - rss_idle) * 1024.0 / n as f64,
        "KiB",
        None,
        Goal::None,
    );
    let rss = Summary::of(&unit_rss);
    let pss = Summary::of(&unit_pss);
    ctx.row(
        sec,
        "per-project unit RSS (conmon), mean",
        rss.mean,
        "KiB",
        Some((
            "conmon of a podman run -d container",
            Summary::of(&raw_rss).mean,
        )),
        Goal::None,
    );
    ctx.row(
        sec,
        "per-project unit PSS (conmon), mean",
        pss.mean,
        "KiB",
        Some((
            "conmon of a podman run -d container",
            Summary::of(&raw_pss).mean,
        )),
        Goal::None,
    );
    if !memcur.is_empty() {
        ctx.row(
            sec,
            "per-project unit MemoryCurrent (API), mean",
            Summary::of(&memcur).mean,
            "KiB",
            None,
            Goal::None,
        );
    }
    ctx.row(
        sec,
        &format!("start {n} projects via API (8 at a time), total"),
        start_all / 1000.0,
        "s",
        None,
        Goal::None,
    );
    let e = Summary::of(&each);
    ctx.row(
        sec,
        "  one start meanwhile, p50",
        e.p50,
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "  one start meanwhile, p95",
        e.p95,
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        &format!("GET /projects ({list_len} entries), p50"),
        Summary::of(&list).p50,
        "ms",
        Some(("podman ps (CLI), p50", Summary::of(&ps).p50)),
        Goal::None,
    );
    ctx.row(
        sec,
        "  same, against podman REST",
        Summary::of(&list).p50,
        "ms",
        Some((
            "GET /libpod/containers/json, p50",
            Summary::of(&rest_list).p50,
        )),
        Goal::None,
    );
    ctx.row(
        sec,
        &format!("GET status of all {n}, one by one ({running} running)"),
        status_all,
        "ms",
        None,
        Goal::None,
    );
    ctx.row(
        sec,
        "cocalc-project-host list (CLI over D-Bus), p50",
        Summary::of(&cli).p50,
        "ms",
        Some(("podman ps (CLI), p50", Summary::of(&ps).p50)),
        Goal::None,
    );
    ctx.detail(
        "density",
        json!({"daemon_rss_idle_mib": rss_idle, "daemon_rss_mib": rss_n, "unit_rss_kib": unit_rss,
               "unit_pss_kib": unit_pss, "podman_conmon_rss_kib": raw_rss,
               "podman_conmon_pss_kib": raw_pss, "memory_current_kib": memcur,
               "unit_processes": procs_kinds, "start_each_ms": each, "list_ms": list,
               "status_all_ms": status_all, "cli_list_ms": cli, "podman_ps_ms": ps,
               "podman_rest_list_ms": rest_list}),
    );

    if let Err(e) = throughput(ctx, &ids[0]).await {
        println!("  !! API throughput failed: {e:#}");
        ctx.detail("error throughput", json!(format!("{e:#}")));
    }
    let pid = daemon_main_pid().await?;
    let hwm = stats::status_kb(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let rss_after = stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    section(&format!("4. density, after the load runs ({n} running)"));
    ctx.row(
        sec,
        "daemon RSS after the load runs",
        rss_after,
        "MiB",
        Some(("daemon RSS idle", rss_idle)),
        Goal::AtMost(40.0),
    );
    ctx.row(
        sec,
        "  daemon peak RSS (VmHWM)",
        hwm,
        "MiB",
        None,
        Goal::None,
    );

    idle_cpu(ctx, n).await?;
    restart_many(ctx, &ids).await?;

    // stop them all, 8 at a time
    let t0 = Instant::now();
    let mut js = JoinSet::new();
    for id in ids.clone() {
        let sem = sem.clone();
        js.spawn(async move {
            let _p = sem.acquire_owned().await?;
            stop_with(Method::Api, &id).await
        });
    }
    while let Some(r) = js.join_next().await {
        r??;
    }
    ctx.row(
        "4. density",
        &format!("stop {n} projects via API (8 at a time), total"),
        t0.elapsed().as_secs_f64(),
        "s",
        None,
        Goal::None,
    );
    Ok(())
}

/// CPU the daemon and systemd (PID 1) burn while nothing happens, with n projects running,
/// against PID 1 with the daemon stopped.
async fn idle_cpu(ctx: &mut Ctx, n: usize) -> Result<()> {
    let window = Duration::from_secs(20);
    let pid = daemon_main_pid().await?;
    let (d0, s0) = (stats::cpu_secs(pid), stats::cpu_secs(1));
    tokio::time::sleep(window).await;
    let (d1, s1) = (stats::cpu_secs(pid), stats::cpu_secs(1));
    let pct = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .map_or(f64::NAN, |(a, b)| (b - a) / window.as_secs_f64() * 100.0)
    };
    let daemon = pct(d0, d1);
    let pid1_with = pct(s0, s1);
    sh(&format!("systemctl stop {DAEMON}")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s0 = stats::cpu_secs(1);
    tokio::time::sleep(window).await;
    let s1 = stats::cpu_secs(1);
    let pid1_without = pct(s0, s1);
    sh(&format!("systemctl start {DAEMON}")).await?;
    section(&format!("5. idle CPU over 20 s, {n} projects running"));
    ctx.row(
        "5. daemon",
        "daemon CPU, idle",
        daemon,
        "%",
        None,
        Goal::None,
    );
    ctx.row(
        "5. daemon",
        "systemd (PID 1) CPU, idle, daemon running",
        pid1_with,
        "%",
        Some(("PID 1 CPU with the daemon stopped", pid1_without)),
        Goal::None,
    );
    Ok(())
}

async fn restart_many(ctx: &mut Ctx, ids: &[String]) -> Result<()> {
    let n = ids.len();
    let mut wall = Vec::new();
    let mut internal = Vec::new();
    let mut reconcile = Vec::new();
    let mut all = Vec::new();
    for _ in 0..ctx.restarts {
        let t0 = Instant::now();
        let (w, i, rc) = restart_daemon().await?;
        reconcile.push(rc);
        // every project's status correct again
        for id in ids {
            let v = http::json(&api(), "GET", &format!("/projects/{id}/status"), None).await?;
            if v["state"] != "running" {
                bail!("after restart, {id} is {}", v["state"]);
            }
        }
        all.push(ms(t0.elapsed()));
        wall.push(w);
        internal.push(i);
    }
    let base: Vec<f64> = ctx
        .detail
        .get("daemon_ms")
        .and_then(|d| d["restart_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let base_int: Vec<f64> = ctx
        .detail
        .get("daemon_ms")
        .and_then(|d| d["exec_to_ready_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    section(&format!("5. daemon restart with {n} projects running"));
    let med = |v: &[f64]| Summary::of(v).p50;
    ctx.row(
        "5. daemon",
        &format!("restart → READY, {n} running (median of {})", ctx.restarts),
        med(&wall),
        "ms",
        Some(("restart → READY, 0 running", med(&base))),
        Goal::None,
    );
    ctx.row(
        "5. daemon",
        "  daemon exec → READY (reconcile inside)",
        med(&internal),
        "ms",
        Some(("exec → READY, 0 running", med(&base_int))),
        Goal::None,
    );
    let base_rec: Vec<f64> = ctx
        .detail
        .get("daemon_ms")
        .and_then(|d| d["exec_to_reconciled_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    ctx.row(
        "5. daemon",
        "    of which exec → \"reconciled\" logged (reconcile())",
        med(&reconcile),
        "ms",
        Some(("exec → reconciled, 0 running", med(&base_rec))),
        Goal::None,
    );
    ctx.row(
        "5. daemon",
        &format!("restart → all {n} statuses read back running"),
        med(&all),
        "ms",
        None,
        Goal::None,
    );
    ctx.detail(
        "restart_many_ms",
        json!({"restart_ready": wall, "exec_to_ready": internal, "exec_to_reconciled": reconcile,
               "all_status_ok": all}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. API throughput

async fn start_nginx(ctx: &Ctx, files: &[(&str, &[u8])]) -> Result<tokio::process::Child> {
    let dir = format!("{WORK}/nginx");
    for d in ["www", "tmp"] {
        std::fs::create_dir_all(format!("{dir}/{d}"))?;
    }
    for (name, body) in files {
        std::fs::write(format!("{dir}/www/{name}"), body)?;
    }
    let conf = format!(
        "daemon off; master_process on; worker_processes auto; user root root;
pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000000; keepalive_timeout 120s;
  client_body_temp_path {dir}/tmp/body; proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi; uwsgi_temp_path {dir}/tmp/uwsgi; scgi_temp_path {dir}/tmp/scgi;
  types {{ application/json json; }} default_type application/json;
  server {{ listen {NGINX_ADDR}; root {dir}/www; }}
}}
"
    );
    std::fs::write(format!("{dir}/nginx.conf"), conf)?;
    let child = tokio::process::Command::new(&ctx.nginx)
        .args([
            "-p",
            &dir,
            "-e",
            &format!("{dir}/error.log"),
            "-c",
            &format!("{dir}/nginx.conf"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", ctx.nginx))?;
    let t = Target::Tcp(NGINX_ADDR.parse()?);
    wait_for("nginx", Duration::from_secs(10), || async {
        http::call(&t, "GET", &format!("/{}", files[0].0), None)
            .await
            .is_ok()
    })
    .await?;
    Ok(child)
}

/// Asks the host side (scripts/bench) to profile `pid` with perf for `secs`; true once it has
/// started. Without the host side (the suite run by hand) there is no profile.
async fn perf_request(ctx: &Ctx, pids: &[u32], secs: u64, label: &str) -> bool {
    let ack = ctx.out.join(format!("perf-ack-{label}"));
    let _ = std::fs::remove_file(&ack);
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    if std::fs::write(
        ctx.out.join("perf-req"),
        format!("{} {secs} {label}\n", pids.join(",")),
    )
    .is_err()
    {
        return false;
    }
    for _ in 0..50 {
        if ack.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(ctx.out.join("perf-req"));
    false
}

async fn throughput(ctx: &mut Ctx, id: &str) -> Result<()> {
    let conns = ctx.conns;
    let secs = Duration::from_secs(ctx.load_secs);
    let warm = Duration::from_secs(1);
    let status_path = format!("/projects/{id}/status");
    let (_, status_body) = http::call(&api(), "GET", &status_path, None).await?;
    let (_, list_body) = http::call(&api(), "GET", "/projects", None).await?;
    let nginx = start_nginx(
        ctx,
        &[("status.json", &status_body), ("projects.json", &list_body)],
    )
    .await?;
    let r = throughput_runs(ctx, id, &status_path, conns, warm, secs).await;
    // SIGQUIT: graceful, the master takes its workers with it (SIGKILL would orphan them)
    if let Some(pid) = nginx.id() {
        sh_quiet(&format!("kill -QUIT {pid}")).await;
    }
    let mut nginx = nginx;
    let _ = tokio::time::timeout(Duration::from_secs(10), nginx.wait()).await;
    r
}

async fn throughput_runs(
    ctx: &mut Ctx,
    id: &str,
    status_path: &str,
    conns: usize,
    warm: Duration,
    secs: Duration,
) -> Result<()> {
    let status_path = status_path.to_owned();
    let ngx = Target::Tcp(NGINX_ADDR.parse()?);
    let mut loads = Vec::new();
    section(&format!(
        "3. API throughput: {conns} connections, {} s each (+1 s warm-up)",
        ctx.load_secs
    ));
    let runs: [(&str, Target, String); 6] = [
        ("api_status", api(), status_path.clone()),
        ("nginx_status", ngx.clone(), "/status.json".into()),
        ("api_list", api(), "/projects".into()),
        ("nginx_list", ngx.clone(), "/projects.json".into()),
        (
            "podman_inspect",
            podman_api(),
            format!("/v4.0.0/libpod/containers/project-{id}/json"),
        ),
        (
            "podman_list",
            podman_api(),
            "/v4.0.0/libpod/containers/json".into(),
        ),
    ];
    let mut by: BTreeMap<&str, http::Load> = BTreeMap::new();
    for (key, t, path) in runs {
        let l = http::load(&t, &path, conns, warm, secs).await?;
        println!(
            "  {key:<15} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.1} ms  errors {}  ({} B)",
            l.rps,
            l.latency_ms.p50,
            l.latency_ms.p99,
            l.latency_ms.max,
            l.errors,
            l.bytes_per_response
        );
        loads.push(json!({"key": key, "load": l}));
        by.insert(key, l);
        ctx.detail("throughput", json!(loads));
    }
    let sec = "3. API throughput";
    for (what, api_k, ngx_k, pod_k, pod_label) in [
        (
            "GET /projects/:id/status",
            "api_status",
            "nginx_status",
            "podman_inspect",
            "podman REST GET /containers/:name/json",
        ),
        (
            "GET /projects",
            "api_list",
            "nginx_list",
            "podman_list",
            "podman REST GET /containers/json",
        ),
    ] {
        let (a, n, p) = (&by[api_k], &by[ngx_k], &by[pod_k]);
        ctx.row(
            sec,
            &format!("{what}: req/s ({conns} conns)"),
            a.rps,
            "req/s",
            Some(("nginx, same JSON as a static file", n.rps)),
            Goal::RatioAtLeast(0.5),
        );
        ctx.row(
            sec,
            &format!("  {what}: req/s vs podman"),
            a.rps,
            "req/s",
            Some((pod_label, p.rps)),
            Goal::None,
        );
        ctx.row(
            sec,
            &format!("  {what}: p50"),
            a.latency_ms.p50,
            "ms",
            Some(("nginx p50", n.latency_ms.p50)),
            Goal::None,
        );
        ctx.row(
            sec,
            &format!("  {what}: p99"),
            a.latency_ms.p99,
            "ms",
            Some(("nginx p99", n.latency_ms.p99)),
            Goal::AtMost(5.0),
        );
        ctx.row(
            sec,
            &format!("  {what}: errors"),
            a.errors as f64,
            "",
            None,
            Goal::None,
        );
    }
    // profiles (not part of the figures above: perf costs a little)
    let pid = daemon_main_pid().await?;
    for (label, path) in [
        ("api_status", status_path.as_str()),
        ("api_list", "/projects"),
    ] {
        let psecs = 6;
        if perf_request(ctx, &[pid], psecs, label).await {
            let l = http::load(
                &api(),
                path,
                conns,
                Duration::from_millis(200),
                Duration::from_secs(psecs - 1),
            )
            .await?;
            println!("  profiled {label}: {:.0} req/s under perf", l.rps);
            // let perf finish writing
            tokio::time::sleep(Duration::from_secs(2)).await;
        } else {
            println!("  (no profiler on the host side: {label} not profiled)");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. snapshots

async fn snapshots(ctx: &mut Ctx) -> Result<()> {
    let sec = "6. snapshot";
    let sizes = [(10u64, "10 MB"), (ctx.snap_big_mb, "big")];
    let mut api_hook = None;
    let mut results = Vec::new();
    for (mb, _) in sizes {
        let label = if mb >= 1024 && mb % 1024 == 0 {
            format!("{} GB", mb / 1024)
        } else {
            format!("{mb} MB")
        };
        // a real project (its home made by the daemon), filled with incompressible data
        let id = new_id();
        let token = ctx.next_token();
        start_with(Method::Api, &id, "", &token).await?;
        stop_with(Method::Api, &id).await?;
        let home = format!("{STORAGE}/project-{id}");
        sh(&format!(
            "head -c {}M /dev/urandom > {home}/data && chown 101000:101000 {home}/data && sync",
            mb
        ))
        .await?;

        // the API's own snapshot call (names given: default names have one-second resolution)
        let hook = http::call(
            &api(),
            "POST",
            &format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"bench-first"}"#),
        )
        .await;
        match hook {
            Ok((s, _)) if s.is_success() => {
                let mut v = Vec::new();
                for k in 0..5 {
                    let t = Instant::now();
                    http::json(
                        &api(),
                        "POST",
                        &format!("/projects/{id}/snapshots"),
                        Some(&format!("{{\"name\":\"bench-{k}\"}}")),
                    )
                    .await?;
                    v.push(ms(t.elapsed()));
                }
                api_hook = Some(true);
                results.push((label.clone(), "api", Summary::of(&v).p50));
            }
            _ => {
                api_hook.get_or_insert(false);
            }
        }

        let mut snap = Vec::new();
        for k in 0..5 {
            let dst = format!("{STORAGE}/.bench-snap-{id}-{k}");
            sh("sync").await?;
            let t = Instant::now();
            stats::run(&["btrfs", "-q", "subvolume", "snapshot", "-r", &home, &dst]).await?;
            snap.push(ms(t.elapsed()));
            sh(&format!("btrfs -q subvolume delete {dst}")).await?;
        }
        let copy_dst = format!("{STORAGE}/.bench-copy-{id}");
        sh("sync").await?;
        let t = Instant::now();
        sh(&format!("cp -a --reflink=never {home} {copy_dst} && sync")).await?;
        let copy = ms(t.elapsed());
        sh(&format!("rm -rf {copy_dst}")).await?;
        results.push((label.clone(), "btrfs", Summary::of(&snap).p50));
        ctx.row(
            sec,
            &format!("btrfs subvolume snapshot -r of a {label} home, p50 (direct, not the API)"),
            Summary::of(&snap).p50,
            "ms",
            Some((&format!("cp -a of the same {label} + sync"), copy)),
            Goal::None,
        );
        ctx.detail(
            &format!("snapshot_{mb}mb_ms"),
            json!({"btrfs_snapshot": snap, "copy": copy}),
        );
    }
    if api_hook != Some(true) {
        ctx.row(
            sec,
            "API snapshot (POST /projects/:id/snapshots): PLACEHOLDER, not in this build (issue 5)",
            f64::NAN,
            "ms",
            None,
            Goal::None,
        );
    } else {
        for (label, _, v) in results.iter().filter(|r| r.1 == "api") {
            ctx.row(
                sec,
                &format!("API snapshot of a {label} project, p50"),
                *v,
                "ms",
                None,
                Goal::None,
            );
        }
    }
    Ok(())
}
