//! SSH into projects with the real OpenSSH client, inside the testbed: commands run in the
//! project as its user, exit statuses and streams pass, a pty follows resizes, wrong keys,
//! passwords and unknown projects are refused, failed logins from one address do not slow
//! another, a stopped project ends its sessions.
use std::time::Instant;

use serde_json::json;

use crate::tb::{self, http, ok, sh, sh_in};

/// Where the tests keep their client keys and known_hosts inside the machine.
const DIR: &str = "/root/.e2e-ssh";

/// Makes (once per name) an ed25519 key pair in the machine; its public line.
pub(crate) fn key(name: &str) -> String {
    ok(&format!(
        "mkdir -p -m 700 {DIR} && {{ [ -f {DIR}/{name} ] || ssh-keygen -q -t ed25519 -N '' -C {name} -f {DIR}/{name}; }} && cat {DIR}/{name}.pub"
    ))
}

/// known_hosts with the daemon's host key, as `cocalc-project-host ssh-host-key` prints it; the
/// client then checks the server strictly.
pub(crate) fn known_hosts() {
    // the daemon makes the key on its first start (socket activation: the first call starts it)
    tb::http("GET", "/healthz", None);
    tb::wait_for("the SSH host key", 30, || {
        let o = sh("cocalc-project-host ssh-host-key");
        (o.code == 0).then_some(())
    });
    let out = ok("cocalc-project-host ssh-host-key");
    let mut lines = out.lines();
    let fp = lines.next().unwrap();
    let public = lines.next().unwrap();
    ok(&format!(
        "mkdir -p -m 700 {DIR} && echo '[127.0.0.1]:2222 {public}' > {DIR}/known_hosts"
    ));
    // the fingerprint is the one ssh-keygen computes for that key
    let theirs = ok(&format!("ssh-keygen -l -f {DIR}/known_hosts"));
    assert!(theirs.contains(fp), "{fp} vs {theirs}");
}

/// The `ssh` command line with key `k` as `user`, plus extra options, running `remote`.
pub(crate) fn ssh_cmd(k: &str, user: &str, opts: &str, remote: &str) -> String {
    format!(
        "ssh -p 2222 -i {DIR}/{k} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile={DIR}/known_hosts -o ConnectTimeout=10 {opts} {user}@127.0.0.1 {remote}"
    )
}

pub(crate) fn set_keys(id: &str, keys: &[String]) {
    let (s, v) = http(
        "PUT",
        &format!("/projects/{id}/authorized-keys"),
        Some(&json!({ "keys": keys }).to_string()),
    );
    assert_eq!(s, 200, "{v}");
}

/// A running project that key `k` may log into.
fn project_for(k: &str) -> String {
    known_hosts();
    let id = tb::new_id();
    tb::start(&id, None);
    set_keys(&id, &[key(k)]);
    id
}

