//! Who may call the API (admin token, scoped master tokens), the daemon's sandbox, fuzzing with
//! schemathesis, and slow clients.
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use crate::tb::{self, As, http, http_as, new_id, ok, sh, stop};

const DROP_IN: &str = "/etc/cocalc-project-host/config.d/90-e2e-master.toml";

fn main_pid() -> u32 {
    ok("systemctl show -p MainPID --value cocalc-project-host.service")
        .parse()
        .unwrap()
}

fn admin_token() -> String {
    ok(&format!("cat {}", tb::ADMIN_TOKEN_FILE))
}

/// A master keypair whose public key the daemon trusts while this lives (a config drop-in).
struct Master {
    seed: [u8; 32],
}

impl Master {
    fn install() -> Master {
        let (seed, b64) = tb::master_key();
        ok(&format!(
            "printf '[auth]\\nmaster_public_keys = [\"{b64}\"]\\nmax_token_lifetime = 3600\\n' > {DROP_IN} && systemctl restart cocalc-project-host.service"
        ));
        Master { seed }
    }

    fn token(&self, claims: &Value) -> String {
        cocalc_project_host::auth::sign(&self.seed, claims).unwrap()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {DROP_IN}; systemctl restart cocalc-project-host.service"
        ));
    }
}

fn now() -> u64 {
    cocalc_project_host::auth::now_secs()
}

#[test]
fn without_a_token_only_healthz_answers() {
    let id = new_id();
    let (s, v) = http_as(As::Nobody, "GET", "/healthz", None);
    assert_eq!((s, v), (200, json!({"ok": true})));
    for (m, p) in [
        ("GET", "/projects".to_string()),
        ("GET", format!("/projects/{id}/status")),
        ("POST", format!("/projects/{id}/start")),
        ("POST", format!("/projects/{id}/stop")),
        // before routing: nothing about the API is revealed without a token
        ("GET", "/nope".to_string()),
        ("DELETE", "/projects".to_string()),
        ("GET", "/projects/not-an-id/status".to_string()),
    ] {
        let (s, v) = http_as(As::Nobody, m, &p, None);
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("unauthorized")),
            "{m} {p}: {v}"
        );
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        let (s, v) = http_as(As::Bearer("not-the-token-0123456789"), m, &p, None);
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("invalid_token")),
            "{m} {p}: {v}"
        );
    }
    // RFC 6750: a 401 says which scheme to use
    let head = ok(&format!("curl -s -o /dev/null -D - {}/projects", tb::API));
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    // nothing was started by the refused start
    ok(&format!("! test -e {}/project-{id}", tb::STORAGE));
}

#[test]
fn the_admin_token_works_and_is_never_logged() {
    let token = admin_token();
    assert!(
        token.len() >= 32,
        "generated token is long: {}",
        token.len()
    );
    assert_eq!(
        ok(&format!("stat -c '%a %U' {}", tb::ADMIN_TOKEN_FILE)),
        "600 root"
    );
    let (s, v) = http("GET", "/projects", None);
    assert_eq!(s, 200, "{v}");
    let (s, v) = http_as(As::Bearer(&token), "GET", "/projects", None);
    assert_eq!(s, 200, "{v}");
    // the daemon got it as a systemd credential
    let pid = main_pid();
    assert_eq!(
        ok(&format!(
            "nsenter -t {pid} -m cat \"$(tr '\\0' '\\n' < /proc/{pid}/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p')/admin-token\""
        )),
        token
    );
    // refused tokens and the admin token appear nowhere in the daemon's journal
    http_as(
        As::Bearer("leaky-wrong-token-0123456789"),
        "GET",
        "/projects",
        None,
    );
    let log = ok("journalctl -u cocalc-project-host.service -o verbose --no-pager | cat");
    assert!(!log.contains(&token), "admin token in the journal");
    assert!(
        !log.contains("leaky-wrong-token"),
        "refused token in the journal"
    );
}

/// Puts the moved admin token file back and restarts the daemon, even when the test fails midway
/// (every later test needs the token).
struct TokenFileAway;

