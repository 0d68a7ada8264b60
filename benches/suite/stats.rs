//! Percentiles and a few helpers for the machine inside the testbed (processes, commands, /proc).
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Percentile summary of samples (in the unit of the samples).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        // nearest rank
        let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Summary {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(0.50),
            p90: q(0.90),
            p95: q(0.95),
            p99: q(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a program (no shell), failing with its stderr unless it exits 0; returns stdout.
pub async fn run(argv: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("spawn {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell command line, failing unless it exits 0; returns trimmed stdout.
pub async fn sh(cmd: &str) -> Result<String> {
    Ok(run(&["/bin/sh", "-c", cmd]).await?.trim().to_owned())
}

/// Like [`sh`] but ignores failure.
pub async fn sh_quiet(cmd: &str) -> String {
    sh(cmd).await.unwrap_or_default()
}

/// Times one run of `argv` (which must succeed).
pub async fn timed(argv: &[&str]) -> Result<Duration> {
    let t0 = Instant::now();
    run(argv).await?;
    Ok(t0.elapsed())
}

/// The highest pid now in /proc (pids only grow between two looks, barring wrap-around).
pub fn max_pid() -> u32 {
    pids().into_iter().max().unwrap_or(0)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until a process whose command line is exactly `sleep <token>` exists (the container's
/// payload running), polling /proc every 2 ms, looking only at pids above `above` (or all of them
/// once pids wrapped). Returns when it appears, or fails after `timeout`.
pub async fn wait_payload(token: &str, above: u32, timeout: Duration) -> Result<()> {
    let want = format!("sleep\0{token}\0");
    let t0 = Instant::now();
    loop {
        let ps = pids();
        let wrapped = ps.iter().all(|p| *p <= above);
        for p in ps.into_iter().filter(|p| wrapped || *p > above) {
            if let Ok(c) = std::fs::read(format!("/proc/{p}/cmdline"))
                && c == want.as_bytes()
            {
                return Ok(());
            }
        }
        if t0.elapsed() > timeout {
            bail!("no process `sleep {token}` after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A field of /proc/<pid>/status in kB (VmRSS, VmHWM, …).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Pss of a process in kB (its share of pages it has in common with others).
pub fn pss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// User + system CPU time a process has used, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command (which may hold spaces), which ends at the last ')'
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The comm (program name) of a process.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The processes of a cgroup's whole subtree but the container's own (`libpod-payload-*`, the
/// project's processes): what a project costs the host outside its container. With podman's
/// `--cgroups=split` the unit's top cgroup is empty and conmon sits in `<unit>/runtime`.
pub fn cgroup_host_side_pids(rel: &str) -> Vec<u32> {
    fn walk(dir: &std::path::Path, out: &mut Vec<u32>) {
        if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !name.starts_with("libpod-payload-") {
                walk(&e.path(), out);
            }
        }
    }
    for base in [
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let top = std::path::PathBuf::from(format!("{base}{rel}"));
        if top.join("cgroup.procs").exists() {
            let mut out = Vec::new();
            walk(&top, &mut out);
            return out;
        }
    }
    Vec::new()
}

/// Like [`wait_payload`] for several tokens: returns once every one of them runs.
pub async fn wait_payloads(tokens: &[String], above: u32, timeout: Duration) -> Result<()> {
    let mut want: std::collections::HashSet<Vec<u8>> = tokens
        .iter()
        .map(|t| format!("sleep\0{t}\0").into_bytes())
        .collect();
    let t0 = Instant::now();
    while !want.is_empty() {
        let ps = pids();
        let wrapped = ps.iter().all(|p| *p <= above);
        for p in ps.into_iter().filter(|p| wrapped || *p > above) {
            if let Ok(c) = std::fs::read(format!("/proc/{p}/cmdline")) {
                want.remove(&c);
            }
        }
        if want.is_empty() {
            break;
        }
        if t0.elapsed() > timeout {
            bail!("{} payloads not running after {timeout:?}", want.len());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// CLOCK_MONOTONIC in µs: the clock of systemd's `…TimestampMonotonic` properties and of the
/// journal's `__MONOTONIC_TIMESTAMP` (one kernel, no time namespace in the testbed).
pub fn mono_us() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(f64::NAN, |t| {
        t.tv_sec() as f64 * 1e6 + t.tv_nsec() as f64 / 1e3
    })
}

/// The daemon's journal entries (monotonic µs, MESSAGE) matching `filter` (e.g. `PROJECT_ID=…`).
pub async fn daemon_journal(filter: &str) -> Vec<(f64, String)> {
    let out = run(&[
        "journalctl",
        "-q",
        "--no-pager",
        "-o",
        "json",
        "SYSLOG_IDENTIFIER=cocalc-project-host",
        filter,
    ])
    .await
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let t: f64 = v["__MONOTONIC_TIMESTAMP"].as_str()?.parse().ok()?;
            Some((t, v["MESSAGE"].as_str()?.to_owned()))
        })
        .collect()
}
