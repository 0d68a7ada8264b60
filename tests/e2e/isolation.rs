//! Tenant isolation (issue 19): each test tries what a hostile project user (or a start config
//! naming a hostile image) would, and asserts it fails while the ordinary thing still works.
use crate::tb::{self, DropIn, http, new_id, ok, sh, start, stop};

const DEST: &str = "com.cocalc.ProjectHost1";
const MANAGER: &str = "/com/cocalc/ProjectHost1";

/// The image names podman would import or pull from somewhere other than the host's store.
const HOSTILE_IMAGES: [&str; 8] = [
    "docker-archive:/var/tmp/iso-evil.tar",
    "docker-archive:/var/tmp/iso-evil.tar:localhost/cocalc-project:latest",
    "oci-archive:/var/tmp/iso-evil-oci.tar",
    "dir:/var/tmp/iso-evil-dir",
    "containers-storage:localhost/iso-evil:latest",
    "docker://localhost/iso-evil:latest",
    "oci:/var/tmp/iso-evil-oci:x",
    // plain, but not in the host's allowlist (the default: the default image only)
    "localhost/iso-evil:latest",
];

fn images_now() -> String {
    ok("podman images --format '{{.ID}} {{.Repository}}:{{.Tag}}' | sort")
}

#[test]
fn only_allowed_plain_images_run() {
    // archives that would replace the default image's tag if podman imported them
    ok(
        "podman save -q -o /var/tmp/iso-evil.tar localhost/cocalc-project:latest \
        && podman save -q --format oci-archive -o /var/tmp/iso-evil-oci.tar localhost/cocalc-project:latest \
        && rm -rf /var/tmp/iso-evil-dir && podman save -q --format docker-dir -o /var/tmp/iso-evil-dir localhost/cocalc-project:latest \
        && podman tag localhost/cocalc-project:latest localhost/iso-evil:latest",
    );
    let before = images_now();
    let id = new_id();
    for image in HOSTILE_IMAGES {
        let cfg = serde_json::json!({ "image": image }).to_string();
        let body = format!("{{\"config\":{cfg}}}");
        let (s, v) = http("POST", &format!("/projects/{id}/start"), Some(&body));
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("image_not_allowed")),
            "{image}: {v}"
        );
        // D-Bus and the CLI say the same
        let o = sh(&format!(
            "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {id} '{cfg}'"
        ));
        assert_ne!(o.code, 0, "{image}: {o:?}");
        assert!(o.stderr.contains("image"), "{image}: {o:?}");
        let o = sh(&format!("cocalc-project-host start {id} --image '{image}'"));
        assert_eq!(o.code, 2, "{image}: {o:?}");
        assert!(o.stderr.contains("image"), "{image}: {o:?}");
    }
    let o = sh(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {id} \
         '{{\"image\":\"docker-archive:/var/tmp/iso-evil.tar\"}}'"
    ));
    assert!(
        o.stderr.contains("not a plain image reference"),
        "D-Bus error: {o:?}"
    );
    // nothing was imported, nothing started, nothing recorded
    assert_eq!(images_now(), before);
    assert_eq!(
        ok(&format!(
            "systemctl list-units --all --no-legend 'cocalc-project-{id}.service' | wc -l"
        )),
        "0"
    );
    let (s, v) = http("GET", &format!("/projects/{id}/status"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("opened")), "{v}");
    // the default image, named or not, still runs
    start(&id, Some(r#"{"image":"localhost/cocalc-project:latest"}"#));
    stop(&id, true);
    ok("podman rmi -f localhost/iso-evil:latest >/dev/null; \
        rm -rf /var/tmp/iso-evil.tar /var/tmp/iso-evil-oci.tar /var/tmp/iso-evil-dir");
}

/// Puts a host file into a running project's home as the project user's file.
fn push_home(id: &str, file: &std::path::Path, name: &str) {
    let home = format!("{}/project-{id}", tb::STORAGE);
    tb::push(file, &format!("{home}/{name}"));
    ok(&format!(
        "chown $(stat -c %u:%g {home}) {home}/{name} && chmod 755 {home}/{name}"
    ));
}

/// `podman exec` in a project as `user` (uid), returning the whole output.
fn exec_as(id: &str, user: &str, cmd: &str) -> tb::Out {
    sh(&format!(
        "podman exec -u {user} project-{id} sh -c '{}' 2>&1",
        cmd.replace('\'', r"'\''")
    ))
}

#[test]
fn nested_namespaces_are_refused_and_fork_and_threads_work() {
    let bin = tb::static_helper("ns_escape");
    let id = new_id();
    start(&id, Some(r#"{"tmp":16777216}"#));
    push_home(&id, &bin, "ns_escape");
    // the home is the user's (0750): container root, without capabilities, runs a copy in /tmp
    let o = exec_as(
        &id,
        "1000",
        "cp /home/user/ns_escape /tmp/ && chmod 755 /tmp/ns_escape",
    );
    assert_eq!(o.code, 0, "{o:?}");
    for user in ["1000", "0"] {
        let o = exec_as(&id, user, "/tmp/ns_escape");
        assert_eq!(o.code, 0, "as {user}: {o:?}");
        let lines: std::collections::HashMap<&str, &str> =
            o.stdout.lines().filter_map(|l| l.split_once(' ')).collect();
        let want = |what: &str, result: &str| {
            assert_eq!(
                lines.get(what).copied(),
                Some(result),
                "as {user}: {what}\n{}",
                o.stdout
            );
        };
        for ok_ in ["unshare-files", "clone-plain", "fork", "threads"] {
            want(ok_, "ok");
        }
        for ns in [
            "NEWUSER",
            "NEWNS",
            "NEWNET",
            "NEWPID",
            "NEWIPC",
            "NEWUTS",
            "NEWCGROUP",
        ] {
            want(&format!("unshare-{ns}"), "errno=1");
            want(&format!("clone-{ns}"), "errno=1");
            want(&format!("clone3-{ns}"), "errno=38");
        }
        want("unshare-NEWTIME", "errno=1");
        want("clone3-plain", "errno=38");
        want("setns", "errno=1");
        want("mount", "errno=1");
        // the tools a tenant would reach for first
        let o = exec_as(&id, user, "unshare -Ur id; echo rc=$?");
        assert!(
            o.stdout.contains("rc=1") && !o.stdout.contains("uid=0"),
            "as {user}: unshare -Ur id: {o:?}"
        );
        assert!(o.stdout.contains("Operation not permitted"), "{o:?}");
        let o = exec_as(&id, user, "unshare -n true; echo rc=$?");
        assert!(o.stdout.contains("rc=1"), "as {user}: unshare -n: {o:?}");
        let o = exec_as(&id, user, "nsenter -t 1 -n true; echo rc=$?");
        assert!(o.stdout.contains("rc=1"), "as {user}: nsenter: {o:?}");
        // ordinary shell work: subshells, background jobs, pipes
        let o = exec_as(
            &id,
            user,
            "for i in 1 2 3; do (sleep 0.1 &) ; done; wait; echo a b | wc -w; echo done",
        );
        assert_eq!(o.code, 0, "{o:?}");
        assert!(o.stdout.contains("2\ndone"), "as {user}: {o:?}");
    }
    stop(&id, true);
    let _ = std::fs::remove_file(bin);
}

fn journal_count(unit: &str, since: &str, pattern: &str) -> usize {
    ok(&format!(
        "journalctl -u {unit} --since '{since}' -o cat --no-pager | grep -c '{pattern}' || true"
    ))
    .parse()
    .unwrap()
}

#[test]
fn a_flooding_project_loses_only_its_own_lines() {
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-journal.toml",
        "[projects]\nlog_rate_limit_interval = 2\nlog_rate_limit_burst = 200\n",
    );
    let since = ok("date '+%Y-%m-%d %H:%M:%S'");
    ok("sleep 1");
    let (flood, calm) = (new_id(), new_id());
    let cmd = |c: &str| serde_json::json!({ "cmd": ["/bin/sh", "-c", c] }).to_string();
    start(
        &flood,
        Some(&cmd(
            // journald reports what it dropped at the first line after the interval
            "seq 1 20000 | sed s/^/flood-/; sleep 3; echo after-flood; exec sleep 600",
        )),
    );
    start(
        &calm,
        Some(&cmd(
            "i=0; while [ $i -lt 100 ]; do echo calm-$i; i=$((i+1)); sleep 0.01; done; exec sleep 600",
        )),
    );
    let (fu, cu) = (
        format!("cocalc-project-{flood}.service"),
        format!("cocalc-project-{calm}.service"),
    );
    assert_eq!(
        ok(&format!(
            "systemctl show -p LogRateLimitIntervalUSec -p LogRateLimitBurst --value {fu}"
        )),
        "2s\n200"
    );
    tb::wait_for("the calm project's 100 lines", 30, || {
        (journal_count(&cu, &since, "^calm-") == 100).then_some(())
    });
    tb::wait_for("the flooding project's line after the flood", 30, || {
        (journal_count(&fu, &since, "^after-flood") == 1).then_some(())
    });
    let flooded = journal_count(&fu, &since, "^flood-");
    // journald scales the burst with free space (at most 6x a window): most were dropped
    assert!(flooded < 10_000, "{flooded} flood lines kept");
    let suppressed = ok(&format!(
        "journalctl --since '{since}' -o cat --no-pager | grep 'Suppressed .* messages from' || true"
    ));
    assert!(
        suppressed.contains(&fu),
        "no suppression for {fu}: {suppressed:?}"
    );
    assert!(!suppressed.contains(&cu), "{cu} suppressed: {suppressed:?}");
    assert_eq!(journal_count(&cu, &since, "^calm-"), 100);
    stop(&flood, true);
    stop(&calm, true);
}

#[test]
fn a_start_failure_reports_podmans_error_line_only_cut() {
    // a glob allowlist admits a tag the host does not have: podman itself refuses it
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-images.toml",
        "[projects]\nimages = [\"localhost/cocalc-project:*\"]\n",
    );
    let id = new_id();
    let body = r#"{"config":{"image":"localhost/cocalc-project:e2e-missing"}}"#;
    let (s, v) = http("POST", &format!("/projects/{id}/start"), Some(body));
    assert_eq!((s, v["code"].as_str()), (500, Some("start_failed")), "{v}");
    let m = v["error"].as_str().unwrap();
    assert!(
        m.contains("localhost/cocalc-project:e2e-missing: image not known"),
        "{m}"
    );
    // podman's line alone, not systemd's job result appended to it
    assert!(!m.contains("job for"), "{m}");
    assert!(m.chars().count() < 420, "{m}");
    // outside the glob: refused before podman
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/start"),
        Some(r#"{"config":{"image":"localhost/other:1"}}"#),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("image_not_allowed")),
        "{v}"
    );
}

/// Megabytes used by podman's storage and the machine's root filesystem.
fn host_usage() -> (u64, u64) {
    let containers = ok("du -sxm /var/lib/containers | cut -f1").parse().unwrap();
    let root = ok("df -m --output=used / | tail -1")
        .trim()
        .parse()
        .unwrap();
    (containers, root)
}

#[test]
fn no_writable_place_outlasts_the_quota() {
    let id = new_id();
    start(
        &id,
        Some(r#"{"disk":104857600,"scratch":33554432,"cmd":["/bin/sh","-c","exec sleep 3600"]}"#),
    );
    // every directory uid 1000 can write, and the memory-backed places
    let o = exec_as(
        &id,
        "1000",
        // (busybox find has no -writable)
        "find / \\( -path /proc -o -path /sys \\) -prune -o -type d -print 2>/dev/null \
         | while read -r d; do [ -w \"$d\" ] && echo \"$d\"; done; echo /dev/shm; echo /dev/mqueue",
    );
    let mut dirs: Vec<&str> = o.stdout.lines().filter(|l| l.starts_with('/')).collect();
    dirs.sort();
    dirs.dedup();
    eprintln!("writable for uid 1000: {dirs:?}");
    // the root filesystem is read-only: only the project's own places are writable
    for d in &dirs {
        assert!(
            [
                "/home/user",
                "/tmp",
                "/var/tmp",
                "/scratch",
                "/dev/shm",
                "/dev/mqueue"
            ]
            .iter()
            .any(|p| d == p || d.starts_with(&format!("{p}/"))),
            "unexpected writable directory {d} in {dirs:?}"
        );
    }
    for p in ["/home/user", "/tmp", "/var/tmp", "/scratch", "/dev/shm"] {
        assert!(dirs.contains(&p), "{p} not writable? {dirs:?}");
    }
    let o = exec_as(
        &id,
        "1000",
        "touch /etc/x /bin/x /x /run/x /var/x 2>&1; echo rc=$?",
    );
    assert_eq!(
        o.stdout.matches("Read-only file system").count(),
        4,
        "{o:?}"
    );
    assert!(o.stdout.contains("/run/x"), "{o:?}");
    let before = host_usage();
    for d in &dirs {
        let o = exec_as(
            &id,
            "1000",
            &format!(
                "dd if=/dev/zero of={d}/e2e-fill bs=1M count=300 2>&1; echo rc=$?; rm -f {d}/e2e-fill"
            ),
        );
        assert!(
            !o.stdout.contains("rc=0") && o.stdout.contains("rc="),
            "300 MB written to {d}: {o:?}"
        );
    }
    let after = host_usage();
    assert!(
        after.0 <= before.0 + 20,
        "podman's storage grew: {before:?} → {after:?}"
    );
    assert!(
        after.1 < before.1 + 250,
        "the root filesystem grew: {before:?} → {after:?}"
    );
    stop(&id, true);
}

/// The host uid that owns a project's home (its user: base + 1000).
fn home_owner(id: &str) -> u64 {
    ok(&format!("stat -c %u {}/project-{id}", tb::STORAGE))
        .parse()
        .unwrap()
}

/// `[start, end)` of every range in /etc/subuid and /etc/subgid of the machine.
fn subid_ranges() -> Vec<(u64, u64)> {
    ok("cat /etc/subuid /etc/subgid 2>/dev/null; true")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let s: u64 = f.get(1)?.parse().ok()?;
            let c: u64 = f.get(2)?.parse().ok()?;
            Some((s, s + c))
        })
        .collect()
}

