//! Phase `snapshot`, section 6: btrfs snapshots of a project home through the API.
use super::*;

pub(super) async fn snapshots(ctx: &mut Ctx) -> Result<()> {
    let sec = "6. snapshot";
    let sizes = [(10u64, "10 MB"), (ctx.snap_big_mb, "big")];
    let mut api_hook = None;
    let mut results = Vec::new();
    for (mb, _) in sizes {
        let label = if mb >= 1024 && mb % 1024 == 0 {
            format!("{} GB", mb / 1024)
        } else {
            format!("{mb} MB")
        };
        // a real project (its home made by the daemon), filled with incompressible data
        let id = new_id();
        let token = ctx.next_token();
        start_with(Method::Api, &id, "", &token).await?;
        stop_with(Method::Api, &id).await?;
        let home = format!("{STORAGE}/project-{id}");
        sh(&format!(
            "head -c {}M /dev/urandom > {home}/data && chown 101000:101000 {home}/data && sync",
            mb
        ))
        .await?;

        // the API's own snapshot call (names given: default names have one-second resolution)
        let hook = http::call(
            &api(),
            "POST",
            &format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"bench-first"}"#),
        )
        .await;
        match hook {
            Ok((s, _)) if s.is_success() => {
                let mut v = Vec::new();
                for k in 0..5 {
                    let t = Instant::now();
                    http::json(
                        &api(),
                        "POST",
                        &format!("/projects/{id}/snapshots"),
                        Some(&format!("{{\"name\":\"bench-{k}\"}}")),
                    )
                    .await?;
                    v.push(ms(t.elapsed()));
                }
                api_hook = Some(true);
                results.push((label.clone(), "api", Summary::of(&v).p50));
            }
            _ => {
                api_hook.get_or_insert(false);
            }
        }

        let mut snap = Vec::new();
        for k in 0..5 {
            let dst = format!("{STORAGE}/.bench-snap-{id}-{k}");
            sh("sync").await?;
            let t = Instant::now();
            stats::run(&["btrfs", "-q", "subvolume", "snapshot", "-r", &home, &dst]).await?;
            snap.push(ms(t.elapsed()));
            sh(&format!("btrfs -q subvolume delete {dst}")).await?;
        }
        let copy_dst = format!("{STORAGE}/.bench-copy-{id}");
        sh("sync").await?;
        let t = Instant::now();
        sh(&format!("cp -a --reflink=never {home} {copy_dst} && sync")).await?;
        let copy = ms(t.elapsed());
        sh(&format!("rm -rf {copy_dst}")).await?;
        results.push((label.clone(), "btrfs", Summary::of(&snap).p50));
        ctx.rows(
            sec,
            [r(
                format!("btrfs subvolume snapshot -r of a {label} home, p50 (direct, not the API)"),
                Summary::of(&snap).p50,
                "ms",
            )
            .vs(format!("cp -a of the same {label} + sync"), copy)],
        );
        ctx.detail(
            &format!("snapshot_{mb}mb_ms"),
            json!({"btrfs_snapshot": snap, "copy": copy}),
        );
    }
    if api_hook != Some(true) {
        ctx.rows(
            sec,
            [
                r(
                    "API snapshot (POST /projects/:id/snapshots): PLACEHOLDER, not in this build (issue 5)",
                    f64::NAN,
                    "ms",
                ),
            ],
        );
    } else {
        for (label, _, v) in results.iter().filter(|r| r.1 == "api") {
            ctx.rows(
                sec,
                [r(
                    format!("API snapshot of a {label} project, p50"),
                    *v,
                    "ms",
                )],
            );
        }
    }
    Ok(())
}
