//! Who may decide what (issue 19, points 6-9), each tried as an attacker would: a start-only
//! token sending config, values over the host's maxima, revoked and foreign-issuer tokens, local
//! users reading the bus, one peer opening many connections, a project filling the storage.
use serde_json::{Value, json};

use crate::tb::{self, As, http, http_as, new_id, ok, sh, start, status, stop};

const DROP_IN: &str = "/etc/cocalc-project-host/config.d/90-e2e-authority.toml";
const MIB: u64 = 1 << 20;

fn now() -> u64 {
    cocalc_project_host::auth::now_secs()
}

/// A config drop-in (with a trusted master key) in force while this lives; the daemon is
/// restarted to read it, and again when it is removed.
struct Setup {
    seed: [u8; 32],
}

impl Setup {
    /// `extra`: more TOML after the `[auth]` table's keys (may open other tables).
    fn install(auth_extra: &str, extra: &str) -> Setup {
        let (seed, b64) = tb::master_key();
        let text = format!(
            "[auth]\nmaster_public_keys = [\"{b64}\"]\nmax_token_lifetime = 3600\n{auth_extra}\n{extra}\n"
        );
        tb::sh_in(&format!("cat > {DROP_IN}"), text.as_bytes());
        ok("systemctl restart cocalc-project-host.service");
        Setup { seed }
    }

    fn token(&self, claims: &Value) -> String {
        cocalc_project_host::auth::sign(&self.seed, claims).unwrap()
    }

