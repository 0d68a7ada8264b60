//! Phase `proxy`, section 7: the proxy (:8080) into a project, against the same small static
//! file fetched directly inside the project's network namespace and through nginx `proxy_pass`
//! (also inside the namespace, with upstream keep-alive): req/s and p99 at `BENCH_CONNS`
//! connections, and MB/s for a big download. The backend is nginx serving files, started inside
//! a `network: none` project's namespace (`nsenter -n`), so the three differ only in the hop.
//! The direct and nginx loads run the suite's own load generator inside the namespace
//! (`suite load …` under nsenter).
use super::*;

const BACKEND_PORT: u16 = 8001;
const NGINX_PROXY_PORT: u16 = 9081;

/// `suite load ADDR PATH CONNS WARM_MS SECS PIDS` inside the network namespace of `pid`,
/// measuring the CPU time of the `watch` processes too.
async fn load_in_netns(
    pid: u32,
    addr: &str,
    path: &str,
    conns: usize,
    secs: u64,
    watch: &[u32],
) -> Result<http::Load> {
    let watch: Vec<String> = watch.iter().map(u32::to_string).collect();
    let exe = std::env::current_exe()?;
    let out = stats::run(&[
        "nsenter",
        "-t",
        &pid.to_string(),
        "-n",
        "--",
        &exe.to_string_lossy(),
        "load",
        addr,
        path,
        &conns.to_string(),
        "1000",
        &secs.to_string(),
        &watch.join(","),
    ])
    .await?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("load output: {out}"))?;
    Ok(http::Load {
        target: v["target"].as_str().unwrap_or_default().into(),
        path: path.into(),
        connections: conns,
        secs: v["secs"].as_f64().unwrap_or_default(),
        requests: v["requests"].as_u64().unwrap_or_default(),
        errors: v["errors"].as_u64().unwrap_or_default(),
        rps: v["rps"].as_f64().unwrap_or_default(),
        bytes_per_response: v["bytes_per_response"].as_u64().unwrap_or_default() as usize,
        latency_ms: serde_json::from_value(v["latency_ms"].clone())?,
        cpu_secs: serde_json::from_value(v["cpu_secs"].clone()).unwrap_or_default(),
    })
}

/// MB/s of one `curl` download of `url` (in the netns of `pid` when given).
async fn download_mbs(pid: Option<u32>, url: &str) -> Result<f64> {
    let ns = pid.map_or(String::new(), |p| format!("nsenter -t {p} -n -- "));
    let auth = "-H \"Authorization: Bearer $(cat /etc/cocalc-project-host/admin-token)\"";
    let out = sh(&format!(
        "{ns}curl -sf -o /dev/null {auth} -w '%{{speed_download}}' {url}"
    ))
    .await?;
    let bps: f64 = out
        .trim()
        .parse()
        .with_context(|| format!("curl said {out:?}"))?;
    Ok(bps / 1e6)
}

/// CPU µs per measured request of the load generator, the daemon and nginx (the sum of its
/// workers) during `l`.
fn cpu_us_per_request(l: &http::Load) -> [f64; 3] {
    let per = |s: f64| {
        if l.requests == 0 {
            0.0
        } else {
            s * 1e6 / l.requests as f64
        }
    };
    let c = &l.cpu_secs;
    [
        per(c.first().copied().unwrap_or(0.0)),
        per(c.get(1).copied().unwrap_or(0.0)),
        per(c.iter().skip(2).sum()),
    ]
}

