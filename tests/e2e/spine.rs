//! The spine: socket activation, READY/STATUS, restarts without lost requests, bus name and
//! policy, journald fields, package install/remove/purge.
use serde_json::Value;

use crate::tb::{self, http, ok, sh};

fn main_pid() -> u32 {
    ok("systemctl show -p MainPID --value cocalc-project-host.service")
        .parse()
        .unwrap()
}

#[test]
fn socket_is_enabled_and_activates_the_service() {
    ok("systemctl stop cocalc-project-host.service");
    assert_eq!(
        ok("systemctl is-enabled cocalc-project-host.socket"),
        "enabled"
    );
    assert_eq!(
        ok("systemctl is-active cocalc-project-host.socket"),
        "active"
    );
    assert_eq!(
        sh("systemctl is-active cocalc-project-host.service")
            .stdout
            .trim(),
        "inactive"
    );

    let (s, v) = http("GET", "/healthz", None);
    assert_eq!((s, v), (200, serde_json::json!({"ok": true})));
    assert_eq!(
        ok("systemctl is-active cocalc-project-host.service"),
        "active"
    );
    // READY=1 came with a STATUS= line
    assert!(
        ok("systemctl show -p StatusText --value cocalc-project-host.service")
            .starts_with("serving on 127.0.0.1:9002")
    );

    // the daemon used the fd systemd passed: its startup line says so, with structured fields
    let pid = main_pid();
    let lines = ok(&format!(
        "journalctl -u cocalc-project-host.service _PID={pid} -o json --no-pager"
    ));
    let serving: Vec<Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|j| j["MESSAGE"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "one startup line for pid {pid}: {lines}");
    let j = &serving[0];
    assert_eq!(j["LISTENER"], "socket-activation", "{j}");
    assert_eq!(j["SYSLOG_IDENTIFIER"], "cocalc-project-host", "{j}");
    assert_eq!(j["MESSAGE_ID"], "5b1e9b0e7a4c4c2a8f3d2e1c0b9a8f70", "{j}");
    assert_eq!(j["VERSION"], env!("CARGO_PKG_VERSION"), "{j}");
    assert_eq!(j["ADDRESS"], "127.0.0.1:9002", "{j}");
    assert!(j["HOST_ID"].as_str().is_some_and(|h| h.len() == 36), "{j}");
    // the watchdog is armed (WatchdogSec=30s in the unit, pinged every 15 s)
    assert_eq!(j["WATCHDOG_MS"], "15000", "{j}");
}

#[test]
fn unknown_paths_get_json_404() {
    for p in ["/", "/nope", "/projects/", "/healthz/x"] {
        let (s, v) = http("GET", p, None);
        assert_eq!(s, 404, "{p}: {v}");
        assert_eq!(v["code"], "not_found", "{p}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{p}: {v}"
        );
    }
}