    /// A token for `projects` allowing `actions`, with the given extra claims.
    fn scoped(&self, projects: Value, actions: &[&str], extra: Value) -> String {
        let t = now();
        let mut c = json!({"aud": tb::host_id(), "sub": "account-e2e", "iat": t, "exp": t + 600,
                           "scope": {"projects": projects, "actions": actions}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.token(&c)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {DROP_IN}; systemctl restart cocalc-project-host.service"
        ));
    }
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

#[test]
fn a_start_only_token_cannot_change_config_and_maxima_bind_everyone() {
    let setup = Setup::install("", "[limits.max]\nnetwork = [\"none\"]\n");
    let id = new_id();
    // an admin sets this project's limits and quota
    start(
        &id,
        Some(&format!(
            "{{\"memory\":{},\"disk\":{}}}",
            128 * MIB,
            64 * MIB
        )),
    );
    stop(&id, false);
    let starter = setup.scoped(json!([id]), &["start", "status", "stop"], json!({}));
    let start_as =
        |who: As, body: &str| http_as(who, "POST", &format!("/projects/{id}/start"), Some(body));
    // the attacker's start-only token sends config: refused, nothing started or stored
    for cfg in [
        format!("{{\"disk\":{}}}", 100u64 << 30),
        format!("{{\"memory\":{}}}", 8u64 << 30),
        "{\"network\":\"slirp4netns\"}".to_string(),
        "{}".to_string(),
    ] {
        let (s, v) = start_as(As::Bearer(&starter), &format!("{{\"config\":{cfg}}}"));
        assert_eq!((s, code(&v)), (403, "forbidden"), "{cfg}: {v}");
        assert!(v["error"].as_str().unwrap().contains("config"), "{v}");
    }
    assert_eq!(status(&id)["state"], "opened");
    // with the stored config it may start: the admin's limits and quota hold
    for body in ["{}", "{\"config\":null}"] {
        let (s, v) = start_as(As::Bearer(&starter), body);
        assert_eq!(s, 200, "{body}: {v}");
        assert_eq!(v["disk"]["quota"], 64 * MIB, "{v}");
        stop(&id, false);
    }
    let (s, v) = http("GET", &format!("/projects/{id}/config"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["limits"]["memory"], 128 * MIB, "{v}");
    assert_eq!(v["config"]["disk"], 64 * MIB, "{v}");

    // a token with `config` may send config, but nobody gets more than the host's maxima
    let configurer = setup.scoped(json!([id]), &["start", "config", "stop"], json!({}));
    for who in [As::Bearer(&configurer), As::Admin] {
        for (cfg, field) in [
            (format!("{{\"disk\":{}}}", 101u64 << 30), "disk"),
            (format!("{{\"scratch\":{}}}", 101u64 << 30), "scratch"),
            (format!("{{\"tmp\":{}}}", 9u64 << 30), "tmp"),
            ("{\"swap\":true}".to_string(), "swap"),
            ("{\"network\":\"slirp4netns\"}".to_string(), "network"),
            (format!("{{\"memory\":{}}}", 17u64 << 30), "memory"),
        ] {
            let (s, v) = start_as(who, &format!("{{\"config\":{cfg}}}"));
            assert_eq!((s, code(&v)), (400, "invalid_config"), "{cfg}: {v}");
            let msg = v["error"].as_str().unwrap();
            assert!(msg.contains(&format!("config.{field}")), "{cfg}: {msg}");
        }
        let (s, v) = http_as(
            who,
            "PATCH",
            &format!("/projects/{id}/config"),
            Some("{\"swap\":true}"),
        );
        assert_eq!((s, code(&v)), (400, "invalid_config"), "{v}");
        let (s, v) = http_as(
            who,
            "POST",
            &format!("/projects/{id}/quota"),
            Some(&format!("{{\"disk\":{}}}", 101u64 << 30)),
        );
        assert_eq!((s, code(&v)), (400, "invalid_config"), "{v}");
    }
    assert_eq!(status(&id)["state"], "opened");
    ok(&format!("! systemctl is-active cocalc-project-{id}"));
    // lifting a quota altogether is the admin's alone
    let (s, v) = http_as(
        As::Bearer(&configurer),
        "POST",
        &format!("/projects/{id}/quota"),
        Some("{\"disk\":null}"),
    );
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    // within the maxima the config token works
    let (s, v) = start_as(
        As::Bearer(&configurer),
        &format!(
            "{{\"config\":{{\"memory\":{},\"disk\":{}}}}}",
            96 * MIB,
            80 * MIB
        ),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["disk"]["quota"], 80 * MIB, "{v}");
    stop(&id, false);
}

#[test]
fn revoked_and_foreign_issuer_tokens_are_refused_also_after_a_restart() {
    let iss = "https://master.e2e.example";
    let setup = Setup::install(&format!("master_issuer = \"{iss}\""), "");
    let id = new_id();
    let path = format!("/projects/{id}/status");
    let jti = format!("e2e-{}", new_id());
    let good = setup.scoped(json!([id]), &["status"], json!({"iss": iss, "jti": jti}));
    let (s, v) = http_as(As::Bearer(&good), "GET", &path, None);
    assert_eq!(s, 200, "{v}");
    // the attacker's own or a stolen other master's tokens: no iss, another iss
    for (extra, want) in [
        (json!({}), "claim iss is missing"),
        (json!({"iss": "https://evil.example"}), "wrong issuer"),
    ] {
        let t = setup.scoped(json!([id]), &["status"], extra);
        let (s, v) = http_as(As::Bearer(&t), "GET", &path, None);
        assert_eq!((s, code(&v)), (401, "invalid_token"), "{v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }
    // only admin or a token with `revoke` may push; bodies are bounded and validated
    let revoke = |who: As, body: &str| http_as(who, "POST", "/auth/revoked", Some(body));
    let body = json!({"jti": [jti]}).to_string();
    let (s, v) = revoke(As::Bearer(&good), &body);
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (s, v) = revoke(As::Nobody, &body);
    assert_eq!(s, 401, "{v}");
    let revoker = setup.scoped(json!([]), &["revoke"], json!({"iss": iss}));
    let many: Vec<String> = (0..201).map(|i| format!("j{i}")).collect();
    for bad in [
        json!({"jti": []}),
        json!({"jti": ["has space"]}),
        json!({"jti": ["x".repeat(129)]}),
        json!({"jti": many}),
        json!({"jti": "not-a-list"}),
        json!({}),
    ] {
        let (s, v) = revoke(As::Bearer(&revoker), &bad.to_string());
        assert_eq!((s, code(&v)), (400, "invalid_body"), "{v}");
    }
    assert_eq!(http_as(As::Bearer(&good), "GET", &path, None).0, 200);
    let (s, v) = revoke(As::Bearer(&revoker), &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revoked"], 1, "{v}");
    assert!(v["until"].as_u64().unwrap() >= now() + 3600, "{v}");
    let refused = || {
        let (s, v) = http_as(As::Bearer(&good), "GET", &path, None);
        assert_eq!((s, code(&v)), (401, "token_revoked"), "{v}");
    };
    refused();
    // the admin may push too; a fresh token with another jti still works
    let other = setup.scoped(
        json!([id]),
        &["status"],
        json!({"iss": iss, "jti": "e2e-other"}),
    );
    assert_eq!(http_as(As::Bearer(&other), "GET", &path, None).0, 200);
    let (s, v) = revoke(As::Admin, &json!({"jti": ["e2e-other"]}).to_string());
    assert_eq!(s, 200, "{v}");
    assert_eq!(http_as(As::Bearer(&other), "GET", &path, None).0, 401);
    // kept in the store: still revoked after a restart
    ok("systemctl restart cocalc-project-host.service");
    refused();
    assert_eq!(
        ok(&format!(
            "python3 -c \"import sqlite3; print(sqlite3.connect('/var/lib/cocalc-project-host/state.db').execute(\\\"SELECT count(*) FROM revoked_tokens WHERE jti='{jti}'\\\").fetchone()[0])\""
        )),
        "1"
    );
}

const DEST: &str = "com.cocalc.ProjectHost1";
const MANAGER: &str = "/com/cocalc/ProjectHost1";
const READER: &str = "setpriv --reuid=e2e-reader --regid=e2e-reader --init-groups";
const OPEN_POLICY: &str = "/etc/dbus-1/system.d/zz-e2e-open-cocalc.conf";

fn last_touched(id: &str) -> String {
    ok(&format!(
        "busctl get-property {DEST} {} com.cocalc.ProjectHost1.Project LastTouched",
        crate::dbus::path(id)
    ))
}

#[test]
fn local_users_outside_the_group_see_only_version_and_counts() {
    ok("getent passwd e2e-reader >/dev/null || useradd --no-create-home --user-group e2e-reader");
    ok("! id -nG e2e-reader | grep -qw cocalc-project-host");
    let id = new_id();
    start(&id, None);
    let p = crate::dbus::path(&id);
    let reads = [
        format!("call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager ListProjects"),
        format!("call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProject s {id}"),
        format!("call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProjectStatus s {id}"),
        format!("get-property {DEST} {p} com.cocalc.ProjectHost1.Project State"),
        format!("get-property {DEST} {p} com.cocalc.ProjectHost1.Project Id"),
        format!(
            "call {DEST} {p} org.freedesktop.DBus.Properties GetAll s com.cocalc.ProjectHost1.Project"
        ),
        format!("introspect {DEST} {p}"),
        format!("introspect {DEST} {MANAGER}/project"),
    ];
    for who in [READER, crate::dbus::NOBODY] {
        for r in &reads {
            let o = sh(&format!("{who} busctl {r}"));
            assert_ne!(o.code, 0, "{who} {r}: {}", o.stdout);
            assert!(
                o.stderr.contains("Access denied"),
                "{who} {r}: {}",
                o.stderr
            );
            assert!(!o.stdout.contains(&id), "{who} {r}: {}", o.stdout);
        }
        for prop in ["Version", "ProjectCount", "RunningCount"] {
            ok(&format!(
                "{who} busctl get-property {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager {prop}"
            ));
        }
        let tree = ok(&format!("{who} busctl introspect {DEST} {MANAGER}"));
        assert!(tree.contains(".Version"), "{tree}");
    }
    // root (and the group) may read it all
    for r in &reads {
        ok(&format!("busctl {r}"));
    }
    // behind the policy, the daemon checks the caller itself: with the bus opened to everyone
    ok(&format!(
        "printf '%s' '<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \"https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\"><busconfig><policy context=\"default\"><allow send_destination=\"{DEST}\"/></policy></busconfig>' > {OPEN_POLICY}
         busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig"
    ));
    let o = sh(&format!(
        "{READER} busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProjectStatus s {id}"
    ));
    let o2 = sh(&format!(
        "{READER} busctl get-property {DEST} {p} com.cocalc.ProjectHost1.Project State"
    ));
    ok(&format!(
        "rm -f {OPEN_POLICY}; busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig"
    ));
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(
        o.stderr
            .contains("reading projects needs root or membership"),
        "{}",
        o.stderr
    );
    assert_ne!(o2.code, 0, "{}", o2.stdout);
    assert!(!o2.stdout.contains("running"), "{}", o2.stdout);

    // reads never write: a D-Bus status read does not keep the project "active"
    let before = last_touched(&id);
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        ok(&format!(
            "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProjectStatus s {id}"
        ));
        ok(&format!(
            "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager ListProjects"
        ));
    }
    assert_eq!(last_touched(&id), before);
    // while an authenticated HTTP status does (so the check above could fail)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    status(&id);
    assert_ne!(last_touched(&id), before);
    stop(&id, false);
}

#[test]
fn connections_per_peer_are_capped_before_authentication() {
    let _setup = Setup::install("", "[http]\nmax_connections_per_peer = 4\n");
    // 4 idle connections from 127.0.0.1 (no request, no token) take that address's slots; a
    // fifth from it is closed unanswered while 127.0.0.2 is served; a freed slot comes back
    let script = r#"
import socket, time
def conn(src):
    s = socket.socket(); s.settimeout(5); s.bind((src, 0)); s.connect(("127.0.0.1", 9002)); return s
def get(s):
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(100).split(b"\r\n")[0].decode() or "closed"
    except OSError as e:
        return "error " + type(e).__name__
idle = [conn("127.0.0.1") for _ in range(4)]
time.sleep(0.5)
print("fifth:", get(conn("127.0.0.1")))
print("other:", get(conn("127.0.0.2")))
idle[0].close(); time.sleep(0.5)
print("freed:", get(conn("127.0.0.1")))
"#;
    let o = tb::sh_in("python3 -", script.as_bytes());
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let line = |k: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {}", o.stdout))
            .trim()
            .to_string()
    };
    let fifth = line("fifth:");
    assert!(fifth == "closed" || fifth.starts_with("error"), "{fifth}");
    assert_eq!(line("other:"), "HTTP/1.1 200 OK");
    assert_eq!(line("freed:"), "HTTP/1.1 200 OK");
}

/// Removes the fill file when dropped (also when the test fails).
struct Fill(String);

impl Drop for Fill {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {}; sync; btrfs filesystem sync {}",
            self.0,
            tb::STORAGE
        ));
    }
}