#[test]
fn each_project_has_host_ids_of_its_own() {
    const COUNT: u64 = 65_536;
    // a subordinate range over the start of the pool (as useradd would give a human account):
    // no project range may overlap it
    let block = (1u64 << 30, 4096 * COUNT);
    ok(&format!(
        "cp /etc/subuid /etc/subuid.e2e-bak 2>/dev/null || touch /etc/subuid.e2e-bak; \
         echo 'e2e-human:{}:{}' >> /etc/subuid",
        block.0, block.1
    ));
    let (a, b) = (new_id(), new_id());
    start(&a, None);
    start(&b, None);
    let (oa, ob) = (home_owner(&a), home_owner(&b));
    let (ba, bb) = (oa - 1000, ob - 1000);
    assert_ne!(oa, ob, "two projects share host uid {oa}");
    assert!(
        ba + COUNT <= bb || bb + COUNT <= ba,
        "ranges overlap: {ba} {bb}"
    );
    for (s, e) in subid_ranges() {
        for base in [ba, bb] {
            assert!(
                base + COUNT <= s || e <= base,
                "range {base} overlaps /etc/sub?id {s}..{e}"
            );
        }
    }
    assert!(
        ba >= block.0 + block.1 && bb >= block.0 + block.1,
        "{ba} {bb}"
    );
    ok("mv /etc/subuid.e2e-bak /etc/subuid");
    // A's private file: B's user (and any other host uid) cannot read it
    let o = exec_as(
        &a,
        "1000",
        "echo secret-of-a > ~/s && chmod 600 ~/s && id -u",
    );
    assert_eq!(o.stdout.trim(), "1000", "{o:?}");
    let home_a = format!("{}/project-{a}", tb::STORAGE);
    let o = sh(&format!(
        "setpriv --reuid={ob} --regid={ob} --clear-groups cat {home_a}/s"
    ));
    assert_ne!(o.code, 0, "B's uid read A's file: {o:?}");
    assert!(o.stderr.contains("Permission denied"), "{o:?}");
    assert_eq!(ok(&format!("stat -c %u {home_a}/s")), oa.to_string());
    // the range is kept across a stop, a daemon restart and a new start
    stop(&a, false);
    ok("systemctl restart cocalc-project-host.service");
    start(&a, None);
    assert_eq!(home_owner(&a), oa);
    assert_eq!(exec_as(&a, "1000", "cat ~/s").stdout.trim(), "secret-of-a");
    stop(&a, true);
    stop(&b, true);
}

