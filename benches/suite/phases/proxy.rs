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

/// `suite load ADDR PATH CONNS WARM_MS SECS` inside the network namespace of `pid`.
async fn load_in_netns(
    pid: u32,
    addr: &str,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<http::Load> {
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

    let run = async {
        let px = http::load(&proxied, &ppath, conns, Duration::from_secs(1), Duration::from_secs(secs)).await?;
        let direct = load_in_netns(pid, &format!("127.0.0.1:{BACKEND_PORT}"), "/small.txt", conns, secs).await?;
        let ngx = load_in_netns(pid, &format!("127.0.0.1:{NGINX_PROXY_PORT}"), "/small.txt", conns, secs).await?;
        for (k, l) in [("proxy", &px), ("direct", &direct), ("nginx_proxy_pass", &ngx)] {
            println!(
                "  {k:<17} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                l.rps, l.latency_ms.p50, l.latency_ms.p99, l.errors
            );
        }
        let big_px = download_mbs(None, &format!("http://127.0.0.1:8080/{id}/server/{BACKEND_PORT}/big")).await?;
        let big_direct = download_mbs(Some(pid), &format!("http://127.0.0.1:{BACKEND_PORT}/big")).await?;
        let big_ngx = download_mbs(Some(pid), &format!("http://127.0.0.1:{NGINX_PROXY_PORT}/big")).await?;
        println!("  {big_mb} MB download: proxy {big_px:.0} MB/s, direct {big_direct:.0} MB/s, nginx proxy_pass {big_ngx:.0} MB/s");
        anyhow::Ok((px, direct, ngx, big_px, big_direct, big_ngx))
    }
    .await;
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
