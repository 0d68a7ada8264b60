//! The master link (docs/master-protocol.md) against a real test master (tests/master/master.py)
//! over loopback in the testbed: register and heartbeats, ordered reports, the master away during
//! changes and a daemon restart, TLS with a wrong CA or pin, the master's revocation list and key
//! set, a missing credential. Everything the master received is checked against the checked-in
//! schema (docs/master-protocol.schema.json).
use serde_json::{Value, json};

use crate::tb::{self, As, DropIn, http, http_as, new_id, ok, sh, start, stop, wait_for};

const CONF: &str = "/etc/cocalc-project-host/config.d/90-e2e-link.toml";
const CREDENTIAL: &str = "/etc/cocalc-project-host/master-credential";
/// Readable by the sandboxed daemon (its /root and /tmp are not the machine's).
const TLS_DIR: &str = "/etc/cocalc-project-host/e2e-tls";

/// The test master running in the machine as a transient unit while this lives.
struct TestMaster {
    port: u16,
    log: String,
    args: String,
}

impl TestMaster {
    fn up(port: u16, extra: &str) -> TestMaster {
        let script = format!("{}/tests/master/master.py", env!("CARGO_MANIFEST_DIR"));
        tb::push(
            std::path::Path::new(&script),
            "/usr/local/bin/e2e-master.py",
        );
        let log = format!("/run/e2e-master-{port}.jsonl");
        ok(&format!("rm -f {log}"));
        let m = TestMaster {
            port,
            args: format!("--port {port} --log {log} {extra}"),
            log,
        };
        m.start();
        m
    }

    fn unit(&self) -> String {
        format!("e2e-master-{}", self.port)
    }

    fn start(&self) {
        ok(&format!(
            "systemd-run --quiet --collect --unit={} python3 /usr/local/bin/e2e-master.py {}",
            self.unit(),
            self.args
        ));
        let port = self.port;
        wait_for("the test master to listen", 10, || {
            (sh(&format!("exec 3<>/dev/tcp/127.0.0.1/{port}")).code == 0).then_some(())
        });
    }

    fn stop(&self) {
        sh(&format!("systemctl stop {}", self.unit()));
    }

    /// Every request received so far.
    fn records(&self) -> Vec<Value> {
        sh(&format!("cat {} 2>/dev/null", self.log))
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.records().iter().filter(|r| r["path"] == path).count()
    }

