//! Section 3, run inside the `density` phase: API throughput under load against nginx serving the
//! same answers as static files and podman's REST API.
use super::*;

pub(super) async fn start_nginx(
    ctx: &Ctx,
    files: &[(&str, &[u8])],
) -> Result<tokio::process::Child> {
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
pub(super) async fn perf_request(ctx: &Ctx, pids: &[u32], secs: u64, label: &str) -> bool {
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

pub(super) async fn throughput(ctx: &mut Ctx, id: &str) -> Result<()> {
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

pub(super) async fn throughput_runs(
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
        ctx.rows(
            sec,
            [
                r(format!("{what}: req/s ({conns} conns)"), a.rps, "req/s")
                    .vs("nginx, same JSON as a static file", n.rps)
                    .goal(Goal::RatioAtLeast(0.5)),
                r(format!("  {what}: req/s vs podman"), a.rps, "req/s").vs(pod_label, p.rps),
                r(format!("  {what}: p50"), a.latency_ms.p50, "ms")
                    .vs("nginx p50", n.latency_ms.p50),
                r(format!("  {what}: p99"), a.latency_ms.p99, "ms")
                    .vs("nginx p99", n.latency_ms.p99)
                    .goal(Goal::AtMost(5.0)),
                r(format!("  {what}: errors"), a.errors as f64, ""),
            ],
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
