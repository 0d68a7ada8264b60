//! Phase `density`, sections 3-5: many projects running: memory per project, list/status, API
//! throughput (throughput.rs), idle CPU, a daemon restart with them all.
use super::*;

pub(super) async fn density(ctx: &mut Ctx) -> Result<()> {
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

    // restart with nothing running: the baseline of the restart rows, in this phase (a density
    // run on its own has no cold phase)
    restart_baseline(ctx).await?;
    sh(&format!("systemctl restart {DAEMON}")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = daemon_main_pid().await?;
    let rss_idle = stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    let known_idle = http::json(&api(), "GET", "/projects", None).await?["projects"]
        .as_array()
        .map_or(0, Vec::len);

    // start n projects through the API, 8 at a time (each first start makes its subvolume), in
    // chunks between the curve's levels; at each level one start and one stop are timed (API and
    // plain podman), with systemd's and podman's own listing and a sandboxed unit's start
    let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
    let levels = levels(n);
    let probe_id = new_id();
    let probe_home = make_home("bench-curve-home").await?;
    let mut curve: Vec<Level> = Vec::new();
    let mut chunks_up: Vec<Chunk> = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut each = Vec::new();
    for (i, &k) in levels.iter().enumerate() {
        let lv = probe_level(ctx, k, &probe_id, &probe_home, pid).await?;
        println!(
            "  at {k:>5} running: API start {:.0} / stop {:.0} ms; podman run {:.0} / rm {:.0} ms; list-units {:.0} ms; podman ps {:.0} ms; sandboxed unit {:.0} ms (plain {:.0}); {} mounts; RSS {:.1} MiB",
            lv.api_start,
            lv.api_stop,
            lv.raw_start,
            lv.raw_stop,
            lv.list_units,
            lv.podman_ps,
            lv.sandboxed_unit,
            lv.plain_unit,
            lv.mounts,
            lv.rss_mib
        );
        curve.push(lv);
        let Some(&next) = levels.get(i + 1) else {
            break;
        };
        let t = Instant::now();
        let (lat, status) = start_chunk(ctx, &ids[k..next], &sem, &probe_id).await?;
        let secs = t.elapsed().as_secs_f64();
        let c = Chunk {
            from: k,
            to: next,
            secs,
            status_p99: Summary::of(&status).p99,
            each_p50: Summary::of(&lat).p50,
        };
        println!(
            "  started {k} → {next}: {:.1} s, {:.2}/s; one start p50 {:.0} ms; status p99 meanwhile {:.1} ms ({} reads)",
            secs,
            (next - k) as f64 / secs,
            c.each_p50,
            c.status_p99,
            status.len()
        );
        each.extend(lat);
        chunks_up.push(c);
    }
    let start_all: f64 = chunks_up.iter().map(|c| c.secs * 1000.0).sum();
    // let the 5 s MemoryCurrent refresh run at least once
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_n = stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;

    // per-project host overhead: the processes of the project's unit outside its container
    // (conmon, in `<unit>/runtime` with --cgroups=split; the container's own processes live in
    // `<unit>/libpod-payload-…`) and the unit's MemoryCurrent
    let mut unit_rss = Vec::new();
    let mut unit_pss = Vec::new();
    let mut unit_procs = Vec::new();
    let mut memcur = Vec::new();
    for id in ids.iter().take(50) {
        let cg = sh(&format!(
            "systemctl show -p ControlGroup --value cocalc-project-{id}.service"
        ))
        .await?;
        let pids = stats::cgroup_host_side_pids(&cg);
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
    if unit_procs
        .iter()
        .all(|v| v.as_str().is_none_or(str::is_empty))
    {
        bail!(
            "no process found in any running project's unit outside its container (where is conmon?)"
        );
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
    let hwm = stats::status_kb(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let conmon = "conmon of a podman run -d container";
    let ps_p50 = ("podman ps (CLI), p50", Summary::of(&ps).p50);
    let e = Summary::of(&each);
    let mut rows = vec![
        r(format!("daemon RSS, {n} projects running"), rss_n, "MiB")
            .vs(
                format!("daemon RSS idle ({known_idle} known, 0 running)"),
                rss_idle,
            )
            .goal(Goal::AtMost(40.0)),
        r("  daemon peak RSS (VmHWM) so far", hwm, "MiB"),
        r(
            "  daemon RSS growth per project",
            (rss_n - rss_idle) * 1024.0 / n as f64,
            "KiB",
        ),
        r(
            "per-project host-side RSS (conmon in <unit>/runtime), mean",
            Summary::of(&unit_rss).mean,
            "KiB",
        )
        .vs(conmon, Summary::of(&raw_rss).mean),
        r(
            "per-project host-side PSS (conmon in <unit>/runtime), mean",
            Summary::of(&unit_pss).mean,
            "KiB",
        )
        .vs(conmon, Summary::of(&raw_pss).mean),
    ];
    if !memcur.is_empty() {
        rows.push(r(
            "per-project unit MemoryCurrent (API), mean",
            Summary::of(&memcur).mean,
            "KiB",
        ));
    }
    rows.extend([
        r(
            format!("start {n} projects via API (8 at a time), total"),
            start_all / 1000.0,
            "s",
        ),
        r("  one start meanwhile, p50", e.p50, "ms"),
        r("  one start meanwhile, p95", e.p95, "ms"),
        r(
            format!("GET /projects ({list_len} entries), p50"),
            Summary::of(&list).p50,
            "ms",
        )
        .vs(ps_p50.0, ps_p50.1),
        r("  same, against podman REST", Summary::of(&list).p50, "ms").vs(
            "GET /libpod/containers/json, p50",
            Summary::of(&rest_list).p50,
        ),
        r(
            format!("GET status of all {n}, one by one ({running} running)"),
            status_all,
            "ms",
        ),
        r(
            "cocalc-project-host list (CLI over D-Bus), p50",
            Summary::of(&cli).p50,
            "ms",
        )
        .vs(ps_p50.0, ps_p50.1),
    ]);
    ctx.rows(sec, rows);
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
    ctx.rows(
        sec,
        [
            r("daemon RSS after the load runs", rss_after, "MiB")
                .vs("daemon RSS idle", rss_idle)
                .goal(Goal::AtMost(40.0)),
            r("  daemon peak RSS (VmHWM)", hwm, "MiB"),
        ],
    );

    // systemd builds the daemon's sandbox (a mount namespace) at every start, reading the mount
    // table over and over: with ~2 podman mounts per running project that outgrows the unit's
    // 90 s start timeout near 1000 projects (systemd 252). A longer one, for this phase only, so
    // the restart is measured (and the stops below have a daemon to talk to).
    let dropin = "/run/systemd/system/cocalc-project-host.service.d";
    sh(&format!(
        "mkdir -p {dropin} && printf '[Service]\\nTimeoutStartSec=900\\n' > {dropin}/90-bench-density.conf && systemctl daemon-reload"
    ))
    .await?;
    let restarts = async {
        idle_cpu(ctx, n).await?;
        restart_many(ctx, &ids).await
    }
    .await;
    if let Err(e) = restarts {
        println!("  !! idle CPU / restart with {n} running failed: {e:#}");
        ctx.detail("error restart_many", json!(format!("{e:#}")));
        // the stops below need the daemon
        sh_quiet(&format!("systemctl start {DAEMON}")).await;
    }
    sh_quiet(&format!(
        "rm -f {dropin}/90-bench-density.conf && systemctl daemon-reload"
    ))
    .await;

    // stop them all, 8 at a time, in chunks down the curve's levels
    let mut chunks_down: Vec<Chunk> = Vec::new();
    let mut stop_total = 0.0;
    for w in levels.windows(2).rev() {
        let (lo, hi) = (w[0], w[1]);
        let t = Instant::now();
        let mut js = JoinSet::new();
        for id in &ids[lo..hi] {
            let id = id.clone();
            let sem = sem.clone();
            js.spawn(async move {
                let _p = sem.acquire_owned().await?;
                stop_with(Method::Api, &id).await
            });
        }
        while let Some(r) = js.join_next().await {
            r??;
        }
        let secs = t.elapsed().as_secs_f64();
        stop_total += secs;
        println!(
            "  stopped {hi} → {lo}: {secs:.1} s, {:.2}/s",
            (hi - lo) as f64 / secs
        );
        chunks_down.push(Chunk {
            from: hi,
            to: lo,
            secs,
            status_p99: f64::NAN,
            each_p50: f64::NAN,
        });
    }
    ctx.rows(
        "4. density",
        [r(
            format!("stop {n} projects via API (8 at a time), total"),
            stop_total,
            "s",
        )],
    );
    curve_rows(ctx, &curve, &chunks_up, &chunks_down);
    Ok(())
}

/// The curve's levels: 0, 200, 500, 1000, 2000 below `n`, then `n`.
fn levels(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [0, 200, 500, 1000, 2000]
        .into_iter()
        .filter(|l| *l < n)
        .collect();
    v.push(n);
    v
}

/// What one level of the curve measured (ms unless named otherwise).
#[derive(Debug, Clone, serde::Serialize)]
struct Level {
    running: usize,
    api_start: f64,
    api_stop: f64,
    raw_start: f64,
    raw_stop: f64,
    list_units: f64,
    podman_ps: f64,
    plain_unit: f64,
    sandboxed_unit: f64,
    mounts: usize,
    rss_mib: f64,
}

/// 8-at-a-time starts or stops between two levels.
#[derive(Debug, Clone, serde::Serialize)]
struct Chunk {
    from: usize,
    to: usize,
    secs: f64,
    status_p99: f64,
    each_p50: f64,
}

impl Chunk {
    fn rate(&self) -> f64 {
        self.from.abs_diff(self.to) as f64 / self.secs
    }
}

/// The mount-namespace options of the daemon's own unit (debian/cocalc-project-host.service):
/// systemd builds that namespace at every daemon start, walking the whole mount table.
const DAEMON_SANDBOX: &[&str] = &[
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateMounts=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
];

/// One level of the curve with `k` projects running: `BENCH_CURVE_ROUNDS` (5) start/stop rounds of
/// one more project through the API and of a plain `podman run -d` (alternating), p50 of each;
/// `systemctl list-units` and `podman ps` (p50 of 3); one `systemd-run --wait true` plain and
/// with the daemon's sandbox; the host's mount count; the daemon's RSS.
async fn probe_level(ctx: &Ctx, k: usize, id: &str, home: &str, pid: u32) -> Result<Level> {
    let rounds = env_num("BENCH_CURVE_ROUNDS", 5) as usize;
    let (mut a1, mut a2, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let raw = "bench-curve-raw";
    for i in 0..=rounds {
        let token = ctx.next_token();
        let s = start_with(Method::Api, id, home, &token).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let p = stop_with(Method::Api, id).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let token = ctx.next_token();
        let rs = start_with(Method::Raw, raw, home, &token).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let rp = stop_with(Method::Raw, raw).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // the first round warms up (the probe's first start makes its subvolume)
        if i > 0 {
            a1.push(ms(s));
            a2.push(ms(p));
            b1.push(ms(rs));
            b2.push(ms(rp));
        }
    }
    let mut lu = Vec::new();
    let mut ps = Vec::new();
    for _ in 0..3 {
        lu.push(ms(stats::timed(&[
            "systemctl",
            "list-units",
            "--no-pager",
            "--all",
        ])
        .await?));
        ps.push(ms(stats::timed(&["podman", "ps", "-q"]).await?));
    }
    let unit = |props: &[&str]| {
        let mut argv: Vec<String> = vec!["systemd-run".into(), "--quiet".into(), "--wait".into()];
        for p in props {
            argv.push("-p".into());
            argv.push((*p).into());
        }
        argv.push("/bin/true".into());
        argv
    };
    let timed = |argv: Vec<String>| async move {
        let a: Vec<&str> = argv.iter().map(String::as_str).collect();
        stats::timed(&a).await.map(ms)
    };
    let plain_unit = timed(unit(&[])).await?;
    let sandboxed_unit = timed(unit(DAEMON_SANDBOX)).await?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_or(0, |m| m.lines().count());
    let p50 = |v: &[f64]| Summary::of(v).p50;
    Ok(Level {
        running: k,
        api_start: p50(&a1),
        api_stop: p50(&a2),
        raw_start: p50(&b1),
        raw_stop: p50(&b2),
        list_units: p50(&lu),
        podman_ps: p50(&ps),
        plain_unit,
        sandboxed_unit,
        mounts,
        rss_mib: stats::status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0,
    })
}

/// Starts `ids` through the API, 8 at a time, while one client reads a status in a loop: each
/// start's time and each status read's time (ms).
async fn start_chunk(
    ctx: &Ctx,
    ids: &[String],
    sem: &Arc<tokio::sync::Semaphore>,
    status_of: &str,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = done.clone();
        let path = format!("/projects/{status_of}/status");
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                if http::json(&api(), "GET", &path, None).await.is_ok() {
                    lat.push(ms(t.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lat
        })
    };
    let mut js = JoinSet::new();
    for id in ids {
        let id = id.clone();
        let token = ctx.next_token();
        let sem = sem.clone();
        js.spawn(async move {
            let _p = sem.acquire_owned().await?;
            timed_start(&id, &token).await
        });
    }
    let mut each = Vec::new();
    let mut err = None;
    while let Some(r) = js.join_next().await {
        match r? {
            Ok(t) => each.push(t),
            Err(e) => err = Some(e),
        }
    }
    done.store(true, Ordering::Relaxed);
    let status = poller.await?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok((each, status))
}

/// The rows of the curve: each level against level 0 in the same run.
fn curve_rows(ctx: &mut Ctx, curve: &[Level], up: &[Chunk], down: &[Chunk]) {
    let Some(z) = curve.first().cloned() else {
        return;
    };
    let top = curve.last().map_or(0, |l| l.running);
    let sec = "4. density";
    let mut rows = Vec::new();
    for l in curve.iter().skip(1) {
        let k = l.running;
        let goal = |g: Goal| if k == top { g } else { Goal::None };
        rows.extend([
            r(
                format!("one API start at {k} running, p50"),
                l.api_start,
                "ms",
            )
            .vs("one API start at 0 running", z.api_start)
            .goal(goal(Goal::RatioAtMost(1.2))),
            r(
                format!("one API stop at {k} running, p50"),
                l.api_stop,
                "ms",
            )
            .vs("one API stop at 0 running", z.api_stop)
            .goal(goal(Goal::RatioAtMost(1.2))),
            r(
                format!("  podman run -d at {k} running, p50 (podman's own growth)"),
                l.raw_start,
                "ms",
            )
            .vs("podman run -d at 0 running", z.raw_start),
            r(
                format!("  podman stop + rm at {k} running, p50"),
                l.raw_stop,
                "ms",
            )
            .vs("podman stop + rm at 0 running", z.raw_stop),
            r(
                format!("  systemctl list-units --all at {k} running, p50"),
                l.list_units,
                "ms",
            )
            .vs("same at 0 running", z.list_units),
            r(
                format!("  podman ps at {k} running, p50"),
                l.podman_ps,
                "ms",
            )
            .vs("same at 0 running", z.podman_ps),
            r(
                format!(
                    "  a unit with the daemon's sandbox, start → exit at {k} running ({} mounts)",
                    l.mounts
                ),
                l.sandboxed_unit,
                "ms",
            )
            .vs(
                format!("same at 0 running ({} mounts)", z.mounts),
                z.sandboxed_unit,
            ),
            r(
                format!("  a plain unit, start → exit at {k} running"),
                l.plain_unit,
                "ms",
            )
            .vs("same at 0 running", z.plain_unit),
            r(format!("  daemon RSS at {k} running"), l.rss_mib, "MiB")
                .vs("daemon RSS at 0 running", z.rss_mib)
                .goal(goal(Goal::AtMost(40.0))),
        ]);
    }
    if let Some(first) = up.first().cloned() {
        for c in up {
            let high = c.from >= 500;
            rows.push(
                r(
                    format!("API starts, 8 at a time, {} → {} running", c.from, c.to),
                    c.rate(),
                    "/s",
                )
                .vs(
                    format!("same, {} → {} running", first.from, first.to),
                    first.rate(),
                )
                .goal(if high {
                    Goal::RatioAtLeast(0.8)
                } else {
                    Goal::None
                }),
            );
            rows.push(
                r(
                    format!("  GET status p99 meanwhile ({} → {})", c.from, c.to),
                    c.status_p99,
                    "ms",
                )
                .goal(Goal::AtMost(10.0)),
            );
        }
    }
    // the last chunk stopped is the lowest (… → 0)
    if let Some(base) = down.last().cloned() {
        for c in down {
            rows.push(
                r(
                    format!("API stops, 8 at a time, {} → {} running", c.from, c.to),
                    c.rate(),
                    "/s",
                )
                .vs(
                    format!("same, {} → {} running", base.from, base.to),
                    base.rate(),
                )
                .goal(if c.to >= 500 {
                    Goal::RatioAtLeast(0.8)
                } else {
                    Goal::None
                }),
            );
        }
    }
    ctx.rows(sec, rows);
    ctx.detail(
        "density_curve",
        json!({"levels": curve, "starts": up, "stops": down}),
    );
}

/// Restarts with no project running (the baseline of the restart rows), as the cold phase does.
async fn restart_baseline(ctx: &mut Ctx) -> Result<()> {
    let mut restart = Vec::new();
    let mut internal = Vec::new();
    let mut reconcile = Vec::new();
    let mut inside = Vec::new();
    for _ in 0..ctx.restarts {
        let (a, b, c) = restart_daemon().await?;
        restart.push(a);
        internal.push(b);
        reconcile.push(c);
        inside.push(reconcile_took_ms().await);
    }
    ctx.detail(
        "daemon_ms_density",
        json!({"restart_0_projects": restart, "exec_to_ready_0_projects": internal,
               "exec_to_reconciled_0_projects": reconcile, "reconcile_took_0_projects": inside}),
    );
    Ok(())
}

/// `took_ms` of the daemon's last "reconciled" log line: reconcile()'s own time, without the
/// process start before it (systemd's sandbox setup, the store, the bus connection).
async fn reconcile_took_ms() -> f64 {
    let out = stats::run(&[
        "journalctl",
        "-q",
        "--no-pager",
        "-o",
        "json",
        "-n",
        "1",
        "SYSLOG_IDENTIFIER=cocalc-project-host",
        "MESSAGE=reconciled with systemd and the store",
    ])
    .await
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["TOOK_MS"].as_str()?.parse().ok())
        .next_back()
        .unwrap_or(f64::NAN)
}

/// CPU the daemon and systemd (PID 1) burn while nothing happens, with n projects running,
/// against PID 1 with the daemon stopped.
pub(super) async fn idle_cpu(ctx: &mut Ctx, n: usize) -> Result<()> {
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
    ctx.rows(
        "5. daemon",
        [
            r("daemon CPU, idle", daemon, "%"),
            r("systemd (PID 1) CPU, idle, daemon running", pid1_with, "%")
                .vs("PID 1 CPU with the daemon stopped", pid1_without),
        ],
    );
    Ok(())
}

pub(super) async fn restart_many(ctx: &mut Ctx, ids: &[String]) -> Result<()> {
    let n = ids.len();
    let mut wall = Vec::new();
    let mut internal = Vec::new();
    let mut reconcile = Vec::new();
    let mut all = Vec::new();
    let mut took = Vec::new();
    for _ in 0..ctx.restarts {
        let t0 = Instant::now();
        let (w, i, rc) = restart_daemon().await?;
        reconcile.push(rc);
        took.push(reconcile_took_ms().await);
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
        .get("daemon_ms_density")
        .and_then(|d| d["restart_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let base_int: Vec<f64> = ctx
        .detail
        .get("daemon_ms_density")
        .and_then(|d| d["exec_to_ready_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    section(&format!("5. daemon restart with {n} projects running"));
    let med = |v: &[f64]| Summary::of(v).p50;
    ctx.rows(
        "5. daemon",
        [
            r(
                format!("restart → READY, {n} running (median of {})", ctx.restarts),
                med(&wall),
                "ms",
            )
            .vs("restart → READY, 0 running", med(&base)),
            r(
                "  daemon exec → READY (reconcile inside)",
                med(&internal),
                "ms",
            )
            .vs("exec → READY, 0 running", med(&base_int)),
        ],
    );
    let base_rec: Vec<f64> = ctx
        .detail
        .get("daemon_ms_density")
        .and_then(|d| d["exec_to_reconciled_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let base_took: Vec<f64> = ctx
        .detail
        .get("daemon_ms_density")
        .and_then(|d| d["reconcile_took_0_projects"].as_array())
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    ctx.rows(
        "5. daemon",
        [
            r(
                "    of which exec → \"reconciled\" logged (reconcile())",
                med(&reconcile),
                "ms",
            )
            .vs("exec → reconciled, 0 running", med(&base_rec)),
            r(
                "      of which reconcile() itself (its took_ms)",
                med(&took),
                "ms",
            )
            .vs("same, 0 running", med(&base_took)),
            r(
                "      of which before reconcile() (systemd's sandbox setup, store, bus)",
                med(&reconcile) - med(&took),
                "ms",
            )
            .vs("same, 0 running", med(&base_rec) - med(&base_took)),
            r(
                format!("restart → all {n} statuses read back running"),
                med(&all),
                "ms",
            ),
        ],
    );
    ctx.detail(
        "restart_many_ms",
        json!({"restart_ready": wall, "exec_to_ready": internal, "exec_to_reconciled": reconcile,
               "reconcile_took": took,
               "all_status_ok": all}),
    );
    Ok(())
}