impl Drop for TokenFileAway {
    fn drop(&mut self) {
        sh(&format!(
            "if [ -e {0}.e2e ]; then mv -f {0}.e2e {0}; fi; systemctl restart cocalc-project-host.service",
            tb::ADMIN_TOKEN_FILE
        ));
    }
}

#[test]
fn the_daemon_starts_without_a_token_file_and_refuses_everything() {
    let token = admin_token();
    assert_eq!(
        http("GET", "/projects", None).0,
        200,
        "the token works before"
    );
    let since = ok("date +%s");
    ok(&format!("mv {0} {0}.e2e", tb::ADMIN_TOKEN_FILE));
    let _restore = TokenFileAway;
    ok("systemctl restart cocalc-project-host.service");
    let (s, v) = http_as(As::Nobody, "GET", "/healthz", None);
    assert_eq!((s, v), (200, json!({"ok": true})));
    // the real token of a moment ago, no token, and a made-up one: all refused, with the reason
    for (who, code) in [
        (As::Bearer(&token), "invalid_token"),
        (As::Nobody, "unauthorized"),
        (As::Bearer("anything-0123456789abcdef"), "invalid_token"),
    ] {
        let (s, v) = http_as(who, "GET", "/projects", None);
        assert_eq!((s, v["code"].as_str()), (401, Some(code)), "{who:?}: {v}");
    }
    let journal = ok(&format!(
        "journalctl -u cocalc-project-host.service --since @{since} -o cat --no-pager"
    ));
    assert!(
        journal.contains("no admin token and no master key"),
        "no warning in the journal:\n{journal}"
    );
    drop(_restore);
    assert_eq!(admin_token(), token);
    assert_eq!(
        http("GET", "/projects", None).0,
        200,
        "the token works again"
    );
}

#[test]
fn master_tokens_are_scoped_to_projects_and_actions() {
    let master = Master::install();
    let host = tb::host_id();
    let (a, b) = (new_id(), new_id());
    let t = now();
    let claims = |scope: Value| json!({"aud": host, "sub": "account-e2e", "iat": t, "exp": t + 600, "scope": scope});
    let for_a = master.token(&claims(
        json!({"projects": [a], "actions": ["status", "start", "stop"]}),
    ));
    let who = As::Bearer(&for_a);

    // project A: status, start, stop
    let (s, v) = http_as(who, "GET", &format!("/projects/{a}/status"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("opened")), "{v}");
    let (s, v) = http_as(who, "POST", &format!("/projects/{a}/start"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    // project B: forbidden, and nothing happens to it
    for (m, p) in [
        ("GET", format!("/projects/{b}/status")),
        ("POST", format!("/projects/{b}/start")),
        ("POST", format!("/projects/{b}/stop")),
    ] {
        let (s, v) = http_as(who, m, &p, None);
        assert_eq!(
            (s, v["code"].as_str()),
            (403, Some("forbidden")),
            "{m} {p}: {v}"
        );
    }
    ok(&format!("! test -e {}/project-{b}", tb::STORAGE));
    // no "list" in the scope
    let (s, v) = http_as(who, "GET", "/projects", None);
    assert_eq!(s, 403, "{v}");
    // a listing token sees only its projects
    let lister = master.token(&claims(json!({"projects": [a], "actions": ["list"]})));
    let (s, v) = http_as(As::Bearer(&lister), "GET", "/projects", None);
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["project_id"].as_str())
        .collect();
    assert_eq!(ids, [a.as_str()], "{v}");
    let (s, v) = http_as(
        As::Bearer(&lister),
        "POST",
        &format!("/projects/{a}/stop"),
        None,
    );
    assert_eq!(s, 403, "list-only token may not stop: {v}");

    // invalid tokens: 401 invalid_token, with the reason
    let mut expired = claims(json!({"projects": [a], "actions": ["status"]}));
    expired["iat"] = json!(t - 1000);
    expired["exp"] = json!(t - 300);
    let mut wrong_aud = claims(json!({"projects": [a], "actions": ["status"]}));
    wrong_aud["aud"] = json!(new_id());
    let mut too_long = claims(json!({"projects": [a], "actions": ["status"]}));
    too_long["exp"] = json!(t + 7 * 86400);
    let mut tampered = for_a.clone().into_bytes();
    let i = tampered.len() - 3;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // the same claims for project B under A's signature
    let (h, rest) = for_a.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let for_b = master.token(&claims(json!({"projects": [b], "actions": ["status"]})));
    let swapped = format!("{h}.{}.{sig}", for_b.split('.').nth(1).unwrap());
    let other_key = cocalc_project_host::auth::sign(
        &[42; 32],
        &claims(json!({"projects": [a], "actions": ["status"]})),
    )
    .unwrap();
    for (what, token, reason) in [
        ("expired", master.token(&expired), "expired"),
        ("wrong audience", master.token(&wrong_aud), "audience"),
        (
            "lifetime over the bound",
            master.token(&too_long),
            "max_token_lifetime",
        ),
        ("tampered signature", tampered, "signature"),
        ("claims swapped under a signature", swapped, "signature"),
        ("signed by another key", other_key, "signature"),
    ] {
        let (s, v) = http_as(
            As::Bearer(&token),
            "GET",
            &format!("/projects/{a}/status"),
            None,
        );
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("invalid_token")),
            "{what}: {v}"
        );
        assert!(v["error"].as_str().unwrap().contains(reason), "{what}: {v}");
    }
    let (s, v) = http_as(who, "POST", &format!("/projects/{a}/stop"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("opened")), "{v}");
    drop(master);
    // without the key configured, master tokens are refused again
    let (s, _) = http_as(
        As::Bearer(&for_a),
        "GET",
        &format!("/projects/{a}/status"),
        None,
    );
    assert_eq!(s, 401);
}

