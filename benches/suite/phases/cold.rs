//! Phase `cold`, section 5a: the daemon's cold start (socket activation, restart to READY=1).
use super::*;

pub(super) async fn daemon_main_pid() -> Result<u32> {
    let p: u32 = sh(&format!("systemctl show -p MainPID --value {DAEMON}"))
        .await?
        .parse()?;
    if p == 0 {
        bail!("{DAEMON} has no main process");
    }
    Ok(p)
}

/// `systemctl restart` (returns at READY=1); also the daemon's own exec → READY time.
pub(super) async fn restart_daemon() -> Result<(f64, f64, f64)> {
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

pub(super) async fn daemon_cold(ctx: &mut Ctx) -> Result<()> {
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
    ctx.rows(
        "5. daemon",
        [
            r("socket-activated cold start → /healthz, p50", c.p50, "ms")
                .vs("podman.socket cold start → /_ping", p.p50)
                .goal(Goal::Below),
            r("  same, against the warm daemon's /healthz", c.p50, "ms")
                .vs("warm /healthz (new connection)", w.p50),
        ],
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
