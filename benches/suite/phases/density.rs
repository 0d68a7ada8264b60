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
            timed_start(&id, &token).await
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
    ctx.rows(
        "4. density",
        [r(
            format!("stop {n} projects via API (8 at a time), total"),
            t0.elapsed().as_secs_f64(),
            "s",
        )],
    );
    Ok(())
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
        .get("daemon_ms")
        .and_then(|d| d["exec_to_reconciled_0_projects"].as_array())
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
                format!("restart → all {n} statuses read back running"),
                med(&all),
                "ms",
            ),
        ],
    );
    ctx.detail(
        "restart_many_ms",
        json!({"restart_ready": wall, "exec_to_ready": internal, "exec_to_reconciled": reconcile,
               "all_status_ok": all}),
    );
    Ok(())
}