#[test]
fn a_home_of_the_old_shared_range_is_converted_on_start() {
    let id = new_id();
    start(&id, None);
    stop(&id, false);
    let owner = home_owner(&id);
    // what a home made by an older version looks like: the user's files at host 101000,
    // container root's at 100000
    let home = format!("{}/project-{id}", tb::STORAGE);
    ok(&format!(
        "mkdir -p {home}/d/e && echo old > {home}/d/e/f && echo root > {home}/r && ln -s /etc/shadow {home}/link \
         && chown -hR 101000:101000 {home} && chown 100000:100000 {home}/r && chmod 600 {home}/d/e/f"
    ));
    start(&id, None);
    assert_eq!(
        home_owner(&id),
        owner,
        "home not given back to the project's range"
    );
    let st = ok(&format!(
        "stat -c '%n %u:%g' {home}/d {home}/d/e/f {home}/link {home}/r | sed 's|{home}/||'"
    ));
    let base = owner - 1000;
    assert_eq!(
        st,
        format!("d {owner}:{owner}\nd/e/f {owner}:{owner}\nlink {owner}:{owner}\nr {base}:{base}")
    );
    // /etc/shadow was not followed
    assert_eq!(ok("stat -c %u /etc/shadow"), "0");
    let o = exec_as(
        &id,
        "1000",
        "cat ~/d/e/f && echo new >> ~/d/e/f && ls -ln ~/r",
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.starts_with("old\n"), "{o:?}");
    assert!(
        o.stdout.contains(" 0 "),
        "container root's file is root's again: {o:?}"
    );
    stop(&id, true);
}