#[test]
fn restart_loses_no_request() {
    http("GET", "/healthz", None);
    let before = main_pid();
    // a client hammering /healthz while the service restarts: the socket stays open, requests
    // queue in its backlog, the old daemon finishes in-flight ones and the new one takes over
    let out = ok(r#"
        n=0; fail=0
        ( for i in $(seq 400); do
            curl -sSf -m 20 http://127.0.0.1:9002/healthz >/dev/null || echo "FAIL $?"
          done; echo DONE ) > /tmp/e2e-loop.log 2>&1 &
        loop=$!
        sleep 0.3
        systemctl restart cocalc-project-host.service
        sleep 0.2
        systemctl restart cocalc-project-host.service
        wait $loop
        cat /tmp/e2e-loop.log
    "#);
    assert!(out.ends_with("DONE"), "{out}");
    assert_eq!(
        out.matches("FAIL").count(),
        0,
        "failed requests during restart:\n{out}"
    );
    assert_ne!(main_pid(), before, "the service did restart");
    assert_eq!(
        ok("systemctl is-active cocalc-project-host.service"),
        "active"
    );
}

#[test]
fn bus_name_is_owned_and_policy_holds() {
    http("GET", "/healthz", None); // make sure the daemon runs
    let intro = ok("busctl introspect com.cocalc.ProjectHost1 /com/cocalc/ProjectHost1");
    assert!(intro.contains("com.cocalc.ProjectHost1.Manager"), "{intro}");
    assert!(intro.contains(".Version"), "{intro}");
    assert_eq!(
        ok(
            "busctl get-property com.cocalc.ProjectHost1 /com/cocalc/ProjectHost1 com.cocalc.ProjectHost1.Manager Version"
        ),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );
    let nobody = "setpriv --reuid=nobody --regid=nogroup --clear-groups";
    // everyone may introspect and read properties
    let v = ok(&format!(
        "{nobody} busctl get-property com.cocalc.ProjectHost1 /com/cocalc/ProjectHost1 com.cocalc.ProjectHost1.Manager Version"
    ));
    assert_eq!(v, format!("s \"{}\"", env!("CARGO_PKG_VERSION")));
    ok(&format!(
        "{nobody} busctl introspect com.cocalc.ProjectHost1 /com/cocalc/ProjectHost1"
    ));
    // nobody may not own the name
    let o = sh(&format!(
        "{nobody} busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus RequestName su com.cocalc.ProjectHost1 0"
    ));
    assert_ne!(o.code, 0, "nobody could own the name: {}", o.stdout);
    assert!(o.stderr.contains("Access denied"), "{}", o.stderr);
    // the owner is the daemon
    let owner = ok("busctl status com.cocalc.ProjectHost1 | sed -n 's/^PID=//p'");
    assert_eq!(owner, main_pid().to_string());
}

#[test]
fn package_remove_and_purge() {
    http("GET", "/healthz", None);
    let host = tb::host_id();
    let deb = "/xchg/cocalc-project-host.deb";
    ok("test -f /xchg/cocalc-project-host.deb");

    // remove: units stopped and gone, port closed, state kept
    ok("dpkg -r cocalc-project-host >/dev/null");
    assert_eq!(
        sh("systemctl is-active cocalc-project-host.socket")
            .stdout
            .trim(),
        "inactive"
    );
    assert_eq!(
        sh("systemctl is-active cocalc-project-host.service")
            .stdout
            .trim(),
        "inactive"
    );
    ok("! test -e /lib/systemd/system/cocalc-project-host.service");
    ok("! test -e /lib/systemd/system/cocalc-project-host.socket");
    ok("! test -e /usr/share/dbus-1/system.d/com.cocalc.ProjectHost1.conf");
    let o = sh("curl -s -m 2 http://127.0.0.1:9002/healthz");
    assert_ne!(o.code, 0, "port still open after dpkg -r: {}", o.stdout);
    ok("test -f /var/lib/cocalc-project-host/state.db");

    // reinstall: back, same host id (state was kept)
    ok(&format!("dpkg -i {deb} >/dev/null"));
    let (s, _) = http("GET", "/healthz", None);
    assert_eq!(s, 200);
    assert_eq!(
        tb::host_id(),
        host,
        "a reinstall after dpkg -r keeps the host id"
    );

    // purge removes the state
    ok("dpkg -P cocalc-project-host >/dev/null");
    ok("! test -e /var/lib/cocalc-project-host");
    ok("! test -e /etc/cocalc-project-host/config.toml");
    ok("! mountpoint -q /var/lib/cocalc-project-host/projects");

    // leave the machine as found
    ok(&format!("dpkg -i {deb} >/dev/null"));
    assert_eq!(
        ok("systemctl is-enabled cocalc-project-host.socket"),
        "enabled"
    );
    let (s, v) = http("GET", "/healthz", None);
    assert_eq!((s, v), (200, serde_json::json!({"ok": true})));
    assert_ne!(tb::host_id(), host, "after a purge the host is a new one");
    assert!(tb::STORAGE.starts_with("/var/lib/cocalc-project-host"));
}