#[test]
fn the_daemon_unit_is_hardened() {
    http("GET", "/healthz", None);
    let out = ok("systemd-analyze security --no-pager cocalc-project-host.service");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score of {line:?}"));
    println!("systemd-analyze security: {line}");
    assert!(score <= 4.0, "exposure {score} > 4.0:\n{out}");
    // the running daemon is in its sandbox
    let pid = main_pid();
    let status = ok(&format!("cat /proc/{pid}/status"));
    let cap_bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_CHOWN (bit 0), CAP_DAC_OVERRIDE (1), CAP_FOWNER (3), CAP_SYS_PTRACE (19: the proxy
    // opens a project's netns), CAP_SYS_ADMIN (21) only
    assert_eq!(cap_bnd, "000000000028000b", "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    ok(&format!(
        "nsenter -t {pid} -m sh -c '! touch /usr/e2e-probe 2>/dev/null && ! touch /etc/e2e-probe 2>/dev/null'"
    ));
}

#[test]
fn storage_mounted_after_the_daemon_started_is_used() {
    // the storage oneshot mounts on the host; the sandboxed daemon must see mounts made later
    http("GET", "/healthz", None);
    let pid = main_pid();
    ok(&format!(
        "umount {s} && ! mountpoint -q {s} && nsenter -t {pid} -m sh -c '! mountpoint -q {s}'",
        s = tb::STORAGE
    ));
    ok("systemctl restart cocalc-project-host-storage.service");
    assert_eq!(main_pid(), pid, "the daemon kept running");
    ok(&format!(
        "nsenter -t {pid} -m findmnt -n -o FSTYPE {} | grep -qx btrfs",
        tb::STORAGE
    ));
    let id = new_id();
    assert_eq!(tb::start(&id, None)["state"], "running");
    ok(&format!(
        "btrfs subvolume show {}/project-{id} >/dev/null",
        tb::STORAGE
    ));
    stop(&id, false);
}

