//! Idle freeze and idle stop against real systemd, podman and the kernel's cgroup freezer: an
//! idle project is frozen (the freezer state read from the cgroup files: `freezer.state` on v1,
//! `cgroup.events` on v2; its processes make no progress), a proxy request and an SSH login thaw
//! it and are answered, an idle project is stopped (host config), a CPU-busy project is never
//! frozen, an open SSH session keeps a project from being frozen or stopped, and refused requests
//! (no credential, a bad one, another project's token) and logins (a wrong key) do not thaw it.
//! Timeouts are the projects' own (`idle_freeze`/`idle_stop` in the start config, seconds).
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ssh::{key, known_hosts, set_keys, ssh_cmd};
use crate::tb::{self, DropIn, new_id, ok, sh, status, stop, wait_for};

const PROXY: &str = "http://127.0.0.1:8080";
const SLICE: &str = "cocalc.slice/cocalc-projects.slice";

/// httpd on 8000 over the home, and a ticker writing a count to ~/tick 3 times a second (a
/// frozen project's ticker stops; shell arithmetic, no fork but `sleep`: well under the CPU
/// threshold, also in the emulated VM).
fn serving(extra: Value) -> String {
    let script = r#"cd /home/user
echo hello > hello.txt
(i=0; while :; do i=$((i+1)); echo $i > tick; sleep 0.3; done) &
exec httpd -f -p 8000 -h /home/user"#;
    let mut c = json!({"network": "none", "cmd": ["/bin/sh", "-c", script]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

/// Whether the kernel says the project's processes are frozen (cgroup v2: its unit's
/// `cgroup.events`; v1: its unit's `freezer.state`), and the container's own cgroup too.
fn kernel_frozen(id: &str) -> bool {
    let unit = format!("cocalc-project-{id}.service");
    if tb::cgroup_v2() {
        let unit_dir = format!("/sys/fs/cgroup/{SLICE}/{unit}");
        let frozen = ok(&format!("grep '^frozen ' {unit_dir}/cgroup.events")) == "frozen 1";
        // the container's cgroup is below the unit's (--cgroups=split): frozen with it
        let payload = ok(&format!(
            "grep -h '^frozen ' {unit_dir}/libpod-payload-*/cgroup.events"
        ));
        assert_eq!(
            frozen,
            payload == "frozen 1",
            "unit {frozen}, container {payload}"
        );
        frozen
    } else {
        let unit_dir = format!("/sys/fs/cgroup/freezer/{SLICE}/{unit}");
        let state = ok(&format!("cat {unit_dir}/freezer.state"));
        let payload = ok(&format!("cat {unit_dir}/libpod-payload-*/freezer.state"));
        assert_eq!(
            state == "FROZEN",
            payload == "FROZEN",
            "unit {state}, container {payload}"
        );
        state == "FROZEN"
    }
}

fn home_file(id: &str, name: &str) -> String {
    sh(&format!("cat {}/project-{id}/{name}", tb::STORAGE))
        .stdout
        .trim()
        .to_string()
}

fn wait_state(id: &str, state: &str, secs: u64) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&format!("{id} {state}"), secs, || {
            let v = status(id);
            *last.borrow_mut() = v.clone();
            (v["state"] == state).then_some(v)
        })
    }));
    r.unwrap_or_else(|_| {
        // say why it is not there (the status's `activity` names what kept it active)
        let log = sh("journalctl -u cocalc-project-host -n 30 --no-pager -o cat").stdout;
        panic!(
            "{id} never {state}; last status {}; daemon log:\n{log}",
            last.borrow()
        )
    })
}

/// Asserts the project makes no progress: its ticker file stays the same for a second.
fn assert_no_progress(id: &str) {
    let t0 = home_file(id, "tick");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(home_file(id, "tick"), t0, "a frozen project's ticker moved");
}

fn wait_progress(id: &str) {
    let t0 = home_file(id, "tick");
    wait_for("the ticker to move", 10, || {
        (home_file(id, "tick") != t0).then_some(())
    });
}

