//! Phase `freeze`, section 9: idle freeze and thaw. A project serving a small file (busybox
//! httpd, `network: none`) with `idle_freeze` of 1 s: a GET through the proxy while it is frozen
//! (thaw to first byte: the connection's thaw, the connect into its namespace, httpd's answer)
//! against the same GET right after, while it runs (each on a fresh client connection; busybox
//! httpd answers one request per connection, so both make a fresh connection into the project).
//! The daemon's own thaw time (its histogram `cocalc_project_thaw_duration_seconds`) is
//! reported beside.
use super::*;

const PORT: u16 = 8000;

fn body(freeze: &str) -> String {
    let script = "cd /home/user && echo hello > hello.txt && exec httpd -f -p 8000 -h /home/user";
    json!({"config": {"network": "none", "idle_freeze": freeze,
                      "cmd": ["/bin/sh", "-c", script]}})
    .to_string()
}

async fn state(id: &str) -> Result<String> {
    let v = http::json(&api(), "GET", &format!("/projects/{id}/status"), None).await?;
    Ok(v["state"].as_str().unwrap_or_default().to_string())
}

/// One GET through the proxy; ms to the whole (tiny) answer.
async fn get(path: &str) -> Result<f64> {
    let proxied = Target::Tcp("127.0.0.1:8080".parse()?);
    let t = Instant::now();
    let (s, b) = http::call(&proxied, "GET", path, None).await?;
    let took = ms(t.elapsed());
    if !s.is_success() || &b[..] != b"hello\n" {
        bail!("GET {path}: {s} {:?}", String::from_utf8_lossy(&b));
    }
    Ok(took)
}

pub(super) async fn freeze(ctx: &mut Ctx) -> Result<()> {
    let sec = "9. idle freeze and thaw";
    let n = ctx.n.clamp(3, 20);
    let id = new_id();
    http::json(
        &api(),
        "POST",
        &format!("/projects/{id}/start"),
        Some(&body("1s")),
    )
    .await?;
    let path = format!("/{id}/server/{PORT}/hello.txt");
    wait_for("httpd in the project", Duration::from_secs(30), || async {
        get(&path).await.is_ok()
    })
    .await?;
    let run = async {
        let mut frozen = Vec::new();
        let mut running = Vec::new();
        for _ in 0..n {
            wait_for("the project frozen", Duration::from_secs(30), || async {
                state(&id).await.is_ok_and(|s| s == "frozen")
            })
            .await?;
            frozen.push(get(&path).await?);
            // right after: it runs (thawed by the request, not idle for a second yet)
            running.push(get(&path).await?);
        }
        anyhow::Ok((frozen, running))
    }
    .await;
    let metrics = http::call(&api(), "GET", "/metrics", None)
        .await
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let _ = http::call(
        &api(),
        "POST",
        &format!("/projects/{id}/stop"),
        Some(r#"{"force":true}"#),
    )
    .await;
    let (frozen, running) = run?;
    let (f, run_s) = (Summary::of(&frozen), Summary::of(&running));
    // the daemon's own thaw: sum / count of its histogram
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let thaw_ms = match (
        metric("cocalc_project_thaw_duration_seconds_sum"),
        metric("cocalc_project_thaw_duration_seconds_count"),
    ) {
        (Some(s), Some(c)) if c > 0.0 => s / c * 1000.0,
        _ => f64::NAN,
    };
    println!(
        "  GET through the proxy: frozen p50 {:.2} ms max {:.2} ms; running p50 {:.2} ms; daemon's thaw mean {thaw_ms:.2} ms",
        f.p50, f.max, run_s.p50
    );
    ctx.detail(
        "freeze",
        json!({"frozen_ms": frozen, "running_ms": running, "thaw_mean_ms": thaw_ms}),
    );
    ctx.rows(
        sec,
        [
            r(
                format!("GET through the proxy, project frozen: thaw to answer p50 (n={n})"),
                f.p50,
                "ms",
            )
            .vs("the same GET, project running", run_s.p50)
            .goal(Goal::AtMost(50.0)),
            r("  … max", f.max, "ms")
                .vs("running max", run_s.max)
                .goal(Goal::AtMost(50.0)),
            r("  daemon's own thaw (mean, from /metrics)", thaw_ms, "ms"),
        ],
    );
    Ok(())
}