pub(super) async fn proxy(ctx: &mut Ctx) -> Result<()> {
    let sec = "7. proxy";
    let conns = ctx.conns;
    let secs = ctx.load_secs;
    let big_mb = env_num("BENCH_PROXY_BIG_MB", 1024);
    let id = new_id();
    let token = ctx.next_token();
    timed_start(&id, &token).await?;
    let pid: u32 = sh(&format!(
        "podman inspect -f '{{{{.State.Pid}}}}' project-{id}"
    ))
    .await?
    .trim()
    .parse()
    .context("the project container's pid")?;

    // the backend and nginx's proxy_pass, both inside the project's network namespace
    let dir = format!("{WORK}/nginx-proxy");
    for d in ["www", "tmp"] {
        std::fs::create_dir_all(format!("{dir}/{d}"))?;
    }
    std::fs::write(format!("{dir}/www/small.txt"), vec![b'x'; 1024])?;
    // sparse: a big file that costs no disk
    sh(&format!("truncate -s {big_mb}M {dir}/www/big")).await?;
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; user root root;
pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000000; keepalive_timeout 120s;
  client_body_temp_path {dir}/tmp/body; proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi; uwsgi_temp_path {dir}/tmp/uwsgi; scgi_temp_path {dir}/tmp/scgi;
  default_type text/plain;
  upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 128; }}
  server {{ listen 127.0.0.1:{BACKEND_PORT}; root {dir}/www; }}
  server {{ listen 127.0.0.1:{NGINX_PROXY_PORT};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
                  proxy_buffering off; }} }}
}}
"
    );
    std::fs::write(format!("{dir}/nginx.conf"), conf)?;
    let mut nginx = tokio::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "--", &ctx.nginx, "-p", &dir])
        .args([
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
        .with_context(|| format!("spawn {} in the project's netns", ctx.nginx))?;
    let proxied = Target::Tcp("127.0.0.1:8080".parse()?);
    let ppath = format!("/{id}/server/{BACKEND_PORT}/small.txt");
    wait_for("nginx in the project", Duration::from_secs(10), || async {
        matches!(http::call(&proxied, "GET", &ppath, None).await, Ok((s, _)) if s.is_success())
    })
    .await?;

    // whose CPU time each load measures: the daemon, then nginx's worker(s) (the backend, and
    // the proxy_pass server for the nginx load)
    let daemon = daemon_main_pid().await?;
    let mut watch = vec![daemon];
    if let Some(master) = nginx.id() {
        let w = sh(&format!("pgrep -P {master} || true")).await?;
        watch.extend(w.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    let run = async {
        let px = http::load_watching(&proxied, &ppath, conns, Duration::from_secs(1), Duration::from_secs(secs), &watch).await?;
        let direct = load_in_netns(pid, &format!("127.0.0.1:{BACKEND_PORT}"), "/small.txt", conns, secs, &watch).await?;
        let ngx = load_in_netns(pid, &format!("127.0.0.1:{NGINX_PROXY_PORT}"), "/small.txt", conns, secs, &watch).await?;
        for (k, l) in [("proxy", &px), ("direct", &direct), ("nginx_proxy_pass", &ngx)] {
            let us = cpu_us_per_request(l);
            println!(
                "  {k:<17} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}  CPU µs/request: load generator {:.1}, daemon {:.1}, nginx {:.1}",
                l.rps, l.latency_ms.p50, l.latency_ms.p99, l.errors, us[0], us[1], us[2]
            );
        }
        let big_px = download_mbs(None, &format!("http://127.0.0.1:8080/{id}/server/{BACKEND_PORT}/big")).await?;
        let big_direct = download_mbs(Some(pid), &format!("http://127.0.0.1:{BACKEND_PORT}/big")).await?;
        let big_ngx = download_mbs(Some(pid), &format!("http://127.0.0.1:{NGINX_PROXY_PORT}/big")).await?;
        println!("  {big_mb} MB download: proxy {big_px:.0} MB/s, direct {big_direct:.0} MB/s, nginx proxy_pass {big_ngx:.0} MB/s");
        anyhow::Ok((px, direct, ngx, big_px, big_direct, big_ngx))
    }
    .await;
    if run.is_ok() {
        // profiles (not part of the figures above: perf costs a little): the daemon, nginx's
        // worker (the backend) and the load generator, by process
        let mut pids = watch.clone();
        pids.push(std::process::id());
        let psecs = 6;
        if perf_request(ctx, &pids, psecs, "proxy_get").await {
            let l = http::load(
                &proxied,
                &ppath,
                conns,
                Duration::from_millis(200),
                Duration::from_secs(psecs - 1),
            )
            .await?;
            println!("  profiled proxy_get: {:.0} req/s under perf", l.rps);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if perf_request(ctx, &pids, 4, "proxy_download").await {
            let url = format!("http://127.0.0.1:8080/{id}/server/{BACKEND_PORT}/big");
            let mbs = download_mbs(None, &url).await?;
            println!("  profiled proxy_download: {mbs:.0} MB/s under perf");
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
    }
    if let Some(p) = nginx.id() {
        sh_quiet(&format!("kill -QUIT {p}")).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), nginx.wait()).await;
    let _ = sh_quiet(&format!("rm -rf {dir}")).await;
    let _ = http::call(
        &api(),
        "POST",
        &format!("/projects/{id}/stop"),
        Some(r#"{"force":true}"#),
    )
    .await;
    let (px, direct, ngx, big_px, big_direct, big_ngx) = run?;
    ctx.detail(
        "proxy",
        json!({"proxy": px, "direct": direct, "nginx_proxy_pass": ngx,
               "download_mb": big_mb, "download_mbs": {"proxy": big_px, "direct": big_direct, "nginx": big_ngx}}),
    );
    let f = "GET 1 KiB file in a project";
    let (us_px, us_direct, us_ngx) = (
        cpu_us_per_request(&px),
        cpu_us_per_request(&direct),
        cpu_us_per_request(&ngx),
    );
    ctx.rows(
        sec,
        [
            r(
                format!("{f}: req/s through the proxy ({conns} conns)"),
                px.rps,
                "req/s",
            )
            .vs("nginx proxy_pass (same backend, keep-alive)", ngx.rps)
            .goal(Goal::RatioAtLeast(1.0)),
            r(format!("  {f}: req/s through the proxy"), px.rps, "req/s")
                .vs("direct, inside the project's netns", direct.rps)
                .goal(Goal::RatioAtLeast(0.8)),
            r(
                format!("  {f}: p99 through the proxy"),
                px.latency_ms.p99,
                "ms",
            )
            .vs("nginx proxy_pass p99", ngx.latency_ms.p99),
            r(
                format!("  {f}: p99 through the proxy"),
                px.latency_ms.p99,
                "ms",
            )
            .vs("direct p99", direct.latency_ms.p99),
            r(
                format!("  {f}: errors through the proxy"),
                px.errors as f64,
                "",
            ),
            // CPU per request of each hop (user + system, /proc/<pid>/stat over the measured
            // window): what the ratios above cost on a machine whose CPUs the loads share
            r(
                format!("  {f}: CPU per request, all processes, through the proxy"),
                us_px.iter().sum(),
                "µs",
            )
            .vs("direct", us_direct.iter().sum()),
            r(
                format!("  {f}: CPU per request, all processes, through the proxy"),
                us_px.iter().sum(),
                "µs",
            )
            .vs("nginx proxy_pass", us_ngx.iter().sum()),
            r(
                format!("  {f}: CPU per request, the daemon"),
                us_px[1],
                "µs",
            )
            .vs("nginx proxy_pass's extra hop", us_ngx[2] - us_direct[2]),
            r(
                format!("  {f}: CPU per request, the load generator, through the proxy"),
                us_px[0],
                "µs",
            )
            .vs("direct", us_direct[0]),
            r(
                format!("  {f}: CPU per request, nginx (the backend), through the proxy"),
                us_px[2],
                "µs",
            )
            .vs("direct", us_direct[2]),
            r(
                format!("{big_mb} MB download through the proxy"),
                big_px,
                "MB/s",
            )
            .vs("nginx proxy_pass", big_ngx)
            .goal(Goal::RatioAtLeast(1.0)),
            r(
                format!("  {big_mb} MB download through the proxy"),
                big_px,
                "MB/s",
            )
            .vs("direct", big_direct)
            .goal(Goal::RatioAtLeast(0.8)),
        ],
    );
    Ok(())
}