/// A TCP listener on every address of the machine (port 18080, answers "hi") and two more
/// addresses of the machine's own (on its loopback device, inside the testbed's network
/// namespace): one like a host's public address, one like a cloud metadata service.
struct Listener;

const HOST_ADDRS: [&str; 2] = ["192.0.2.1", "169.254.169.254"];

impl Listener {
    fn start() -> Listener {
        for a in HOST_ADDRS {
            ok(&format!(
                "ip addr add {a}/32 dev lo 2>/dev/null || ip addr show dev lo | grep -q {a}"
            ));
        }
        ok(
            "systemctl stop e2e-egress-listener 2>/dev/null; systemctl reset-failed e2e-egress-listener 2>/dev/null; \
            systemd-run -q --collect --unit=e2e-egress-listener busybox nc -ll -p 18080 -e /bin/echo hi && sleep 0.3",
        );
        // it answers from the machine itself
        assert_eq!(ok("echo | busybox nc -w 2 192.0.2.1 18080"), "hi");
        Listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        sh("systemctl stop e2e-egress-listener");
        for a in HOST_ADDRS {
            sh(&format!("ip addr del {a}/32 dev lo"));
        }
    }
}

#[test]
fn a_slirp_project_cannot_reach_the_host() {
    let _l = Listener::start();
    // the hole without the rules: a plain slirp4netns container reaches the host's addresses
    let ctl = ok(
        "podman run --rm --network slirp4netns localhost/cocalc-project:latest sh -c \
         'echo | nc -w 3 192.0.2.1 18080; echo | nc -w 3 169.254.169.254 18080'",
    );
    assert_eq!(
        ctl, "hi\nhi",
        "the control container did not reach the host"
    );
    let id = new_id();
    start(&id, Some(r#"{"network":"slirp4netns"}"#));
    for user in ["1000", "0"] {
        for target in [
            "127.0.0.1 18080",
            "10.0.2.2 18080",
            "192.0.2.1 18080",
            "169.254.169.254 18080",
            "169.254.169.254 80",
        ] {
            let t0 = std::time::Instant::now();
            let o = exec_as(&id, user, &format!("echo | nc -w 10 {target}; echo rc=$?"));
            let took = t0.elapsed();
            assert!(
                !o.stdout.contains("hi") && o.stdout.contains("rc=1"),
                "as {user}, {target} reached: {o:?}"
            );
            assert!(
                o.stdout.contains("Connection refused"),
                "as {user}, {target}: {o:?}"
            );
            assert!(
                took.as_secs() < 5,
                "{target}: took {took:?} (not refused at once)"
            );
        }
        // the project's own loopback works (its image serves the home on 8080)
        let o = exec_as(
            &id,
            user,
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 127.0.0.1 8080 | head -1",
        );
        assert!(o.stdout.starts_with("HTTP/1."), "as {user}: {o:?}");
    }
    // the rules are in the project's namespace, and nobody inside holds CAP_NET_ADMIN over it
    let pid = ok(&format!(
        "podman inspect -f '{{{{.State.Pid}}}}' project-{id}"
    ));
    let rules = ok(&format!("nsenter -t {pid} -n iptables -S OUTPUT"));
    assert!(
        rules.contains("-d 169.254.0.0/16 -p tcp -j REJECT"),
        "{rules}"
    );
    ok(&format!("podman exec -d -u 0 project-{id} sleep 20"));
    let caps = ok("for p in $(pgrep -f '^sleep 20$'); do grep CapEff /proc/$p/status; done");
    assert!(
        !caps.is_empty() && caps.lines().all(|l| l.ends_with("0000000000000000")),
        "{caps}"
    );
    stop(&id, true);
}
