//! Setup shared by the phases: preflight (machine facts, podman's REST API), cleanup, project-like
//! homes and containers for the baselines.
use super::*;

pub(super) async fn preflight(ctx: &mut Ctx) -> Result<()> {
    section("machine");
    let info = json!({
        "kernel": sh_quiet("uname -r").await,
        "cpus": sh_quiet("nproc").await,
        "cpu_model": sh_quiet("sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1").await,
        "mem": sh_quiet("awk '/MemTotal/{printf \"%.1f GiB\", $2/1048576}' /proc/meminfo").await,
        "systemd": sh_quiet("systemctl --version | head -1").await,
        "podman": sh_quiet("podman --version").await,
        "oci_runtime": sh_quiet("podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Version}}' | head -1").await,
        "conmon": sh_quiet("conmon --version | head -1").await,
        "cgroups": sh_quiet("podman info --format '{{.Host.CgroupsVersion}} {{.Host.CgroupManager}}'").await,
        "package": sh_quiet("dpkg-query -W -f '${Version}' cocalc-project-host").await,
        "nginx": sh_quiet(&format!("{} -v 2>&1", ctx.nginx)).await,
    });
    for (k, v) in info.as_object().unwrap() {
        println!("  {k:<12} {}", v.as_str().unwrap_or(""));
    }
    ctx.detail("machine", info);
    if !Path::new("/usr/bin/cocalc-project-host").exists() {
        bail!("cocalc-project-host is not installed in this machine");
    }
    sh(&format!("podman image exists {IMAGE}"))
        .await
        .context("the testbed image is missing")?;
    std::fs::create_dir_all(WORK)?;
    http::json(&api(), "GET", "/healthz", None)
        .await
        .context("the daemon does not answer")?;
    // podman's REST API, always warm (its own socket-activated cold start is measured apart)
    sh_quiet(&format!("systemctl stop {PODMAN_API_UNIT}")).await;
    sh(&format!(
        "systemd-run --quiet --unit={PODMAN_API_UNIT} --collect -- /usr/bin/podman system service --time=0 unix://{PODMAN_SOCK}"
    ))
    .await?;
    wait_for("podman REST API", Duration::from_secs(30), || async {
        http::call(&podman_api(), "GET", "/_ping", None)
            .await
            .is_ok()
    })
    .await?;
    Ok(())
}

pub(super) async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub(super) async fn cleanup() {
    let _ = sh_quiet(
        "podman ps -a --format '{{.Names}}' | grep '^bench-' | xargs -r podman rm -f -t 0",
    )
    .await;
    let _ = sh_quiet("systemctl stop 'bench-*.service'").await;
    let _ = sh_quiet(&format!("systemctl stop {PODMAN_API_UNIT}")).await;
}

/// A btrfs subvolume in the project storage owned by the container's `user`, as the daemon makes
/// project homes; reused if it exists.
pub(super) async fn make_home(name: &str) -> Result<String> {
    let p = format!("{STORAGE}/{name}");
    if !Path::new(&p).exists() {
        sh(&format!(
            "btrfs -q subvolume create {p} && chown 101000:101000 {p} && chmod 750 {p}"
        ))
        .await?;
    }
    Ok(p)
}

/// The options that make a baseline container the same container as a project's: image,
/// user namespace, user, home volume, network, init, log driver, env (src/podman.rs, minus the
/// systemd-only flags --cidfile --cgroups=no-conmon --sdnotify --replace).
pub(super) fn container_flags(home: &str, tag: &str) -> Vec<String> {
    vec![
        "--init".into(),
        "--log-driver=journald".into(),
        "--network=none".into(),
        "--uidmap=0:100000:65536".into(),
        "--gidmap=0:100000:65536".into(),
        "--user=1000:1000".into(),
        format!("--volume={home}:/home/user"),
        "--workdir=/home/user".into(),
        "--env=HOME=/home/user".into(),
        format!("--env=COCALC_PROJECT_ID={tag}"),
        "--pull=never".into(),
    ]
}

/// The same container as a libpod REST create spec.
pub(super) fn rest_spec(name: &str, home: &str, token: &str) -> Value {
    let map = json!([{"container_id": 0, "host_id": 100000, "size": 65536}]);
    json!({
        "name": name, "image": IMAGE, "command": ["sleep", token],
        "init": true, "remove": true, "user": "1000:1000", "work_dir": "/home/user",
        "env": {"HOME": "/home/user", "COCALC_PROJECT_ID": name},
        "userns": {"nsmode": "private"},
        "idmappings": {"UIDMap": map, "GIDMap": map},
        "mounts": [{"destination": "/home/user", "source": home, "type": "bind", "options": ["rbind"]}],
        "netns": {"nsmode": "none"},
        "log_configuration": {"driver": "journald"},
    })
}

pub(super) fn start_body(token: &str) -> String {
    json!({"config": {"cmd": ["sleep", token]}}).to_string()
}

/// One API start of `id` (with a distinct sleep `token` as its command), timed in ms.
pub(super) async fn timed_start(id: &str, token: &str) -> Result<f64> {
    let t = Instant::now();
    let v = http::json(
        &api(),
        "POST",
        &format!("/projects/{id}/start"),
        Some(&start_body(token)),
    )
    .await?;
    if v["state"] != "running" {
        bail!("start {id}: {v}");
    }
    Ok(ms(t.elapsed()))
}

pub(super) fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}