    /// The distinct reports about `ids` (by sequence number, as a master dedups), in order:
    /// (project, event).
    fn reports(&self, ids: &[&str]) -> Vec<(String, String)> {
        let mut v: Vec<(u64, String, String)> = self
            .records()
            .iter()
            .filter(|r| r["path"] == "/project-state")
            .flat_map(|r| r["body"]["reports"].as_array().cloned().unwrap())
            .filter(|r| ids.contains(&r["project_id"].as_str().unwrap()))
            .map(|r| {
                (
                    r["seq"].as_u64().unwrap(),
                    r["project_id"].as_str().unwrap().to_string(),
                    r["event"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v.dedup_by_key(|r| r.0);
        v.into_iter().map(|(_, p, e)| (p, e)).collect()
    }

    /// Checks every body received against the protocol's schema.
    fn check_schema(&self) {
        let doc: Value =
            serde_json::from_str(include_str!("../../docs/master-protocol.schema.json")).unwrap();
        for r in self.records() {
            let def = match r["path"].as_str().unwrap() {
                "/register" => "RegisterRequest",
                "/heartbeat" => "Heartbeat",
                "/project-state" => "ProjectStates",
                p => panic!("the host called {p}"),
            };
            let mut schema = doc.clone();
            schema["$ref"] = json!(format!("#/$defs/{def}"));
            let v = jsonschema::validator_for(&schema).unwrap();
            let errors: Vec<String> = v.iter_errors(&r["body"]).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{def}: {errors:?} in {}", r["body"]);
        }
    }
}

impl Drop for TestMaster {
    fn drop(&mut self) {
        self.stop();
        sh(&format!("rm -f {}", self.log));
    }
}

/// The host's credential file, while this lives.
struct Credential;

impl Credential {
    fn install(secret: &str) -> Credential {
        ok(&format!(
            "umask 077; printf '%s\\n' '{secret}' > {CREDENTIAL}"
        ));
        Credential
    }
}

impl Drop for Credential {
    fn drop(&mut self) {
        sh(&format!("rm -f {CREDENTIAL}"));
    }
}

/// A `[master]` drop-in at `url` (heartbeats every second), plus `extra` TOML.
fn link(url: &str, extra: &str) -> DropIn {
    DropIn::install(
        CONF,
        &format!(
            "[master]\nurl = \"{url}\"\nname = \"e2e-host\"\nregion = \"testbed\"\nheartbeat_interval = \"1s\"\n{extra}"
        ),
    )
}

fn host_link() -> Value {
    let (s, v) = http("GET", "/host", None);
    assert_eq!(s, 200, "{v}");
    v["master"].clone()
}

fn wait_state(state: &str) -> Value {
    wait_for(&format!("the master link to be {state}"), 20, || {
        let m = host_link();
        (m["state"] == state).then_some(m)
    })
}

fn since() -> String {
    ok("date +%s")
}

fn journal(since: &str) -> String {
    ok(&format!(
        "journalctl -u cocalc-project-host.service --since @{since} -o verbose --no-pager | cat"
    ))
}

#[test]
fn the_master_sees_register_heartbeats_and_ordered_reports() {
    let master = TestMaster::up(9181, "");
    let _cred = Credential::install("e2e-credential-1");
    let _link = link("http://127.0.0.1:9181", "");
    wait_state("connected");
    let reg = &master.records()[0];
    assert_eq!(reg["path"], "/register");
    assert_eq!(reg["auth"], "Bearer e2e-credential-1");
    assert_eq!(reg["body"]["host_id"], tb::host_id());
    assert_eq!(reg["body"]["name"], "e2e-host");
    assert_eq!(reg["body"]["region"], "testbed");
    assert!(
        reg["body"]["capacity"]["disk_total_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        reg["body"]["boot_id"].as_str().unwrap().len(),
        32,
        "systemd's %b"
    );

    let (a, b) = (new_id(), new_id());
    start(&a, None);
    start(&b, None);
    let (s, v) = http("GET", "/projects?state=running", None);
    assert_eq!(s, 200, "{v}");
    let running: Vec<&str> = v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["project_id"].as_str().unwrap())
        .collect();
    assert!(
        running.contains(&a.as_str()) && running.contains(&b.as_str()),
        "{v}"
    );
    stop(&a, false);
    let (_, v) = http("GET", "/projects?state=running", None);
    assert!(!v.to_string().contains(&a), "{v}");
    let (s, v) = http("GET", "/projects?state=sleeping", None);
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_query")), "{v}");

    // DELETE: stops b, deletes its home and snapshots, reports it removed
    ok(&format!("cocalc-project-host snapshot create {b} keep"));
    let home = format!("{}/project-{b}", tb::STORAGE);
    let snaps = format!("{}/.snapshots/project-{b}", tb::STORAGE);
    ok(&format!("ls -d {home} {snaps}/keep"));
    let (s, v) = http("DELETE", &format!("/projects/{b}"), None);
    assert_eq!((s, &v["removed"]), (200, &json!(true)), "{v}");
    for p in [&home, &snaps] {
        assert_ne!(sh(&format!("ls -d {p}")).code, 0, "{p} is gone");
    }
    let (s, v) = http("GET", &format!("/projects/{b}/status"), None);
    assert_eq!((s, &v["state"]), (200, &json!("opened")), "{v}");
    assert!(!http("GET", "/projects", None).1.to_string().contains(&b));
    let bpath = cocalc_project_host::adapters::dbus::project_path(&b.parse().unwrap());
    assert_ne!(
        sh(&format!(
            "busctl introspect com.cocalc.ProjectHost1 {}",
            bpath.as_str()
        ))
        .code,
        0,
        "its D-Bus object is gone"
    );
    // idempotent
    let (s, v) = http("DELETE", &format!("/projects/{b}"), None);
    assert_eq!((s, &v["removed"]), (200, &json!(false)), "{v}");

    let want = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(p, e)| (p.to_string(), e.to_string()))
            .collect()
    };
    let expected = want(&[
        (&a, "started"),
        (&b, "started"),
        (&a, "stopped"),
        (&b, "stopped"),
        (&b, "removed"),
    ]);
    wait_for("the 5 reports", 20, || {
        (master.reports(&[&a, &b]) == expected).then_some(())
    });
    // a project stopped outside the host's calls is reported too
    let c = new_id();
    start(&c, None);
    ok(&format!("systemctl stop cocalc-project-{c}.service"));
    let expected_c = want(&[(&c, "started"), (&c, "stopped")]);
    wait_for("the outside stop's report", 20, || {
        (master.reports(&[&c]) == expected_c).then_some(())
    });
    // a home filling its quota is reported (once)
    let d = new_id();
    start(&d, Some(&format!("{{\"disk\":{}}}", 50 << 20)));
    let o = sh(&format!(
        "podman exec project-{d} sh -c 'dd if=/dev/zero of=/home/user/big bs=1M count=80 2>&1; sync'"
    ));
    assert!(o.stdout.contains("Disk quota exceeded"), "{}", o.stdout);
    wait_for("the quota report", 30, || {
        master
            .reports(&[&d])
            .contains(&(d.clone(), "quota".to_string()))
            .then_some(())
    });
    stop(&d, false);
    wait_for("2 heartbeats", 10, || {
        (master.count("/heartbeat") >= 2).then_some(())
    });
    assert_eq!(wait_state("connected")["outbox_depth"], 0);
    // the same state over D-Bus and the CLI
    assert_eq!(
        ok(
            "busctl get-property com.cocalc.ProjectHost1 /com/cocalc/ProjectHost1 com.cocalc.ProjectHost1.Manager MasterState"
        ),
        "s \"connected\""
    );
    let cli: Value = serde_json::from_str(&ok("cocalc-project-host master-status --json")).unwrap();
    assert_eq!(cli["state"], "connected");
    master.check_schema();
}

#[test]
fn with_the_master_down_during_five_changes_a_crash_and_a_restart_none_is_lost() {
    let master = TestMaster::up(9182, "");
    let _cred = Credential::install("e2e-credential-2");
    let _link = link("http://127.0.0.1:9182", "");
    wait_state("connected");
    master.stop();
    let (a, b) = (new_id(), new_id());
    start(&a, None);
    start(&b, None);
    stop(&a, false);
    // a crash (SIGKILL: no shutdown at all) between the changes; systemd restarts the daemon
    let pid = ok("systemctl show -p MainPID --value cocalc-project-host.service");
    ok("systemctl kill --signal=SIGKILL cocalc-project-host.service");
    wait_for("the daemon back after the crash", 20, || {
        let now = ok("systemctl show -p MainPID --value cocalc-project-host.service");
        (now != pid
            && now != "0"
            && sh("systemctl is-active cocalc-project-host.service").code == 0)
            .then_some(())
    });
    start(&a, None);
    stop(&b, false);
    let m = wait_state("offline");
    assert!(m["last_error"].as_str().unwrap().contains("connect"), "{m}");
    // and a restart
    ok("systemctl restart cocalc-project-host.service");
    let m = wait_for("the outbox after the restart", 20, || {
        let m = host_link();
        (m["state"] == "offline" && m["outbox_depth"].as_u64() >= Some(5)).then_some(m)
    });
    // the host serves on meanwhile
    assert_eq!(tb::status(&a)["state"], "running", "{m}");
    master.start();
    let expected: Vec<(String, String)> = [
        (&a, "started"),
        (&b, "started"),
        (&a, "stopped"),
        (&a, "started"),
        (&b, "stopped"),
    ]
    .iter()
    .map(|(p, e)| (p.to_string(), e.to_string()))
    .collect();
    wait_for("all 5 reports, in order", 30, || {
        (master.reports(&[&a, &b]) == expected).then_some(())
    });
    assert_eq!(wait_state("connected")["outbox_depth"], 0);
    stop(&a, false);
    master.check_schema();
}

/// Makes a CA, a certificate for 127.0.0.1 it signed, and another CA; returns the certificate's
/// SHA-256 (DER, hex).
fn make_certs() -> String {
    ok(&format!(
        "set -e; mkdir -p {TLS_DIR}; cd {TLS_DIR}
         ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
         openssl req -x509 $ec -days 2 -subj /CN=e2e-ca -keyout ca.key -out ca.pem 2>/dev/null
         openssl req -x509 $ec -days 2 -subj /CN=e2e-other-ca -keyout other.key -out other.pem 2>/dev/null
         openssl req $ec -subj /CN=127.0.0.1 -keyout leaf.key -out leaf.csr 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out leaf.pem 2>/dev/null
         chmod 644 *.pem"
    ));
    ok(&format!(
        "openssl x509 -in {TLS_DIR}/leaf.pem -outform der | sha256sum | cut -d' ' -f1"
    ))
}

#[test]
fn a_tls_master_with_a_wrong_ca_or_pin_is_refused_and_the_host_serves_on() {
    let pin = make_certs();
    let master = TestMaster::up(
        9183,
        &format!("--cert {TLS_DIR}/leaf.pem --key {TLS_DIR}/leaf.key"),
    );
    let _cred = Credential::install("e2e-credential-3");
    let url = "https://127.0.0.1:9183";
    let cases = [
        (
            format!("ca_file = \"{TLS_DIR}/other.pem\""),
            "UnknownIssuer",
        ),
        (format!("pin_sha256 = \"{}\"", "0".repeat(64)), "pinned"),
    ];
    for (setting, why) in &cases {
        let t = since();
        let link = link(url, setting);
        let m = wait_state("offline");
        assert!(
            m["last_error"].as_str().unwrap().contains(why),
            "{setting}: {m}"
        );
        assert!(
            journal(&t).contains(why),
            "{setting}: the refusal is logged"
        );
        assert_eq!(master.count("/register"), 0, "{setting}: nothing was sent");
        // serving on: the API answers, projects start
        let id = new_id();
        start(&id, None);
        stop(&id, false);
        drop(link);
    }
    // the right CA, then the right pin: accepted
    for setting in [
        format!("ca_file = \"{TLS_DIR}/ca.pem\""),
        format!("pin_sha256 = \"{pin}\""),
    ] {
        let before = master.count("/register");
        let _link = link(url, &setting);
        wait_state("connected");
        assert!(master.count("/register") > before, "{setting}");
    }
    master.check_schema();
    sh(&format!("rm -rf {TLS_DIR}"));
}

/// An Ed25519 key: (seed, base64 of the public key).
fn keypair() -> ([u8; 32], String) {
    tb::master_key()
}

fn token(seed: &[u8; 32], jti: &str) -> String {
    let t = cocalc_project_host::auth::now_secs();
    let claims = json!({"aud": tb::host_id(), "sub": "e2e", "iat": t, "exp": t + 600, "jti": jti,
        "scope": {"projects": "*", "actions": ["list", "host"]}});
    cocalc_project_host::auth::sign(seed, &claims).unwrap()
}

#[test]
fn the_masters_revocations_and_key_set_take_effect() {
    let answer = "/run/e2e-master-answer.json";
    ok(&format!(
        "echo '{{\"revoked\": [\"e2e-jti-1\"]}}' > {answer}"
    ));
    let master = TestMaster::up(9184, &format!("--answer {answer}"));
    let _cred = Credential::install("e2e-credential-4");
    let (old, old_pub) = keypair();
    let _link = link(
        "http://127.0.0.1:9184",
        &format!("[auth]\nmaster_public_keys = [\"{old_pub}\"]\nmax_token_lifetime = 3600\n"),
    );
    wait_state("connected");
    let (s, v) = http_as(As::Bearer(&token(&old, "e2e-jti-1")), "GET", "/host", None);
    assert_eq!((s, v["code"].as_str()), (401, Some("token_revoked")), "{v}");
    let (s, v) = http_as(As::Bearer(&token(&old, "e2e-jti-2")), "GET", "/host", None);
    assert_eq!(s, 200, "a token not revoked, with the host action: {v}");
    assert_eq!(v["master"]["state"], "connected");

    // the master sends a new key set: it replaces the configured one, also across a restart
    // with the master away
    let (new, new_pub) = keypair();
    ok(&format!(
        "echo '{{\"public_keys\": [\"{new_pub}\"]}}' > {answer}"
    ));
    ok("systemctl restart cocalc-project-host.service");
    wait_state("connected");
    // the next register says which keys the host trusts now
    ok("systemctl restart cocalc-project-host.service");
    wait_state("connected");
    master.stop();
    ok("systemctl restart cocalc-project-host.service");
    wait_state("offline");
    let (s, v) = http_as(
        As::Bearer(&token(&old, "e2e-jti-3")),
        "GET",
        "/projects",
        None,
    );
    assert_eq!((s, v["code"].as_str()), (401, Some("invalid_token")), "{v}");
    let (s, v) = http_as(
        As::Bearer(&token(&new, "e2e-jti-4")),
        "GET",
        "/projects",
        None,
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = http_as(
        As::Bearer(&token(&new, "e2e-jti-1")),
        "GET",
        "/projects",
        None,
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (401, Some("token_revoked")),
        "still revoked: {v}"
    );
    let registers: Vec<Value> = master
        .records()
        .into_iter()
        .filter(|r| r["path"] == "/register")
        .collect();
    assert_eq!(
        registers.last().unwrap()["body"]["public_keys"],
        json!([new_pub]),
        "the host says which keys it trusts"
    );
    master.check_schema();
    // (the stored key set stays in the store; without [master] it is not used)
    sh(&format!("rm -f {answer}"));
}

#[test]
fn without_its_credential_the_host_runs_standalone() {
    sh(&format!("rm -f {CREDENTIAL}"));
    let t = since();
    let _link = link("http://127.0.0.1:9185", "");
    let pid = ok("systemctl show -p MainPID --value cocalc-project-host.service");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        ok("systemctl is-active cocalc-project-host.service"),
        "active"
    );
    assert_eq!(
        ok("systemctl show -p MainPID --value cocalc-project-host.service"),
        pid,
        "no crash loop"
    );
    assert!(
        journal(&t)
            .contains("no credential (systemd credential master-credential): running standalone"),
        "a clear log line"
    );
    assert_eq!(host_link()["state"], "standalone");
    let cli = ok("cocalc-project-host master-status");
    assert!(cli.contains("master link: standalone"), "{cli}");
    let id = new_id();
    start(&id, None);
    stop(&id, false);
}

#[test]
fn deletes_and_the_host_view_need_their_own_actions() {
    let (seed, public) = keypair();
    let _auth = DropIn::install(
        CONF,
        &format!("[auth]\nmaster_public_keys = [\"{public}\"]\nmax_token_lifetime = 3600\n"),
    );
    let (a, b) = (new_id(), new_id());
    start(&a, None);
    ok(&format!(
        "podman exec project-{a} sh -c 'echo keep > /home/user/keep'"
    ));
    let t = cocalc_project_host::auth::now_secs();
    let host = tb::host_id();
    let tok = |projects: Value, actions: Value| {
        let claims = json!({"aud": host, "sub": "e2e", "iat": t, "exp": t + 600,
            "scope": {"projects": projects, "actions": actions}});
        cocalc_project_host::auth::sign(&seed, &claims).unwrap()
    };
    // everything but delete on a, and delete on b only: neither deletes a
    let all_but = tok(
        json!([a]),
        json!([
            "list", "status", "start", "stop", "config", "snapshot", "revoke", "host"
        ]),
    );
    let other = tok(json!([b]), json!(["delete"]));
    for t in [&all_but, &other] {
        let (s, v) = http_as(As::Bearer(t), "DELETE", &format!("/projects/{a}"), None);
        assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    }
    let (s, v) = http_as(As::Nobody, "DELETE", &format!("/projects/{a}"), None);
    assert_eq!(s, 401, "{v}");
    assert_eq!(tb::status(&a)["state"], "running", "untouched");
    ok(&format!("ls -d {}/project-{a}", tb::STORAGE));
    ok(&format!("podman exec project-{a} cat /home/user/keep"));
    // GET /host needs the host action
    let (s, v) = http_as(
        As::Bearer(&tok(json!("*"), json!(["list"]))),
        "GET",
        "/host",
        None,
    );
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    // the delete action on a does it
    let del = tok(json!([a]), json!(["delete"]));
    let (s, v) = http_as(As::Bearer(&del), "DELETE", &format!("/projects/{a}"), None);
    assert_eq!((s, &v["removed"]), (200, &json!(true)), "{v}");
    assert_ne!(
        sh(&format!("ls -d {}/project-{a}", tb::STORAGE)).code,
        0,
        "home gone"
    );
}