#[test]
fn an_idle_project_freezes_and_a_proxy_request_thaws_it() {
    // the emulated VM (TCG) makes the ticker's one fork a period cost ~18% of a core (measured):
    // "busy" there starts higher; the busy-CPU case is its own test, at the default
    let _cpu = (tb::flavour() == tb::Flavour::Vm).then(|| {
        DropIn::install(
            "/etc/cocalc-project-host/config.d/90-e2e-idle-cpu.toml",
            "[projects]\nidle_cpu = 0.6\n",
        )
    });
    // long enough for the checks after the thaw to see the project run before it freezes again
    // (each command into the VM takes about a second)
    let freeze_s = 3 * tb::time_scale();
    let id = new_id();
    tb::start(&id, Some(&serving(json!({"idle_freeze": freeze_s}))));
    wait_for("the project's server", 60, || {
        let o = sh(&format!(
            "curl -sf {} {PROXY}/{id}/server/8000/hello.txt",
            tb::AUTH
        ));
        (o.stdout.trim() == "hello").then_some(())
    });
    let v = status(&id);
    assert_eq!(v["activity"]["freeze_after_s"], freeze_s, "{v}");
    // idle: frozen within a few seconds, by the kernel's own account
    let v = wait_state(&id, "frozen", 30);
    println!("frozen status: {v}");
    assert_eq!(v["activity"]["active"], json!([]), "{v}");
    assert!(v["main_pid"].as_u64().is_some(), "the unit stays up: {v}");
    assert!(kernel_frozen(&id), "the cgroup freezer says frozen");
    assert_no_progress(&id);
    // memory is kept: the unit is active, systemd sees it as such
    assert_eq!(
        ok(&format!(
            "systemctl show -p ActiveState --value cocalc-project-{id}.service"
        )),
        "active"
    );
    // a proxy request thaws it and is answered
    let t = Instant::now();
    let o = sh(&format!(
        "curl -s -m 20 {} {PROXY}/{id}/server/8000/hello.txt",
        tb::AUTH
    ));
    let took = t.elapsed();
    assert_eq!(o.stdout.trim(), "hello", "{o:?}");
    println!("request to the frozen project answered in {took:?} (curl's own start included)");
    assert!(!kernel_frozen(&id), "thawed");
    wait_progress(&id);
    let v = status(&id);
    assert!(
        v["state"] == "running" || v["state"] == "frozen",
        "thawed, maybe frozen again since: {v}"
    );
    stop(&id, false);
}

/// `curl` of the proxy: the status and the JSON error code (empty for a non-JSON body).
fn curl_code(args: &str) -> (u16, String) {
    let o = sh(&format!(
        "curl -s --path-as-is -m 20 -o /tmp/idle-body.$$ -w '%{{http_code}}' {args}; r=$?; echo; cat /tmp/idle-body.$$; rm -f /tmp/idle-body.$$; exit $r"
    ));
    assert_eq!(o.code, 0, "curl {args}: {}", o.stderr);
    let (status, body) = o.stdout.split_once('\n').unwrap_or((&o.stdout, ""));
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status.trim().parse().unwrap(), code)
}

#[test]
fn refused_requests_and_logins_do_not_thaw_a_frozen_project() {
    // a master key, for a valid token of another project (the proxy's 403 case)
    let (seed, b64) = tb::master_key();
    let cpu = if tb::flavour() == tb::Flavour::Vm {
        "[projects]\nidle_cpu = 0.6\n"
    } else {
        ""
    };
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-idle-refused.toml",
        &format!("{cpu}[auth]\nmaster_public_keys = [\"{b64}\"]\n"),
    );
    known_hosts();
    let freeze_s = 3 * tb::time_scale();
    let id = new_id();
    tb::start(&id, Some(&serving(json!({"idle_freeze": freeze_s}))));
    set_keys(&id, &[key("idle")]);
    wait_for("the project's server", 60, || {
        let o = sh(&format!(
            "curl -sf {} {PROXY}/{id}/server/8000/hello.txt",
            tb::AUTH
        ));
        (o.stdout.trim() == "hello").then_some(())
    });
    wait_state(&id, "frozen", 30);
    assert!(kernel_frozen(&id), "the cgroup freezer says frozen");
    let now = cocalc_project_host::auth::now_secs();
    let other = new_id();
    let others = cocalc_project_host::auth::sign(
        &seed,
        &json!({"aud": tb::host_id(), "sub": "e2e", "exp": now + 600,
                "scope": {"projects": [other], "actions": ["proxy", "files"]}}),
    )
    .unwrap();
    let url = format!("{PROXY}/{id}/server/8000/hello.txt");
    let files = format!("{PROXY}/{id}/files/hello.txt");
    let refused = [
        (url.clone(), 401, "unauthorized"),
        (
            format!("-H 'Authorization: Bearer x.y.z' {url}"),
            401,
            "invalid_token",
        ),
        (
            format!("-H 'Authorization: Bearer not-a-token' {url}"),
            401,
            "invalid_token",
        ),
        (
            format!("-H 'Cookie: cocalc_project_host=forged' {url}"),
            401,
            "invalid_token",
        ),
        (
            format!("-H 'Authorization: Bearer {others}' {url}"),
            403,
            "forbidden",
        ),
        (format!("'{url}?token={others}'"), 403, "forbidden"),
        (format!("'{url}?token=x.y.z'"), 401, "invalid_token"),
        (files.clone(), 401, "unauthorized"),
        (
            format!("-H 'Authorization: Bearer {others}' {files}"),
            403,
            "forbidden",
        ),
    ];
    for (args, status, code) in &refused {
        let (s, c) = curl_code(args);
        assert_eq!((s, c.as_str()), (*status, *code), "curl {args}");
    }
    // an SSH login with a key the project does not have: refused before the project is touched
    let wrong = key("idle-wrong");
    assert!(!wrong.is_empty());
    let o = sh(&ssh_cmd("idle-wrong", &id, "", "'echo in'"));
    assert_ne!(o.code, 0, "a wrong key logged in: {o:?}");
    assert_ne!(o.stdout.trim(), "in", "{o:?}");
    // still frozen, by the kernel's and the daemon's account, and no progress
    assert!(
        kernel_frozen(&id),
        "a refused request or login thawed the project"
    );
    let v = status(&id);
    assert_eq!(v["state"], "frozen", "{v}");
    assert_no_progress(&id);
    assert!(kernel_frozen(&id));
    // the same request with a credential thaws it and is answered
    let (s, _) = curl_code(&format!("{} {url}", tb::AUTH));
    assert_eq!(s, 200);
    assert!(!kernel_frozen(&id), "thawed");
    wait_progress(&id);
    stop(&id, false);
}