#[test]
fn slow_clients_do_not_starve_a_normal_one() {
    http("GET", "/healthz", None);
    let pid = main_pid();
    // 50 clients trickle a request head, 50 send a head and trickle a body (a byte a second);
    // meanwhile a normal client is served at once, and the server drops the slow ones after its
    // timeouts (10 s head, 10 s body) with a JSON 408 for the bodies. (Each group from an address
    // of its own, within http.max_connections_per_peer; authority::connections_per_peer_… tests
    // the cap.)
    let script = r#"
import json, socket, time, urllib.request
token = open("/etc/cocalc-project-host/admin-token").read().strip()
heads, bodies = [], []
for i in range(50):
    s = socket.create_connection(("127.0.0.1", 9002), source_address=("127.0.0.3", 0)); s.sendall(b"GET /projects HTTP/1.1\r\nHost: x\r\n"); heads.append(s)
for i in range(50):
    s = socket.create_connection(("127.0.0.1", 9002), source_address=("127.0.0.4", 0))
    s.sendall(("POST /projects/00000000-0000-4000-8000-%012d/stop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{" % (i, token)).encode())
    bodies.append(s)
for s in heads + bodies: s.setblocking(False)
served = []
t0 = time.time()
while time.time() - t0 < 13:
    for s in heads:
        try: s.send(b"X")
        except OSError: pass
    for s in bodies:
        try: s.send(b" ")
        except OSError: pass
    t = time.time()
    req = urllib.request.Request("http://127.0.0.1:9002/projects", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    served.append(round(time.time() - t, 3))
    time.sleep(1)
# each slow client must have been answered (408) or dropped (EOF, reset) by the server within its
# timeout (10 s) + 5 s of slack from when it connected; still open then is a failure
def answer(s):
    s.setblocking(True); s.settimeout(max(0.1, t0 + 15 - time.time()))
    try:
        data = s.recv(4096)
    except socket.timeout:
        return "timeout"
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else data.decode(errors="replace")
head_answers = [answer(s) for s in heads]
body_answers = [answer(s) for s in bodies]
print(json.dumps({"served": served,
  "heads_closed": sum(1 for a in head_answers if a in ("eof", "reset") or a.startswith("HTTP/1.1 408 ")),
  "heads_open": sum(1 for a in head_answers if a == "timeout"),
  "bodies_408": sum(1 for a in body_answers if a.startswith("HTTP/1.1 408") and '"code":"body_timeout"' in a),
  "bodies_open": sum(1 for a in body_answers if a == "timeout"),
  "sample_head": head_answers[0][:120], "sample_body": body_answers[0][:300]}))
"#;
    let o = tb::sh_in("python3 -", script.as_bytes());
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let r: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    println!("slow clients: {r}");
    let served = r["served"].as_array().unwrap();
    assert!(served.len() >= 10, "{r}");
    assert!(
        served.iter().all(|t| t.as_f64().unwrap() < 1.0),
        "a normal request took a second or more: {r}"
    );
    assert_eq!(r["heads_open"], 0, "slow heads still open after 15 s: {r}");
    assert_eq!(r["heads_closed"], 50, "{r}");
    assert_eq!(
        r["bodies_open"], 0,
        "slow bodies still open after 15 s: {r}"
    );
    assert_eq!(r["bodies_408"], 50, "{r}");
    assert_eq!(main_pid(), pid, "no crash");
}

#[test]
fn schemathesis_finds_no_failures() {
    http("GET", "/healthz", None);
    let pid = main_pid();
    let t0 = Instant::now();
    let out = Command::new(format!(
        "{}/tests/fuzz/schemathesis.sh",
        env!("CARGO_MANIFEST_DIR")
    ))
    .arg("run")
    .output()
    .expect("run tests/fuzz/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let har = std::fs::read_to_string(format!(
        "{}/target/schemathesis-report/requests.har",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_default();
    let requests = serde_json::from_str::<Value>(&har)
        .ok()
        .and_then(|h| h["log"]["entries"].as_array().map(Vec::len))
        .unwrap_or(0);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("generated") || l.contains("issues found") || l.contains("failure"))
        .collect();
    println!(
        "schemathesis: {requests} requests in {:.0?}; {}",
        t0.elapsed(),
        summary.join(" | ")
    );
    // clean up what the fuzzer started, through the API
    let (_, list) = http("GET", "/projects", None);
    for p in list["projects"].as_array().unwrap() {
        let id = p["project_id"].as_str().unwrap();
        if tb::status(id)["state"] != "opened" {
            stop(id, true);
        }
    }
    assert!(
        out.status.success(),
        "schemathesis reported failures:\n{stdout}\n{stderr}"
    );
    assert!(
        requests > 100,
        "only {requests} requests were made:\n{stdout}"
    );
    assert_eq!(main_pid(), pid, "the daemon did not crash or restart");
}
