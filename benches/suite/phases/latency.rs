//! Phase `latency` (alias `start`), section 1: start / stop latency of the API against podman run,
//! systemd-run + podman run and podman's REST API, and where the API's start time goes.
use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Method {
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
pub(super) async fn start_with(
    method: Method,
    slot: &str,
    home: &str,
    token: &str,
) -> Result<Duration> {
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
pub(super) async fn stop_with(method: Method, slot: &str) -> Result<Duration> {
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

pub(super) async fn latency(ctx: &mut Ctx) -> Result<()> {
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
                ctx.rows(
                    "1. start/stop latency",
                    [
                        r(format!("{what} {q}: API vs {}", m.label()), v(&api), "ms")
                            .vs(m.label(), v(&s(m)))
                            .goal(goal),
                    ],
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
pub(super) async fn start_parts(
    ctx: &mut Ctx,
    project: &str,
    rounds: &[(f64, f64, f64, f64)],
    raw_p50: f64,
) {
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
    ctx.rows(
        sec,
        [
            r(
                "  part: request → daemon logs \"starting project\" (checks unit, home)",
                p("a_request_to_starting"),
                "ms",
            ),
            r(
                "  part: → systemd starts the unit's job (StartTransientUnit)",
                p("b_starting_to_unit_job"),
                "ms",
            ),
            r(
                "  part: unit job → READY (podman run until conmon's READY)",
                p("c_unit_job_to_ready"),
                "ms",
            )
                .vs(Method::Raw.label(), raw_p50),
            r(
                "  part: READY → daemon logs \"project started\" (job signal, unit read, store write)",
                p("d_ready_to_started"),
                "ms",
            ),
            r("  part: → HTTP answer received", p("e_started_to_answer"), "ms"),
        ],
    );
    ctx.detail("api_start_parts_ms", json!(parts));
}

pub(super) struct UnitTimes {
    pub(super) inactive_exit: f64,
    pub(super) exec_main_start: f64,
    pub(super) active_enter: f64,
}

/// A running unit's monotonic timestamps (µs).
pub(super) async fn unit_timestamps(unit: &str) -> Result<UnitTimes> {
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