#[test]
fn an_ssh_login_thaws_a_frozen_project_and_an_open_session_holds_it() {
    known_hosts();
    let id = new_id();
    tb::start(
        &id,
        Some(&serving(json!({"idle_freeze": "2s", "idle_stop": "6s"}))),
    );
    set_keys(&id, &[key("idle")]);
    wait_state(&id, "frozen", 30);
    assert!(kernel_frozen(&id));
    // the login thaws it (a session's podman exec would hang in a frozen container)
    assert_eq!(ok(&ssh_cmd("idle", &id, "", "'echo in'")), "in");
    // a session open for longer than both timeouts: never frozen, never stopped
    ok(&format!(
        "rm -f /tmp/e2e-idle-ssh.*; {} > /tmp/e2e-idle-ssh.out 2>&1 & echo $! > /tmp/e2e-idle-ssh.pid",
        ssh_cmd("idle", &id, "", "'echo started; sleep 14; echo done'")
    ));
    wait_for("the session", 20, || {
        ok("cat /tmp/e2e-idle-ssh.out")
            .starts_with("started")
            .then_some(())
    });
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let v = status(&id);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["activity"]["ssh_sessions"], 1, "{v}");
        assert_eq!(v["activity"]["active"][0], "ssh_session", "{v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!kernel_frozen(&id));
    wait_for("the session to end", 20, || {
        (sh("kill -0 $(cat /tmp/e2e-idle-ssh.pid)").code != 0).then_some(())
    });
    assert_eq!(ok("tail -1 /tmp/e2e-idle-ssh.out"), "done");
    // once it is over, idle again: stopped after idle_stop
    wait_state(&id, "opened", 30);
    sh("rm -f /tmp/e2e-idle-ssh.*");
}

#[test]
fn an_idle_project_is_stopped_by_the_host_config() {
    let _idle = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-idle.toml",
        "[projects]\nidle_freeze = 0\nidle_stop = \"3s\"\n",
    );
    let id = new_id();
    tb::start(&id, Some(&serving(json!({}))));
    let v = status(&id);
    assert_eq!(v["activity"]["stop_after_s"], 3, "{v}");
    assert!(v["activity"].get("freeze_after_s").is_none(), "{v}");
    let t0 = Instant::now();
    wait_state(&id, "opened", 40);
    println!("stopped {:?} after the start", t0.elapsed());
    assert_eq!(
        sh(&format!("systemctl is-active cocalc-project-{id}.service"))
            .stdout
            .trim(),
        "inactive"
    );
    let log = ok(&format!(
        "journalctl -u cocalc-project-host.service PROJECT_ID={id} -o cat --no-pager | tail -20"
    ));
    assert!(log.contains("for being idle"), "{log}");
}

#[test]
fn a_cpu_busy_project_is_never_frozen() {
    let id = new_id();
    let c = json!({
        "network": "none",
        "idle_freeze": "2s",
        "cmd": ["/bin/sh", "-c", "while :; do :; done"],
    });
    tb::start(&id, Some(&c.to_string()));
    let t0 = Instant::now();
    let mut saw_cpu = false;
    while t0.elapsed() < Duration::from_secs(12) {
        let v = status(&id);
        assert_eq!(v["state"], "running", "{v}");
        saw_cpu |= v["activity"]["active"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("cpu")));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(saw_cpu, "the status said why it counts as active");
    assert!(!kernel_frozen(&id));
    stop(&id, true);
}
