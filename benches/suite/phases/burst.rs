//! Phase `burst`, section 2: many starts (and stops) at once, API against podman.
use super::*;

pub(super) async fn burst(ctx: &mut Ctx) -> Result<()> {
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
    ctx.rows(
        "2. burst",
        [r(
            format!(
                "{n} concurrent starts → all running (median of {})",
                ctx.burst_reps
            ),
            med(&api_all),
            "ms",
        )
        .vs(format!("{n} concurrent podman run -d"), med(&raw_all))],
    );
    let each = Summary::of(&api_each);
    ctx.rows(
        "2. burst",
        [
            r("  one API start within the burst, p50", each.p50, "ms"),
            r("  one API start within the burst, p95", each.p95, "ms"),
            r(
                format!("{n} concurrent stops → all gone (median)"),
                med(&api_stop),
                "ms",
            )
            .vs(format!("{n} concurrent podman stop+rm"), med(&raw_stop)),
        ],
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
pub(super) async fn burst_api(ctx: &Ctx, ids: &[String]) -> Result<(f64, Vec<f64>)> {
    let tokens: Vec<String> = ids.iter().map(|_| ctx.next_token()).collect();
    let above = stats::max_pid();
    let t0 = Instant::now();
    let mut js = JoinSet::new();
    for (id, token) in ids.iter().zip(&tokens) {
        let (id, token) = (id.clone(), token.clone());
        js.spawn(async move { timed_start(&id, &token).await });
    }
    let mut each = Vec::new();
    while let Some(r) = js.join_next().await {
        each.push(r??);
    }
    stats::wait_payloads(&tokens, above, Duration::from_secs(120)).await?;
    Ok((ms(t0.elapsed()), each))
}