#[test]
fn ssh_runs_commands_in_the_project_as_its_user() {
    let id = project_for("alice");
    let o = sh(&ssh_cmd("alice", &id, "", "'id -u; pwd; echo $HOME'"));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "1000\n/home/user\n/home/user\n", "{o:?}");
    // it runs in the project: the project's id is in its environment, its files are the home's
    ok(&format!(
        "{} > /dev/null",
        ssh_cmd("alice", &id, "", "'echo hi > ~/from-ssh'")
    ));
    assert_eq!(
        ok(&format!("cat {}/project-{id}/from-ssh", tb::STORAGE)),
        "hi",
        "the file is in the project's home"
    );
    assert_eq!(
        ok(&ssh_cmd("alice", &id, "", "'echo $COCALC_PROJECT_ID'")),
        id
    );
    // exit status and the two output streams pass through; stdin streams in, EOF included
    let o = sh_in(
        &ssh_cmd("alice", &id, "", "'cat; echo err >&2; exit 7'"),
        b"from stdin\n",
    );
    assert_eq!(
        (o.code, o.stdout.as_str(), o.stderr.trim()),
        (7, "from stdin\n", "err"),
        "{o:?}"
    );
    // the other spellings of the user name
    let hex = id.replace('-', "");
    for user in [
        format!("project-{id}"),
        hex.clone(),
        format!("project-{hex}"),
    ] {
        assert_eq!(
            ok(&ssh_cmd("alice", &user, "", "'id -u'")),
            "1000",
            "{user}"
        );
    }
    // env: the locale passes, anything else does not
    let o = sh(&ssh_cmd(
        "alice",
        &id,
        "-o SetEnv='LC_ALL=C.UTF-8 LD_PRELOAD=/x FOO=bar'",
        "'echo \"$LC_ALL|$LD_PRELOAD|$FOO\"'",
    ));
    assert_eq!(o.stdout, "C.UTF-8||\n", "{o:?}");
    // the stored keys read back normalized; a bad list is refused and changes nothing
    let (s, v) = http("GET", &format!("/projects/{id}/authorized-keys"), None);
    assert_eq!(
        (s, v["keys"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    let (s, v) = http(
        "PUT",
        &format!("/projects/{id}/authorized-keys"),
        Some(r#"{"keys":["ssh-ed25519 AAAA nope"]}"#),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_ssh_key")),
        "{v}"
    );
    let many: Vec<String> = vec![key("alice"); 1001];
    let (s, v) = http(
        "PUT",
        &format!("/projects/{id}/authorized-keys"),
        Some(&json!({ "keys": many }).to_string()),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_ssh_key")),
        "{v}"
    );
    assert_eq!(ok(&ssh_cmd("alice", &id, "", "true; echo ok")), "ok");
    tb::stop(&id, true);
}

#[test]
fn wrong_keys_passwords_and_unknown_projects_are_refused() {
    let a = project_for("alice");
    let b = project_for("bob");
    key("mallory");
    let refused = |k: &str, user: &str, opts: &str| {
        let o = sh(&ssh_cmd(k, user, opts, "'echo in'"));
        assert_eq!(o.code, 255, "{k}@{user} {opts}: {o:?}");
        assert!(o.stdout.is_empty(), "{o:?}");
        assert!(o.stderr.contains("Permission denied"), "{o:?}");
    };
    refused("alice", &b, ""); // A's key on B
    refused("bob", &a, "");
    refused("mallory", &a, ""); // a key nobody stored
    refused("alice", &tb::new_id(), ""); // no such project
    for user in ["root", "user", "../x", &a.to_uppercase()] {
        refused("alice", user, "");
    }
    // no password or keyboard-interactive login is offered at all
    let o = sh(&ssh_cmd(
        "alice",
        &a,
        "-o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive",
        "true",
    ));
    assert_eq!(o.code, 255, "{o:?}");
    assert!(o.stderr.contains("Permission denied (publickey)"), "{o:?}");
    // the right key still works
    assert_eq!(ok(&ssh_cmd("alice", &a, "", "'id -u'")), "1000");
    tb::stop(&a, true);
    tb::stop(&b, true);
}

#[test]
fn a_stopped_project_is_refused_with_a_message_and_stopping_ends_its_sessions() {
    let id = project_for("alice");
    // a session that waits; the project stops under it
    ok(&format!(
        "rm -f /tmp/e2e-ssh-sleep.*; {} > /tmp/e2e-ssh-sleep.out 2> /tmp/e2e-ssh-sleep.err & echo $! > /tmp/e2e-ssh-sleep.pid",
        ssh_cmd("alice", &id, "", "'echo started; sleep 600'")
    ));
    tb::wait_for("the session to start", 20, || {
        (ok("cat /tmp/e2e-ssh-sleep.out") == "started").then_some(())
    });
    let t0 = Instant::now();
    tb::stop(&id, false);
    tb::wait_for("ssh to exit after the stop", 30, || {
        (sh("kill -0 $(cat /tmp/e2e-ssh-sleep.pid)").code != 0).then_some(())
    });
    let err = ok("cat /tmp/e2e-ssh-sleep.err");
    assert!(err.contains("stopped; closing the session"), "{err}");
    eprintln!("session closed {:?} after the stop began", t0.elapsed());
    // now it is not running: refused with a clear message
    let o = sh(&ssh_cmd("alice", &id, "", "'echo in'"));
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stdout.is_empty(), "{o:?}");
    assert!(o.stderr.contains("is not running"), "{o:?}");
    sh("rm -f /tmp/e2e-ssh-sleep.*");
}

#[test]
fn a_pty_session_follows_window_changes() {
    let id = project_for("alice");
    // a python pty driver: the ssh client on a terminal of 24x80, then resized to 50x132
    let script = format!(
        r#"
import os, pty, select, struct, fcntl, termios, signal, time, sys
pid, fd = pty.fork()
if pid == 0:
    os.execvp("ssh", {argv})
def size(rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
size(24, 80)
buf = b""
def until(token, secs=20):
    global buf
    end = time.time() + secs
    while token not in buf:
        r, _, _ = select.select([fd], [], [], max(0, end - time.time()))
        if not r:
            sys.exit("timeout waiting for %r; got %r" % (token, buf))
        buf += os.read(fd, 4096)
until(b"$ ")
os.write(fd, b"echo TERM=$TERM; stty size\n")
until(b"24 80")
size(50, 132)
os.kill(pid, signal.SIGWINCH)
time.sleep(0.5)
os.write(fd, b"stty size\n")
until(b"50 132")
os.write(fd, b"exit 3\n")
_, st = os.waitpid(pid, 0)
print(buf.decode(errors="replace"))
print("EXIT", os.waitstatus_to_exitcode(st))
"#,
        argv = serde_json::to_string(
            &ssh_cmd("alice", &id, "-tt -o SetEnv=TERM=xterm-e2e", "")
                .split_whitespace()
                .collect::<Vec<_>>()
        )
        .unwrap()
    );
    let o = sh_in("python3 -", script.as_bytes());
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("TERM=xterm-e2e"), "{}", o.stdout);
    assert!(o.stdout.contains("50 132"), "{}", o.stdout);
    assert!(o.stdout.contains("EXIT 3"), "{}", o.stdout);
    tb::stop(&id, true);
}

#[test]
fn failed_logins_from_one_address_leave_others_at_normal_speed() {
    let id = project_for("alice");
    key("mallory");
    // 500 failed logins from 127.0.0.3, ten at a time
    let bad = ssh_cmd("mallory", &id, "-o BindAddress=127.0.0.3", "true");
    let t0 = Instant::now();
    let o = ok(&format!(
        "for j in $(seq 10); do (for i in $(seq 50); do {bad} >/dev/null 2>&1 && echo IN; done) & done; wait; echo done"
    ));
    assert_eq!(o, "done", "no failed login may get in");
    eprintln!("500 failed logins took {:?}", t0.elapsed());
    // the limit holds for that address now: closed before any key exchange
    let o = sh(&bad);
    assert_eq!(o.code, 255, "{o:?}");
    assert!(
        o.stderr.contains("kex_exchange_identification") || o.stderr.contains("Connection closed"),
        "{o:?}"
    );
    // another address logs in at once
    let t = Instant::now();
    let o = ok(&format!(
        "s=$(date +%s%N); {} >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))",
        ssh_cmd("alice", &id, "-o BindAddress=127.0.0.2", "true")
    ));
    let ms: u64 = o.parse().unwrap();
    eprintln!(
        "good login from 127.0.0.2: {ms} ms (round trip {:?})",
        t.elapsed()
    );
    assert!(ms < 1000, "a good login took {ms} ms");
    tb::stop(&id, true);
}

/// `scp`/`sftp` options for key `k` (they take `-P` for the port).
fn copy_opts(k: &str) -> String {
    format!(
        "-P 2222 -i {DIR}/{k} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile={DIR}/known_hosts"
    )
}

fn sha(path: &str) -> String {
    ok(&format!("sha256sum {path} | cut -d' ' -f1"))
}

#[test]
fn scp_and_sftp_move_50mb_both_ways_owned_by_the_project_user() {
    let id = project_for("alice");
    let home = format!("{}/project-{id}", tb::STORAGE);
    ok("head -c 50M /dev/urandom > /tmp/e2e-50m");
    let want = sha("/tmp/e2e-50m");
    let o = copy_opts("alice");
    // scp (SFTP underneath, OpenSSH 9) in and out
    let t = Instant::now();
    ok(&format!("scp -q {o} /tmp/e2e-50m {id}@127.0.0.1:big1"));
    let up = t.elapsed();
    assert_eq!(sha(&format!("{home}/big1")), want);
    let t = Instant::now();
    ok(&format!(
        "scp -q {o} {id}@127.0.0.1:/home/user/big1 /tmp/e2e-50m.back"
    ));
    let down = t.elapsed();
    assert_eq!(sha("/tmp/e2e-50m.back"), want);
    eprintln!("scp 50 MB: in {up:?}, out {down:?}");
    // the file belongs to the project's user: 1000 inside, the home's owner on the host
    assert_eq!(
        ok(&ssh_cmd("alice", &id, "", "'stat -c %u:%g big1'")),
        "1000:1000"
    );
    assert_eq!(
        ok(&format!("stat -c %u {home}/big1")),
        ok(&format!("stat -c %u {home}"))
    );
    // sftp: put, get, mkdir, rename, ls, rm, rmdir
    let batch = "put /tmp/e2e-50m big2\nget big2 /tmp/e2e-50m.back2\nmkdir d\nrename big2 d/big2\nls -l d\nrm d/big2\nrmdir d\n";
    let out = sh_in(&format!("sftp -b - {o} {id}@127.0.0.1"), batch.as_bytes());
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("big2"), "{out:?}");
    assert_eq!(sha("/tmp/e2e-50m.back2"), want);
    assert_eq!(sh(&format!("ls {home}/d")).code, 2, "d was removed");
    // nothing outside the home: absolute paths elsewhere, `..`, a symlink to a host file
    ok(&ssh_cmd(
        "alice",
        &id,
        "",
        "'ln -sf /etc/shadow leak; ln -sf ../../../../etc/shadow leak2'",
    ));
    for path in [
        "/etc/shadow",
        "../../etc/shadow",
        "leak",
        "leak2",
        "/home/user/../../etc/shadow",
    ] {
        let out = sh_in(
            &format!("rm -f /tmp/e2e-leak; sftp -b - {o} {id}@127.0.0.1"),
            format!("get {path} /tmp/e2e-leak\n").as_bytes(),
        );
        assert_ne!(out.code, 0, "{path}: {out:?}");
        assert_ne!(sh("test -s /tmp/e2e-leak").code, 0, "{path} was read");
    }
    // nor written through: a put onto the symlink does not reach the host file
    let before = sha("/etc/shadow");
    let out = sh_in(
        &format!("sftp -b - {o} {id}@127.0.0.1"),
        b"put /tmp/e2e-50m.back leak\n",
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert_eq!(sha("/etc/shadow"), before);
    sh("rm -f /tmp/e2e-50m /tmp/e2e-50m.back /tmp/e2e-50m.back2 /tmp/e2e-leak");
    tb::stop(&id, true);
}

#[test]
fn ssh_l_reaches_a_port_inside_a_network_none_project_and_nothing_else() {
    known_hosts();
    let id = tb::new_id();
    let script = "mkdir -p /home/user/www && echo hello-from-project > /home/user/www/index.html && exec httpd -f -p 8000 -h /home/user/www";
    tb::start(
        &id,
        Some(&json!({"network": "none", "cmd": ["/bin/sh", "-c", script]}).to_string()),
    );
    set_keys(&id, &[key("alice")]);
    let fwd = |spec: &str| {
        ssh_cmd(
            "alice",
            &id,
            &format!("-N -o ExitOnForwardFailure=yes -L {spec}"),
            "",
        )
    };
    let out = ok(&format!(
        "{} & pid=$!; for i in $(seq 50); do curl -s -m 5 http://127.0.0.1:18080/index.html && break; sleep 0.2; done; kill $pid",
        fwd("127.0.0.1:18080:127.0.0.1:8000")
    ));
    assert_eq!(out, "hello-from-project");
    // another destination, or a closed port: the channel is refused, curl gets nothing
    // (a local port each: a killed ssh may still hold the last one for a moment)
    for (local, spec) in [
        (18081, "127.0.0.1:18081:10.0.0.1:8000"),
        (18082, "127.0.0.1:18082:127.0.0.2:8000"),
        (18083, "127.0.0.1:18083:127.0.0.1:9"),
    ] {
        let out = sh(&format!(
            "{} 2>/tmp/e2e-fwd.err & pid=$!; sleep 1.5; curl -s -m 5 http://127.0.0.1:{local}/; echo rc=$?; kill $pid; wait $pid; cat /tmp/e2e-fwd.err",
            fwd(spec)
        ));
        assert!(!out.stdout.contains("hello"), "{spec}: {out:?}");
        assert!(out.stdout.contains("open failed"), "{spec}: {out:?}");
    }
    tb::stop(&id, true);
}

#[test]
fn the_projects_own_authorized_keys_count_but_never_through_a_symlink() {
    let id = project_for("alice");
    let carol = key("carol");
    let denied = |o: &tb::Out| o.code == 255 && o.stderr.contains("Permission denied");
    assert!(denied(&sh(&ssh_cmd("carol", &id, "", "true"))));
    // carol's key in the project's own file: she gets in
    ok(&ssh_cmd(
        "alice",
        &id,
        "",
        &format!("'mkdir -p ~/.ssh && echo \"{carol}\" > ~/.ssh/authorized_keys'"),
    ));
    assert_eq!(ok(&ssh_cmd("carol", &id, "", "'id -u'")), "1000");
    // a key with options this server does not enforce is not taken
    ok(&ssh_cmd(
        "alice",
        &id,
        "",
        &format!("'echo \"command=\\\"/bin/false\\\" {carol}\" > ~/.ssh/authorized_keys'"),
    ));
    assert!(denied(&sh(&ssh_cmd("carol", &id, "", "true"))));
    // the file as a symlink to a host file holding her key, in a place the daemon itself may
    // read (its state directory, two levels above the homes): not read, absolute or relative
    let host_copy = "/var/lib/cocalc-project-host/e2e-carol.pub";
    ok(&format!("cp {DIR}/carol.pub {host_copy}"));
    for target in [
        host_copy.to_string(),
        "../../../e2e-carol.pub".to_string(),
        format!("../../../../../../../..{host_copy}"),
    ] {
        ok(&ssh_cmd(
            "alice",
            &id,
            "",
            &format!("'ln -sfn {target} ~/.ssh/authorized_keys'"),
        ));
        let o = sh(&ssh_cmd("carol", &id, "", "true"));
        assert!(denied(&o), "{target}: {o:?}");
    }
    sh(&format!("rm -f {host_copy}"));
    tb::stop(&id, true);
}

#[test]
fn the_cli_shows_and_sets_a_projects_keys_over_dbus() {
    let id = project_for("alice");
    let bob = key("bob");
    // --set FILE: authorized_keys format, comments and blank lines skipped
    ok(&format!(
        "printf '# team\\n\\n{bob}\\n' > /tmp/e2e-keys && cocalc-project-host authorized-keys {id} --set /tmp/e2e-keys"
    ));
    assert_eq!(
        ok(&format!("cocalc-project-host authorized-keys {id}")),
        bob
    );
    assert_eq!(ok(&ssh_cmd("bob", &id, "", "'id -u'")), "1000");
    let o = sh(&ssh_cmd("alice", &id, "", "true"));
    assert_eq!(o.code, 255, "alice's key was replaced: {o:?}");
    // a bad key: exit 2 (usage), the stored keys unchanged
    let o = sh(&format!(
        "echo 'ssh-ed25519 AAAA' | cocalc-project-host authorized-keys {id} --set -"
    ));
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("keys[0]"), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&ok(&format!(
        "cocalc-project-host authorized-keys {id} --json"
    )))
    .unwrap();
    assert_eq!(v, json!({ "keys": [bob] }));
    sh("rm -f /tmp/e2e-keys");
    tb::stop(&id, true);
}

#[test]
fn with_autostart_a_login_starts_a_stopped_project_and_an_unknown_one_stays_unknown() {
    let id = project_for("carol");
    tb::stop(&id, false);
    let _autostart = tb::DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-ssh-autostart.toml",
        "[ssh]\nautostart = true\n",
    );
    known_hosts();
    // the login starts the project and runs in it
    assert_eq!(ok(&ssh_cmd("carol", &id, "", "'id -u'")), "1000");
    assert_eq!(tb::status(&id)["state"], "running");
    // a project this host does not know is refused, not created
    let unknown = tb::new_id();
    let o = sh(&ssh_cmd("carol", &unknown, "", "'echo in'"));
    assert_ne!(o.code, 0, "{o:?}");
    assert_eq!(tb::status(&unknown)["state"], "opened", "not created");
    let (_, list) = http("GET", "/projects", None);
    assert!(!list.to_string().contains(&unknown), "{list}");
    tb::stop(&id, false);
}
