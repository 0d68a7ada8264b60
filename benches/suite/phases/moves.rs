//! Phase `move` (alias `moves`), section 9: moving a running project with a 1 GB home to a
//! second machine (the peer scripts/bench boots and joins by a veth pair, docs/moves.md), total
//! time and downtime, against `btrfs send | btrfs receive` piped locally on the same data in the
//! same run (the floor: no network, no spool, no checks). scripts/bench leaves the peer's
//! address, host id and a master key both machines trust in /xchg/bench/move.env.
use super::*;

/// What scripts/bench wrote for this phase.
struct Peer {
    target: String,
    addr: std::net::SocketAddr,
    host_id: String,
    seed: Vec<u8>,
}

fn peer() -> Result<Peer> {
    let text = std::fs::read_to_string("/xchg/bench/move.env").context(
        "no /xchg/bench/move.env: the move phase needs the peer machine scripts/bench boots",
    )?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .with_context(|| format!("move.env has no {k}"))
    };
    let seed_hex = get("SEED")?;
    let seed = (0..seed_hex.len() / 2)
        .map(|i| u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let target = get("TARGET")?;
    let addr = target
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    Ok(Peer {
        target,
        addr,
        host_id: get("TARGET_ID")?,
        seed,
    })
}

fn token(p: &Peer, project: &str, actions: &[&str]) -> Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    cocalc_project_host::auth::sign(
        &p.seed,
        &json!({"aud": p.host_id, "sub": "bench-master", "iat": now, "exp": now + 3600,
                "scope": {"projects": [project], "actions": actions}}),
    )
    .map_err(|e| anyhow::anyhow!("signing a move token: {e}"))
}

pub(super) async fn moves(ctx: &mut Ctx) -> Result<()> {
    let sec = "9. move";
    let p = peer()?;
    let mb = env_num("BENCH_MOVE_MB", 1024);
    let label = if mb.is_multiple_of(1024) {
        format!("{} GB", mb / 1024)
    } else {
        format!("{mb} MB")
    };
    // a real project, its home filled with incompressible data, one snapshot of most of it
    let id = new_id();
    let tok = ctx.next_token();
    start_with(Method::Api, &id, "", &tok).await?;
    stop_with(Method::Api, &id).await?;
    let home = format!("{STORAGE}/project-{id}");
    sh(&format!(
        "head -c {}M /dev/urandom > {home}/data && head -c 16M /dev/urandom > {home}/data2 && chown 101000:101000 {home}/data {home}/data2 && sync",
        mb.saturating_sub(16)
    ))
    .await?;
    http::json(
        &api(),
        "POST",
        &format!("/projects/{id}/snapshots"),
        Some(r#"{"name":"bench-s1"}"#),
    )
    .await?;
    sh(&format!(
        "head -c 16M /dev/urandom > {home}/data2 && chown 101000:101000 {home}/data2 && sync"
    ))
    .await?;

    // the floor: the same subvolumes sent and received on this machine through a pipe
    let floor_dir = format!("{STORAGE}/.bench-move-floor");
    sh(&format!(
        "rm -rf {floor_dir}; mkdir -p {floor_dir}/dst && btrfs -q subvolume snapshot -r {home} {floor_dir}/live && btrfs filesystem sync {STORAGE}"
    ))
    .await?;
    let snap = format!("{STORAGE}/.snapshots/project-{id}/bench-s1");
    let t = Instant::now();
    sh(&format!(
        "btrfs send -q {snap} | btrfs receive -q {floor_dir}/dst && btrfs send -q -p {snap} {floor_dir}/live | btrfs receive -q {floor_dir}/dst && btrfs filesystem sync {STORAGE}"
    ))
    .await?;
    let floor = ms(t.elapsed());
    sh(&format!(
        "btrfs -q subvolume delete {floor_dir}/dst/* {floor_dir}/live; rm -rf {floor_dir}"
    ))
    .await?;

    // the move, started running: pre-copy, stop, final delta, start on the peer
    start_with(Method::Api, &id, "", &tok).await?;
    let body =
        json!({"target": p.target, "token": token(&p, &id, &["move"])?, "start": true}).to_string();
    let t = Instant::now();
    let v = http::json(&api(), "POST", &format!("/projects/{id}/move"), Some(&body)).await?;
    let op = v["op"].as_str().context("no op")?.to_string();
    let v = loop {
        let v = http::json(&api(), "GET", &format!("/operations/{op}"), None).await?;
        if v["phase"] == "done" || v["phase"] == "failed" {
            break v;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the move did not end in 30 min: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total = ms(t.elapsed());
    if v["phase"] != "done" {
        bail!("the move failed: {v}");
    }
    let downtime = v["downtime_ms"].as_f64().unwrap_or(f64::NAN);
    let final_mb = v["final_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    println!(
        "  moved {label}: {} bytes in {total:.0} ms, {final_mb:.2} MB after the stop, downtime {downtime:.0} ms",
        v["bytes_sent"]
    );
    // the project runs on the peer; delete it there
    let del = token(&p, &id, &["status", "delete", "stop"])?;
    let peer_api = http::Target::Tcp(p.addr);
    let (s, b) = http::call_as(
        &peer_api,
        "GET",
        &format!("/projects/{id}/status"),
        None,
        &del,
    )
    .await?;
    let running = s.is_success()
        && serde_json::from_slice::<Value>(&b).is_ok_and(|v| v["state"] == "running");
    let _ = http::call_as(
        &peer_api,
        "POST",
        &format!("/projects/{id}/stop"),
        Some("{}"),
        &del,
    )
    .await;
    let _ = http::call_as(&peer_api, "DELETE", &format!("/projects/{id}"), None, &del).await;
    if !running {
        bail!("the moved project does not run on the peer ({s})");
    }
    ctx.rows(
        sec,
        [
            r(
                format!("move of a running {label} project with a snapshot, total"),
                total,
                "ms",
            )
            .vs(
                "btrfs send | btrfs receive of the same, piped locally",
                floor,
            ),
            r(
                "downtime (stop here → running on the target)",
                downtime,
                "ms",
            )
            .goal(Goal::AtMost(2000.0)),
            r(
                "bytes sent after the stop (the final delta)",
                final_mb,
                "MB",
            ),
        ],
    );
    ctx.detail(
        "move",
        json!({"mb": mb, "total_ms": total, "floor_ms": floor, "op": v}),
    );
    Ok(())
}
