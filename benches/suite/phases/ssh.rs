//! Phase `ssh`, section 7: SSH into a project (the daemon's russh server on 2222, sessions by
//! `podman exec`) against OpenSSH's own `sshd` on 127.0.0.1:2022 in the same machine: login time
//! (a key login running `true`, the client's whole run: what a user waits for before a prompt)
//! and `scp` throughput of BENCH_SSH_MB (1024) MB into the project's home vs into the same btrfs
//! filesystem through sshd.
use super::*;

const SSHD_UNIT: &str = "cocalc-bench-sshd.service";

pub(super) async fn ssh(ctx: &mut Ctx) -> Result<()> {
    let sec = "7. ssh";
    let mb = env_num("BENCH_SSH_MB", 1024);
    let dir = format!("{WORK}/ssh");
    let id = new_id();
    let token = ctx.next_token();
    start_with(Method::Api, &id, "", &token).await?;
    sh(&format!(
        "rm -rf {dir} && mkdir -p -m 700 {dir} && ssh-keygen -q -t ed25519 -N '' -f {dir}/key \
         && ssh-keygen -q -t ed25519 -N '' -f {dir}/hostkey && cp {dir}/key.pub {dir}/authorized_keys"
    ))
    .await?;
    let public = sh(&format!("cat {dir}/key.pub")).await?;
    http::json(
        &api(),
        "PUT",
        &format!("/projects/{id}/authorized-keys"),
        Some(&json!({ "keys": [public] }).to_string()),
    )
    .await?;
    // the baseline: OpenSSH's sshd, root by this key only, no PAM
    sh_quiet(&format!("systemctl stop {SSHD_UNIT}")).await;
    sh(&format!(
        "mkdir -p /run/sshd && systemd-run --quiet --unit={SSHD_UNIT} --collect -- /usr/sbin/sshd -D -e \
         -p 2022 -o ListenAddress=127.0.0.1 -h {dir}/hostkey -o AuthorizedKeysFile={dir}/authorized_keys \
         -o PermitRootLogin=prohibit-password -o UsePAM=no -o PasswordAuthentication=no"
    ))
    .await?;
    let opts = format!(
        "-i {dir}/key -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    );
    let ours = format!("ssh -p 2222 {opts} {id}@127.0.0.1 true");
    let theirs = format!("ssh -p 2022 {opts} root@127.0.0.1 true");
    wait_for("sshd", Duration::from_secs(20), || async {
        sh(&theirs).await.is_ok()
    })
    .await?;

    // login: interleaved, after a warm-up of each
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..(ctx.n + ctx.warmup) {
        for (cmd, v) in [(&ours, &mut a), (&theirs, &mut b)] {
            let t = Instant::now();
            sh(cmd).await?;
            if i >= ctx.warmup {
                v.push(ms(t.elapsed()));
            }
        }
    }
    let (sa, sb) = (Summary::of(&a), Summary::of(&b));
    ctx.detail("ssh_login_ms", json!({"ours": a, "sshd": b}));

    // scp of one file, incompressible, from the machine's disk into the same btrfs
    let src = "/var/tmp/cocalc-bench-ssh.bin";
    sh(&format!("head -c {mb}M /dev/urandom > {src} && sync")).await?;
    let dst = format!("{STORAGE}/cocalc-bench-sshd.bin");
    let t = Instant::now();
    sh(&format!(
        "scp -q -P 2222 {opts} {src} {id}@127.0.0.1:bench.bin"
    ))
    .await?;
    let ours_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sh(&format!("scp -q -P 2022 {opts} {src} root@127.0.0.1:{dst}")).await?;
    let theirs_s = t.elapsed().as_secs_f64();
    let same = sh(&format!(
        "[ \"$(sha256sum < {src})\" = \"$(sha256sum < {STORAGE}/project-{id}/bench.bin)\" ] && echo yes"
    ))
    .await?;
    if same != "yes" {
        bail!("the file copied into the project differs from its source");
    }
    let (ours_mbs, theirs_mbs) = (mb as f64 / ours_s, mb as f64 / theirs_s);
    ctx.detail(
        "ssh_scp",
        json!({"mb": mb, "ours_secs": ours_s, "sshd_secs": theirs_s}),
    );
    sh_quiet(&format!(
        "rm -f {src} {dst} {STORAGE}/project-{id}/bench.bin; systemctl stop {SSHD_UNIT}"
    ))
    .await;
    stop_with(Method::Api, &id).await?;

    ctx.rows(
        sec,
        [
            r("login, key, `true` (p50)", sa.p50, "ms")
                .vs("ssh to sshd on loopback (p50)", sb.p50)
                .goal(Goal::RatioAtMost(1.5)),
            r("login, key, `true` (p95)", sa.p95, "ms").vs("ssh to sshd (p95)", sb.p95),
            r(format!("scp {mb} MB into the project"), ours_mbs, "MB/s")
                .vs("scp into sshd, same filesystem", theirs_mbs)
                .goal(Goal::RatioAtLeast(0.7)),
        ],
    );
    Ok(())
}