/// (available, total) bytes of the project storage.
fn storage_space() -> (u64, u64) {
    let out = ok(&format!("stat -f -c '%a %b %S' {}", tb::STORAGE));
    let n: Vec<u64> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
    (n[0] * n[2], n[1] * n[2])
}

#[test]
fn a_full_storage_refuses_new_starts_and_writes_and_fresh_projects_get_the_default_quota() {
    // a fresh install's default quota, with no config at all
    let a = new_id();
    let v = start(&a, None);
    assert_eq!(v["disk"]["quota"], 10u64 << 30, "{v}");
    let (s, cfg) = http("GET", &format!("/projects/{a}/config"), None);
    assert_eq!(s, 200, "{cfg}");

    // an admin file fills the storage to below the 5% reserve
    let (avail, total) = storage_space();
    let reserve = total / 20;
    assert!(
        avail > reserve,
        "the testbed storage is already below its reserve: {avail} of {total}"
    );
    let fill = Fill(format!("{}/e2e-fill", tb::STORAGE));
    ok(&format!(
        "fallocate -l {} {} && sync && btrfs filesystem sync {}",
        avail - reserve / 2,
        fill.0,
        tb::STORAGE
    ));
    tb::wait_for("free space below the reserve", 30, || {
        (storage_space().0 < reserve).then_some(())
    });
    let since = ok("date +%s");
    // a new start is refused with a clear error; nothing of it is made
    let b = new_id();
    let (s, v) = http("POST", &format!("/projects/{b}/start"), None);
    assert_eq!((s, code(&v)), (507, "storage_full"), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("storage.reserve"),
        "{v}"
    );
    ok(&format!("! test -e {}/project-{b}", tb::STORAGE));
    // a quota raise too; a lower quota is fine
    let quota = |bytes: u64| {
        http(
            "POST",
            &format!("/projects/{a}/quota"),
            Some(&format!("{{\"disk\":{bytes}}}")),
        )
    };
    let (s, v) = quota(20u64 << 30);
    assert_eq!((s, code(&v)), (507, "storage_full"), "{v}");
    let (s, v) = quota(5u64 << 30);
    assert_eq!(s, 200, "{v}");
    // the running project goes on, but its home is held at its usage (next disk refresh, 5 s)
    // and its status says why
    assert_eq!(
        ok(&format!("systemctl is-active cocalc-project-{a}")),
        "active"
    );
    let held = tb::wait_for("the running home held at its usage", 20, || {
        let v = status(&a);
        let (q, u) = (v["disk"]["quota"].as_u64()?, v["disk"]["used"].as_u64()?);
        (v["storage_full"]["reserve"].as_u64() == Some(reserve) && q <= u).then_some(v)
    });
    assert!(
        held["storage_full"]["free"].as_u64().unwrap() < reserve,
        "{held}"
    );
    let write = |file: &str| {
        sh(&format!(
            "podman exec project-{a} sh -c 'dd if=/dev/zero of=/home/user/{file} bs=1M count=4 conv=fsync 2>&1; echo rc=$?'"
        ))
        .stdout
    };
    let o = write("held");
    assert!(
        o.contains("Disk quota exceeded") && !o.contains("rc=0"),
        "a 4 MB write below the reserve must fail with EDQUOT: {o}"
    );
    // reading and deleting still work
    ok(&format!(
        "podman exec project-{a} sh -c 'ls /home/user >/dev/null && rm -f /home/user/held'"
    ));
    // the refusals and the hold are in the journal, once
    let log = ok(&format!(
        "journalctl -u cocalc-project-host.service --since @{since} -o cat --no-pager"
    ));
    assert!(log.contains("below its reserve"), "{log}");
    assert_eq!(
        log.matches("writes of projects refused").count(),
        1,
        "{log}"
    );

    // space back: within a refresh or two the configured quota (the lowered 5 GiB) is back on
    // the home and the project writes again
    drop(fill);
    tb::wait_for("free space above the reserve", 60, || {
        (storage_space().0 > reserve).then_some(())
    });
    let v = tb::wait_for("the quota given back", 15, || {
        let v = status(&a);
        (v.get("storage_full").is_none() && v["disk"]["quota"] == 5u64 << 30).then_some(v)
    });
    assert!(v.get("storage_full").is_none(), "{v}");
    let q = ok(&format!(
        "btrfs qgroup show --raw -re -f {}/project-{a} | tail -1",
        tb::STORAGE
    ));
    assert!(q.contains(&(5u64 << 30).to_string()), "{q}");
    let o = write("again");
    assert!(o.contains("rc=0"), "{o}");
    let log = ok(&format!(
        "journalctl -u cocalc-project-host.service --since @{since} -o cat --no-pager"
    ));
    assert!(log.contains("quotas restored"), "{log}");
    let v = start(&b, None);
    assert_eq!(v["state"], "running", "{v}");
    stop(&b, false);
    stop(&a, false);
}

#[test]
fn storage_setup_refuses_an_image_bigger_than_the_free_space() {
    let dir = "/tmp/e2e-small-state";
    ok(&format!(
        "mkdir -p {dir} {dir}.conf && mount -t tmpfs -o size=64m tmpfs {dir} &&
         printf 'state_dir = \"{dir}\"\\n[storage]\\nimage_size = \"1G\"\\n' > {dir}.conf/config.toml"
    ));
    let o = sh(&format!(
        "COCALC_PROJECT_HOST_CONFIG_DIRS={dir}.conf cocalc-project-host storage-setup"
    ));
    let left = sh(&format!("ls -A {dir}"));
    sh(&format!("umount {dir}; rm -rf {dir} {dir}.conf"));
    assert_ne!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("storage.image_size"), "{}", o.stderr);
    assert!(
        !left.stdout.contains("projects.img"),
        "no image made: {}",
        left.stdout
    );
}
