//! Moving a project between two testbed machines (docs/moves.md). The test boots a second
//! machine (`<TESTBED_NAME>-peer`, torn down by a guard even when the test fails) with the same
//! .deb, joins the two with a veth pair inside their own network namespaces (10.213.0.1/30 and
//! .2), exposes the peer's API on its veth address, and trusts one test master key on both. The
//! tests that are not about TLS move over plain HTTP (`moves.allow_http` on the source); the
//! TLS one gives the peer a certificate the test makes (openssl) and moves over https.
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::tb::{self, DropIn, http, new_id, ok, sh};

const MASTER_DROP_IN: &str = "/etc/cocalc-project-host/config.d/90-e2e-moves.toml";
const MOVES_DROP_IN: &str = "/etc/cocalc-project-host/config.d/91-e2e-moves-timeouts.toml";
const SNAPSHOT_TIMER: &str = "cocalc-project-host-snapshots.timer";
const STORAGE_DROP_IN: &str = "/etc/cocalc-project-host/config.d/05-e2e-moves-storage.toml";

/// Makes sure the machine's project storage is up: when the default 20G image does not fit the
/// build host's free space (a shared machine), a 3G one (the test needs ~1G).
fn storage_up() -> String {
    format!(
        "findmnt -n {s} >/dev/null || {{ printf '[storage]\\nimage_size = \"3G\"\\n' > {STORAGE_DROP_IN} && systemctl restart cocalc-project-host-storage.service && systemctl restart cocalc-project-host.service; }}; findmnt -n {s} >/dev/null",
        s = tb::STORAGE
    )
}
const TARGET: &str = "http://10.213.0.2:9002";
const TLS_TARGET: &str = "https://10.213.0.2:9002";
const TLS_DROP_IN: &str = "/etc/cocalc-project-host/config.d/92-e2e-moves-tls.toml";

fn script() -> String {
    format!("{}/tests/testbed/testbed.sh", env!("CARGO_MANIFEST_DIR"))
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} must be set (the testbed's env)"))
}

/// The second machine, down again when dropped.
struct Peer {
    name: String,
    dir: String,
}

impl Peer {
    fn cmd(&self) -> Command {
        let mut c = Command::new(script());
        c.env("TESTBED_NAME", &self.name)
            .env("TESTBED_DIR", &self.dir);
        c
    }

    /// Boots the peer with the .deb the main machine got, and links the two.
    fn up() -> Peer {
        let p = Peer {
            name: format!("{}-peer", env("TESTBED_NAME")),
            dir: format!("{}-peer", env("TESTBED_DIR")),
        };
        // a leftover of an earlier failed run
        let _ = p.cmd().arg("down").output();
        let o = p.cmd().arg("up").output().expect("testbed up");
        assert!(
            o.status.success(),
            "peer up: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let deb = std::env::var("COCALC_DEB")
            .unwrap_or_else(|_| format!("{}/run/xchg/cocalc-project-host.deb", env("TESTBED_DIR")));
        let o = p
            .cmd()
            .args(["push", &deb, "/xchg/cocalc-project-host.deb"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "push deb: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        p.ok("dpkg -i /xchg/cocalc-project-host.deb >/dev/null");
        p.ok(&storage_up());
        ok(&storage_up());
        // the rolling-snapshot timer (every 15 min) would add an `auto-…` snapshot to the
        // moving project on either side mid-test: paused on both while a peer lives
        ok(&format!("systemctl stop {SNAPSHOT_TIMER}"));
        p.ok(&format!("systemctl stop {SNAPSHOT_TIMER}"));
        // the veth pair, created in the two machines' own network namespaces
        let leader = |c: &mut Command| {
            String::from_utf8(c.arg("leader").output().unwrap().stdout)
                .unwrap()
                .trim()
                .to_string()
        };
        let a = leader(&mut Command::new(script()));
        let b = leader(&mut p.cmd());
        // a leftover of an earlier failed run (its peer end gone with the old peer or not)
        sh("ip link del mvsrc 2>/dev/null");
        let o = Command::new("ip")
            .args([
                "link", "add", "mvsrc", "netns", &a, "type", "veth", "peer", "name", "mvdst",
                "netns", &b,
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "veth: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ok("ip addr add 10.213.0.1/30 dev mvsrc && ip link set mvsrc up");
        p.ok("ip addr add 10.213.0.2/30 dev mvdst && ip link set mvdst up");
        // the peer's API also on its veth address (10.213.0.2): on every address of its own
        // network namespace (loopback and the veth only)
        p.ok(
            "mkdir -p /etc/systemd/system/cocalc-project-host.socket.d && printf '[Socket]\\nListenStream=\\nListenStream=0.0.0.0:9002\\n' > /etc/systemd/system/cocalc-project-host.socket.d/90-e2e-moves.conf && systemctl daemon-reload && systemctl stop cocalc-project-host.service cocalc-project-host.socket && systemctl start cocalc-project-host.socket cocalc-project-host.service",
        );
        p
    }

    fn sh(&self, cmd: &str) -> tb::Out {
        let o = self
            .cmd()
            .args(["exec", "bash", "-c", cmd])
            .output()
            .expect("peer exec");
        tb::Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self, cmd: &str) -> String {
        let o = self.sh(cmd);
        assert_eq!(o.code, 0, "peer: `{cmd}` failed:\n{}{}", o.stdout, o.stderr);
        o.stdout.trim().to_string()
    }

    /// An HTTP call to the peer's API from inside it (admin token unless `bearer`).
    #[track_caller]
    fn http(&self, method: &str, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let auth = match bearer {
            Some(t) => format!("-H 'Authorization: Bearer {t}'"),
            None => tb::AUTH.to_string(),
        };
        let out = self.ok(&format!(
            "curl -sS -m 60 {auth} -o /tmp/b.$$ -w '%{{http_code}}' -X {method} 'http://127.0.0.1:9002{path}'; echo; cat /tmp/b.$$; rm -f /tmp/b.$$"
        ));
        let (s, rest) = out.split_once('\n').unwrap_or((&out, ""));
        (
            s.parse().unwrap(),
            serde_json::from_str(rest).unwrap_or(Value::Null),
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.cmd().arg("down").output();
        // the storage stays mounted; the drop-in, if it was needed, goes
        sh(&format!("rm -f {STORAGE_DROP_IN}"));
        sh(&format!("systemctl start {SNAPSHOT_TIMER}"));
    }
}

/// One master key trusted by both machines while this lives.
struct Master {
    seed: [u8; 32],
}

impl Master {
    /// The key, and plain-HTTP moves allowed (the tests not about TLS).
    fn install(peer: &Peer) -> Master {
        Master::install_with(peer, true)
    }

    fn install_with(peer: &Peer, allow_http: bool) -> Master {
        let (seed, b64) = tb::master_key();
        let cmd = format!(
            "printf '[auth]\\nmaster_public_keys = [\"{b64}\"]\\nmax_token_lifetime = 3600\\n[moves]\\nallow_http = {allow_http}\\n' > {MASTER_DROP_IN} && systemctl restart cocalc-project-host.service"
        );
        ok(&cmd);
        peer.ok(&cmd);
        Master { seed }
    }

    fn token(&self, aud: &str, project: &str, actions: &[&str]) -> String {
        let now = cocalc_project_host::auth::now_secs();
        cocalc_project_host::auth::sign(
            &self.seed,
            &json!({"aud": aud, "sub": "e2e-master", "iat": now, "exp": now + 600,
                    "scope": {"projects": [project], "actions": actions}}),
        )
        .unwrap()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {MASTER_DROP_IN}; systemctl restart cocalc-project-host.service"
        ));
    }
}

fn peer_host_id(peer: &Peer) -> String {
    let (s, v) = peer.http("GET", &format!("/projects/{}/status", new_id()), None);
    assert_eq!(s, 200, "{v}");
    v["server"].as_str().unwrap().to_string()
}

/// sha256 of every file of the home (but the snapshots' mount point), with owner names as the
/// container sees them.
fn inventory(run: impl Fn(&str) -> String, id: &str) -> String {
    run(&format!(
        "podman exec project-{id} sh -c 'cd /home/user && find . -path ./.snapshots -prune -o -type f -print | sort | while read f; do echo \"$(sha256sum \"$f\" | cut -c1-64) $(stat -c %U:%G \"$f\") $f\"; done'"
    ))
}

fn wait_op(op: &str, until: &[&str]) -> Value {
    tb::wait_for(&format!("operation {op} in {until:?}"), 120, || {
        let (s, v) = http("GET", &format!("/operations/{op}"), None);
        assert_eq!(s, 200, "{v}");
        until
            .contains(&v["phase"].as_str().unwrap_or_default())
            .then_some(v)
    })
}

/// A running project with a 1 GB quota, three snapshots and 200 MB in its home; (its
/// inventory, its snapshots' listing).
fn populate(id: &str) -> (String, String) {
    tb::start(id, Some(r#"{"disk": 1000000000}"#));
    let exec = |c: &str| ok(&format!("podman exec project-{id} sh -c '{c}'"));
    // 200 MB over three snapshots and the live state
    exec(
        "dd if=/dev/urandom of=/home/user/big bs=1M count=100 2>/dev/null && mkdir -p /home/user/d && echo one > /home/user/d/f",
    );
    let snap = |n: &str| {
        let (s, v) = http(
            "POST",
            &format!("/projects/{id}/snapshots"),
            Some(&format!("{{\"name\":\"{n}\"}}")),
        );
        assert_eq!(s, 201, "{v}");
    };
    snap("s1");
    exec(
        "dd if=/dev/urandom of=/home/user/big2 bs=1M count=50 2>/dev/null && echo two > /home/user/d/f",
    );
    snap("s2");
    exec("dd if=/dev/urandom of=/home/user/big3 bs=1M count=50 2>/dev/null && rm /home/user/big2");
    snap("s3");
    exec("echo live > /home/user/d/f && echo new > /home/user/d/g");
    (
        inventory(ok, id),
        ok(&format!("ls {}/.snapshots/project-{id}", tb::STORAGE)),
    )
}

/// The project lives on the peer only: running there with the same files, owners, snapshots
/// and quota; nothing left on the source.
fn moved_whole(peer: &Peer, id: &str, before: &str, snaps_before: &str) {
    let (s, st) = peer.http("GET", &format!("/projects/{id}/status"), None);
    assert_eq!((s, st["state"].as_str()), (200, Some("running")), "{st}");
    assert_eq!(inventory(|c| peer.ok(c), id), before);
    assert_eq!(
        peer.ok(&format!("ls {}/.snapshots/project-{id}", tb::STORAGE)),
        snaps_before
    );
    let (s, cfg) = peer.http("GET", &format!("/projects/{id}/config"), None);
    assert_eq!(s, 200, "{cfg}");
    assert_eq!(cfg["config"]["disk"], 1000000000, "{cfg}");
    let qg = peer.ok(&format!(
        "btrfs qgroup show --raw -re -f {}/project-{id} | tail -1",
        tb::STORAGE
    ));
    assert_eq!(
        qg.split_whitespace().nth(3),
        Some("1000000000"),
        "quota on the target: {qg}"
    );
    // nothing of the move is left on the target but the used ids and the done records
    assert_eq!(
        peer.ok(&format!(
            "cd {}/.moves && ls -A | grep -v '^used$' | grep -v '[.]json$' || true",
            tb::STORAGE
        )),
        ""
    );
    // the source has nothing left
    for p in [
        format!("{}/project-{id}", tb::STORAGE),
        format!("{}/.snapshots/project-{id}", tb::STORAGE),
    ] {
        assert_eq!(
            ok(&format!("test -e {p} && echo yes || echo no")),
            "no",
            "{p}"
        );
    }
    let (s, list) = http("GET", "/projects", None);
    assert_eq!(s, 200);
    assert!(!list.to_string().contains(id), "{list}");
}

#[test]
fn a_running_project_with_snapshots_moves_cancel_leaves_it_whole_and_a_retry_completes() {
    let peer = Peer::up();
    let master = Master::install(&peer);
    let target_id = peer_host_id(&peer);
    let id = new_id();
    let (before, snaps_before) = populate(&id);

    // a wrong audience (the source's own id): refused by the target; through the CLI (D-Bus
    // MoveProjectWith/GetOperation), which says so and exits non-zero
    let o = tb::sh(&format!(
        "COCALC_MOVE_TOKEN='{}' cocalc-project-host move {id} --to {TARGET}",
        master.token(&tb::host_id(), &id, &["move"])
    ));
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("failed") && o.stderr.contains("401"),
        "{}",
        o.stderr
    );
    // no token at all: a usage error
    let o = tb::sh(&format!("cocalc-project-host move {id} --to {TARGET}"));
    assert_eq!(o.code, 2, "{}{}", o.stdout, o.stderr);
    tb::wait_for("the project running again", 60, || {
        (tb::status(&id)["state"] == "running").then_some(())
    });

    // cancel midway: the source keeps everything and runs again; the target keeps nothing
    let token = master.token(&target_id, &id, &["move"]);
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/move"),
        Some(&json!({"target": TARGET, "token": token, "start": true}).to_string()),
    );
    assert_eq!(s, 202, "{v}");
    let op = v["op"].as_str().unwrap().to_string();
    tb::wait_for("bytes sent", 60, || {
        let (_, v) = http("GET", &format!("/operations/{op}"), None);
        (v["bytes_sent"].as_u64().unwrap_or(0) > 0
            || v["phase"] == "failed"
            || v["phase"] == "done")
            .then_some(())
    });
    let (s, v) = http("DELETE", &format!("/operations/{op}"), None);
    assert_eq!(s, 200, "{v}");
    let v = wait_op(&op, &["failed", "done"]);
    assert_eq!(v["phase"], "failed", "cancelled midway: {v}");
    assert_eq!(v["resumable"], false, "a cancel ends the move: {v}");
    tb::wait_for("the project running again", 60, || {
        (tb::status(&id)["state"] == "running").then_some(())
    });
    assert_eq!(inventory(ok, &id), before, "the source is intact");
    tb::wait_for("the target's staging area cleaned", 30, || {
        peer.ok(&format!(
            "ls -A {}/.moves | grep -v '^used$' || true",
            tb::STORAGE
        ))
        .is_empty()
        .then_some(())
    });
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/project-{id} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );

    // the retry (a new move) completes
    let t0 = std::time::Instant::now();
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/move"),
        Some(&json!({"target": TARGET, "token": token, "start": true}).to_string()),
    );
    assert_eq!(s, 202, "{v}");
    let v = wait_op(v["op"].as_str().unwrap(), &["failed", "done"]);
    assert_eq!(v["phase"], "done", "{v}");
    eprintln!(
        "move of a 200 MB project with 3 snapshots: {:?} total, {} bytes ({} after the stop), downtime {} ms",
        t0.elapsed(),
        v["bytes_sent"],
        v["final_bytes"],
        v["downtime_ms"]
    );
    // the pre-copy: the bulk went while it ran; the stop sent a small delta only
    assert!(
        v["final_bytes"].as_u64().unwrap() < 10 << 20,
        "the final delta is small: {v}"
    );
    moved_whole(&peer, &id, &before, &snaps_before);
    drop(master);
    drop(peer);
}

#[test]
fn a_connection_killed_midway_leaves_the_source_running_and_the_move_resumes() {
    let peer = Peer::up();
    let master = Master::install(&peer);
    let target_id = peer_host_id(&peer);
    let id = new_id();
    let (before, snaps_before) = populate(&id);
    let token = master.token(&target_id, &id, &["move"]);
    let body = json!({"target": TARGET, "token": token, "start": true}).to_string();
    let (s, v) = http("POST", &format!("/projects/{id}/move"), Some(&body));
    assert_eq!(s, 202, "{v}");
    let op = v["op"].as_str().unwrap().to_string();
    let moves = format!("{}/.moves", tb::STORAGE);
    // the target dies (SIGKILL: its connections reset) once s1 was received whole and the next
    // stream is being spooled (a spool newer than the record: on the wire, not between streams,
    // where the socket-activated daemon would come back before the next connection)
    peer.ok(&format!(
        "for i in $(seq 1500); do grep -q '\"s1\"' {moves}/{op}.json 2>/dev/null && [ {moves}/{op}.stream -nt {moves}/{op}.json ] && break; sleep 0.02; done; systemctl kill -s KILL cocalc-project-host.service"
    ));
    let v = wait_op(&op, &["failed", "done"]);
    assert_eq!(v["phase"], "failed", "killed midway: {v}");
    assert_eq!(v["resumable"], true, "{v}");
    // the source: intact, and it never stopped running
    assert_eq!(tb::status(&id)["state"], "running");
    assert_eq!(inventory(ok, &id), before, "the source is intact");
    assert_eq!(
        ok(&format!("ls {}/.snapshots/project-{id}", tb::STORAGE)),
        snaps_before
    );
    // the target, started again (socket activation): no spool, and its staging area holds only
    // what its record says it received whole, each a read-only subvolume
    peer_host_id(&peer);
    let record: Value = serde_json::from_str(&peer.ok(&format!("cat {moves}/{op}.json"))).unwrap();
    let received: Vec<String> = record["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(received.contains(&"s1".to_string()), "{record}");
    assert!(
        !received.iter().any(|r| r.starts_with(".move-")),
        "killed before the live state: {record}"
    );
    assert_eq!(
        peer.ok(&format!("ls {moves} | grep -c '[.]stream$' || true")),
        "0"
    );
    let staged = peer.ok(&format!("ls -A {moves}/{op}"));
    let mut staged: Vec<&str> = staged.lines().collect();
    staged.sort_unstable();
    let mut want: Vec<&str> = received.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(staged, want, "only whole, recorded subvolumes stay staged");
    for r in &received {
        assert_eq!(
            peer.ok(&format!("btrfs property get -ts {moves}/{op}/{r} ro")),
            "ro=true"
        );
    }
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/project-{id} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    // the retry (the CLI, not on a terminal: a line per phase) resumes the same move: what
    // the target holds is not sent again
    let o = tb::sh(&format!(
        "COCALC_MOVE_TOKEN='{token}' cocalc-project-host move {id} --to {TARGET}"
    ));
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains(&format!("move {op}")),
        "the same move, resumed: {}",
        o.stderr
    );
    assert!(
        o.stderr.contains("precopy") && o.stderr.contains("done"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("moved to"), "{}", o.stdout);
    let v = wait_op(&op, &["failed", "done"]);
    assert_eq!(v["phase"], "done", "{v}");
    let skipped: Vec<String> = serde_json::from_value(v["skipped"].clone()).unwrap();
    let sent: Vec<String> = serde_json::from_value(v["sent"].clone()).unwrap();
    assert_eq!(skipped, received, "{v}");
    assert!(!sent.iter().any(|s| received.contains(s)), "resent: {v}");
    eprintln!(
        "resumed move: {} held by the target, sent {sent:?}, {} bytes, downtime {} ms",
        skipped.len(),
        v["bytes_sent"],
        v["downtime_ms"]
    );
    moved_whole(&peer, &id, &before, &snaps_before);
    drop(master);
    drop(peer);
}

#[test]
fn a_network_cut_midway_stalls_the_move_the_source_keeps_running_and_it_resumes() {
    let peer = Peer::up();
    let master = Master::install(&peer);
    // short watchdogs: the source gives a stalled stream up after 4s, the target after 6s
    let _stall = DropIn::install(MOVES_DROP_IN, "[moves]\nstall_timeout = \"4s\"\n");
    peer.ok(&format!(
        "printf '[moves]\\nreceive_idle = \"6s\"\\n' > {MOVES_DROP_IN} && systemctl restart cocalc-project-host.service"
    ));
    let target_id = peer_host_id(&peer);
    let id = new_id();
    let (before, snaps_before) = populate(&id);
    let token = master.token(&target_id, &id, &["move"]);
    let body = json!({"target": TARGET, "token": token, "start": true}).to_string();
    let (s, v) = http("POST", &format!("/projects/{id}/move"), Some(&body));
    assert_eq!(s, 202, "{v}");
    let op = v["op"].as_str().unwrap().to_string();
    let moves = format!("{}/.moves", tb::STORAGE);
    // the link between the machines goes down (the daemons keep running) once s1 was received
    // whole and the next stream is being spooled (a spool newer than the record)
    let t0 = std::time::Instant::now();
    peer.ok(&format!(
        "for i in $(seq 1500); do grep -q '\"s1\"' {moves}/{op}.json 2>/dev/null && [ {moves}/{op}.stream -nt {moves}/{op}.json ] && break; sleep 0.02; done; ip link set mvdst down"
    ));
    let v = wait_op(&op, &["failed", "done"]);
    let failed_after = t0.elapsed();
    assert_eq!(v["phase"], "failed", "cut midway: {v}");
    assert_eq!(v["resumable"], true, "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    // the stall watchdog (bytes stuck on the wire) or the kernel's TCP user timeout / keepalive
    // (unacknowledged data or probes for stall_timeout: "timed out", or "no route to host" once
    // the neighbour is unreachable), whichever comes first
    assert!(
        err.contains("stalled") || err.contains("connection to 10.213.0.2:9002 broke"),
        "a clear error: {v}"
    );
    assert!(
        failed_after >= std::time::Duration::from_secs(3),
        "failed after {failed_after:?}, before the stall timeout: {v}"
    );
    eprintln!("network cut: the move failed after {failed_after:?}: {err}");
    // the source: intact, and it never stopped running
    assert_eq!(tb::status(&id)["state"], "running");
    assert_eq!(inventory(ok, &id), before, "the source is intact");
    assert_eq!(
        ok(&format!("ls {}/.snapshots/project-{id}", tb::STORAGE)),
        snaps_before
    );
    // the target gives the broken stream up after receive_idle: no spool; what it received
    // whole stays staged (the move is resumable), nothing is placed
    tb::wait_for("the target's spool deleted", 30, || {
        (peer.ok(&format!("ls {moves} | grep -c '[.]stream$' || true")) == "0").then_some(())
    });
    let record: Value = serde_json::from_str(&peer.ok(&format!("cat {moves}/{op}.json"))).unwrap();
    let received: Vec<String> = serde_json::from_value(record["received"].clone()).unwrap();
    assert!(received.contains(&"s1".to_string()), "{record}");
    let staged = peer.ok(&format!("ls -A {moves}/{op}"));
    let mut staged: Vec<&str> = staged.lines().collect();
    staged.sort_unstable();
    let mut want: Vec<&str> = received.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(staged, want, "only whole, recorded subvolumes stay staged");
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/project-{id} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    // the link back: the same move resumes and completes
    peer.ok("ip link set mvdst up");
    let (s, v) = http("POST", &format!("/projects/{id}/move"), Some(&body));
    assert_eq!(
        (s, v["op"].as_str()),
        (202, Some(op.as_str())),
        "resumed: {v}"
    );
    let v = wait_op(&op, &["failed", "done"]);
    assert_eq!(v["phase"], "done", "{v}");
    let skipped: Vec<String> = serde_json::from_value(v["skipped"].clone()).unwrap();
    assert_eq!(skipped, received, "{v}");
    moved_whole(&peer, &id, &before, &snaps_before);
    drop(master);
    drop(peer);
}

#[test]
fn the_target_refuses_bad_tokens_tampered_and_unexpected_streams_and_places_nothing() {
    let peer = Peer::up();
    let master = Master::install(&peer);
    let target_id = peer_host_id(&peer);
    let id = new_id();
    let mv = uuid::Uuid::new_v4().to_string();
    let path = format!("/projects/{id}/receive/{mv}");
    // wrong audience → 401, no `move` action → 403, another project → 403
    let (s, v) = peer.http(
        "POST",
        &path,
        Some(&master.token("another-host", &id, &["move"])),
    );
    assert_eq!((s, v["code"].as_str()), (401, Some("invalid_token")), "{v}");
    let (s, v) = peer.http(
        "POST",
        &path,
        Some(&master.token(&target_id, &id, &["start"])),
    );
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = peer.http(
        "POST",
        &path,
        Some(&master.token(&target_id, &new_id(), &["move"])),
    );
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");

    // a stream made in the peer: a real btrfs send of one subvolume (named `name`), maybe plus
    // an extra subvolume; `manifest` as the source would write it
    let token = master.token(&target_id, &id, &["move"]);
    // the manifest announces the sent subvolume's UUID (as `btrfs send` writes it) unless it
    // names one itself; the UUID is returned
    let craft = |mv: &str, name: &str, extra: bool, tamper: bool, manifest: Value| -> String {
        let w = format!("{}/.e2e-craft", tb::STORAGE);
        let uuid = peer.ok(&format!(
            "rm -rf {w}; mkdir -p {w} && btrfs -q subvolume create {w}/src && echo x > {w}/src/f \
             && btrfs -q subvolume snapshot -r {w}/src {w}/{name} && btrfs -q subvolume snapshot -r {w}/src {w}/extra \
             && btrfs filesystem sync {w} && btrfs send -q {w}/{name} | cat > /tmp/s1 && {{ if [ {extra} = true ]; then btrfs send -q {w}/extra | cat >> /tmp/s1; fi; }} \
             && btrfs subvolume show {w}/{name} | awk '$1 == \"UUID:\" {{print $2; exit}}' \
             && btrfs -q subvolume delete {w}/src {w}/{name} {w}/extra && rm -rf {w}"
        ));
        let mut manifest = manifest;
        manifest["move_id"] = json!(mv);
        manifest["project_id"] = json!(id);
        manifest["config"] = json!({});
        if manifest.get("uuid").is_none() {
            manifest["uuid"] = json!(uuid);
        }
        let manifest = manifest.to_string();
        let py = format!(
            "import hmac,hashlib,sys\nd=b'{manifest}\\n'+open('/tmp/s1','rb').read()\nm=hmac.new(sys.argv[1].encode(),d,hashlib.sha256).digest()\nif {}: d=d[:-1]+bytes([d[-1]^1])\nopen('/tmp/body-{mv}','wb').write(d+m)\n",
            if tamper { "True" } else { "False" }
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(py);
        peer.ok(&format!(
            "echo {b64} | base64 -d > /tmp/mk.py && python3 /tmp/mk.py '{token}'"
        ));
        uuid
    };
    let post = |mv: &str| -> (u16, Value) {
        let out = peer.ok(&format!(
            "curl -sS -m 60 -H 'Authorization: Bearer {token}' --data-binary @/tmp/body-{mv} -o /tmp/b -w '%{{http_code}}' -X POST 'http://127.0.0.1:9002/projects/{id}/receive/{mv}'; echo; cat /tmp/b"
        ));
        let (s, rest) = out.split_once('\n').unwrap();
        (
            s.parse().unwrap(),
            serde_json::from_str(rest).unwrap_or(Value::Null),
        )
    };
    // a final stream: the live state as its one subvolume, no snapshots
    let send = |mv: &str, last: Value, extra: bool, tamper: bool| -> (u16, Value) {
        let name = format!(".move-{mv}-1");
        craft(
            mv,
            &name,
            extra,
            tamper,
            json!({"seq": 1, "name": name, "last": last}),
        );
        post(mv)
    };
    let nothing_placed = || {
        assert_eq!(
            peer.ok(&format!(
                "test -e {}/project-{id} && echo yes || echo no",
                tb::STORAGE
            )),
            "no"
        );
        // no spool and no staged subvolume (records of refused moves hold nothing)
        assert_eq!(
            peer.ok(&format!(
                "cd {}/.moves && ls -A | grep -v '^used$' | grep -v '[.]json$' | while read d; do ls -A $d; [ -d $d ] || echo $d; done",
                tb::STORAGE
            )),
            ""
        );
        let (_, list) = peer.http("GET", "/projects", None);
        assert!(!list.to_string().contains(&id), "{list}");
    };
    // a stream refused with 409 move_rejected, its error naming `why` ("" for any reason)
    let rejected = |(s, v): (u16, Value), why: &str| {
        assert_eq!(
            (s, v["code"].as_str()),
            (409, Some("move_rejected")),
            "{why}: {v}"
        );
        assert!(
            v["error"].as_str().unwrap_or("").contains(why),
            "{why}: {v}"
        );
    };
    // tampered (one bit of the stream flipped) → refused before btrfs sees it
    rejected(send(&mv, json!([]), false, true), "MAC");
    nothing_placed();
    // an extra subvolume → refused, all of it deleted
    let mv2 = uuid::Uuid::new_v4().to_string();
    rejected(send(&mv2, json!([]), true, false), "extra");
    nothing_placed();
    // names that are paths out of the staging area → refused
    let mv3 = uuid::Uuid::new_v4().to_string();
    rejected(send(&mv3, json!(["../../escape"]), false, false), "");
    nothing_placed();
    let mv3b = uuid::Uuid::new_v4().to_string();
    craft(
        &mv3b,
        "escape",
        false,
        false,
        json!({"seq": 1, "name": "../../escape"}),
    );
    rejected(post(&mv3b), "");
    nothing_placed();
    assert_eq!(
        peer.ok(&format!("ls {} | grep -c escape || true", tb::STORAGE)),
        "0"
    );
    // a pre-copy stream (not the final one) is kept staged; replaying it, or another stream
    // with a number not above it, is refused; a cancel deletes it and ends the move there
    let mv5 = uuid::Uuid::new_v4().to_string();
    let snap1_uuid = craft(
        &mv5,
        "snap1",
        false,
        false,
        json!({"seq": 2, "name": "snap1"}),
    );
    let (s, v) = post(&mv5);
    assert_eq!((s, v["placed"].as_bool()), (200, Some(false)), "{v}");
    assert_eq!(
        peer.ok(&format!("ls -A {}/.moves/{mv5}", tb::STORAGE)),
        "snap1"
    );
    rejected(post(&mv5), ""); // replay
    craft(
        &mv5,
        "snap0",
        false,
        false,
        json!({"seq": 1, "name": "snap0"}),
    );
    rejected(post(&mv5), "in order");
    let (s, v) = peer.http(
        "GET",
        &format!("/projects/{id}/receive/{mv5}"),
        Some(&token),
    );
    assert_eq!((s, v["last_seq"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(v["received"], json!(["snap1"]), "{v}");
    let (s, v) = peer.http(
        "DELETE",
        &format!("/projects/{id}/receive/{mv5}"),
        Some(&token),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/.moves/{mv5} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    craft(
        &mv5,
        "snap2",
        false,
        false,
        json!({"seq": 3, "name": "snap2", "parent": "snap1", "parent_uuid": snap1_uuid}),
    );
    rejected(post(&mv5), ""); // after cancel
    nothing_placed();
    // what `btrfs receive` made must be the announced UUID chain: a valid stream of an
    // unrelated subvolume under the announced name → refused, nothing placed
    let mv6 = uuid::Uuid::new_v4().to_string();
    let live6 = format!(".move-{mv6}-1");
    craft(
        &mv6,
        &live6,
        false,
        false,
        json!({"seq": 1, "name": live6, "last": [], "uuid": uuid::Uuid::new_v4().to_string()}),
    );
    rejected(post(&mv6), "not the announced subvolume");
    nothing_placed();
    // announced incremental to a staged snapshot but received whole (not against it) →
    // refused; what the move received before stays staged
    let mv7 = uuid::Uuid::new_v4().to_string();
    let a = craft(
        &mv7,
        "snap1",
        false,
        false,
        json!({"seq": 1, "name": "snap1"}),
    );
    let (s, v) = post(&mv7);
    assert_eq!((s, v["placed"].as_bool()), (200, Some(false)), "{v}");
    craft(
        &mv7,
        "snap2",
        false,
        false,
        json!({"seq": 2, "name": "snap2", "parent": "snap1", "parent_uuid": a}),
    );
    rejected(post(&mv7), "not received against");
    let staged7 = || peer.ok(&format!("ls -A {}/.moves/{mv7}", tb::STORAGE));
    assert_eq!(staged7(), "snap1");
    // a parent announced with another UUID than the staged one's → refused
    craft(
        &mv7,
        "snap3",
        false,
        false,
        json!({"seq": 3, "name": "snap3", "parent": "snap1", "parent_uuid": uuid::Uuid::new_v4().to_string()}),
    );
    rejected(post(&mv7), "parent \"snap1\" held here");
    assert_eq!(staged7(), "snap1");
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/project-{id} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    // moves never resumed nor cancelled (mv7's staged snapshot, the records of the refused
    // ones) expire after moves.staging_ttl idle (3s here); their ids stay taken
    peer.ok(&format!(
        "printf '[moves]\\nstaging_ttl = \"3s\"\\n' > {MOVES_DROP_IN} && systemctl restart cocalc-project-host.service"
    ));
    tb::wait_for("the unfinished moves expired on the target", 30, || {
        (peer.ok(&format!("ls -A {}/.moves", tb::STORAGE)) == "used").then_some(())
    });
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/.moves/used/{mv7} && echo yes || echo no",
            tb::STORAGE
        )),
        "yes"
    );
    rejected(post(&mv7), "received before");
    nothing_placed();
    // and the same intact stream under a fresh id is placed (the checks refuse only what is
    // wrong); replayed, it is refused
    let mv4 = uuid::Uuid::new_v4().to_string();
    let (s, v) = send(&mv4, json!([]), false, false);
    assert_eq!(s, 200, "{v}");
    assert_eq!(peer.ok(&format!("cat {}/project-{id}/f", tb::STORAGE)), "x");
    rejected(post(&mv4), ""); // replay
    drop(master);
    drop(peer);
}

/// Gives the peer's API TLS (`http.tls_cert`/`tls_key`) with a certificate for 10.213.0.2
/// issued by a CA the test makes (openssl, EC P-256); (the CA's PEM, the SHA-256 pin of the
/// peer's certificate).
fn peer_tls(peer: &Peer) -> (String, String) {
    let d = "/etc/cocalc-project-host";
    // half a pair, or files that are not there: a clear error, never plain HTTP instead
    let o = peer.sh(&format!(
        "printf '[http]\\ntls_cert = \"{d}/e2e-api.crt\"\\n' > {TLS_DROP_IN} && cocalc-project-host check-config"
    ));
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(
        o.stderr.contains(TLS_DROP_IN) && o.stderr.contains("http.tls_key"),
        "{}",
        o.stderr
    );
    let o = peer.sh(&format!(
        "printf '[http]\\ntls_cert = \"{d}/e2e-api.crt\"\\ntls_key = \"{d}/e2e-api.key\"\\n' > {TLS_DROP_IN} && systemctl restart cocalc-project-host.service"
    ));
    assert_ne!(
        o.code, 0,
        "the daemon must not start without its certificate"
    );
    assert!(
        peer.ok("journalctl -u cocalc-project-host.service -n 30 --no-pager")
            .contains(&format!("http.tls_cert/http.tls_key: {d}/e2e-api.crt")),
        "the journal says why"
    );
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    peer.ok(&format!(
        "cd {d} && openssl req -x509 {ec} -keyout e2e-ca.key -out e2e-ca.crt -days 2 -subj /CN=e2e-moves-ca 2>/dev/null \
         && openssl req {ec} -keyout e2e-api.key -out e2e-api.csr -subj /CN=10.213.0.2 2>/dev/null \
         && printf 'subjectAltName=IP:10.213.0.2\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > e2e-ext.cnf \
         && openssl x509 -req -in e2e-api.csr -CA e2e-ca.crt -CAkey e2e-ca.key -CAcreateserial -out e2e-api.crt -days 2 -extfile e2e-ext.cnf 2>/dev/null \
         && printf '[http]\\ntls_cert = \"{d}/e2e-api.crt\"\\ntls_key = \"{d}/e2e-api.key\"\\n' > {TLS_DROP_IN} \
         && systemctl restart cocalc-project-host.service"
    ));
    let ca = peer.ok(&format!("cat {d}/e2e-ca.crt"));
    let pin = peer.ok(&format!(
        "openssl x509 -in {d}/e2e-api.crt -outform der | sha256sum | cut -c1-64"
    ));
    assert_eq!(pin.len(), 64, "{pin}");
    (ca, pin)
}

/// Nothing of a move reached the peer: no project, nothing under its moves directory but the
/// used ids.
fn nothing_on_peer(peer: &Peer, id: &str) {
    assert_eq!(
        peer.ok(&format!(
            "test -e {}/project-{id} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    assert_eq!(
        peer.ok(&format!(
            "ls -A {}/.moves 2>/dev/null | grep -v '^used$' || true",
            tb::STORAGE
        )),
        ""
    );
}

#[test]
fn a_move_over_tls_checks_the_targets_certificate_and_plain_http_to_a_remote_target_is_refused() {
    let peer = Peer::up();
    // plain HTTP is not allowed on the source here (the default)
    let master = Master::install_with(&peer, false);
    let (ca, pin) = peer_tls(&peer);
    // the peer's own loopback stays plain (its local tools and this test's peer.http)
    let target_id = peer_host_id(&peer);
    let ca_path = "/etc/cocalc-project-host/e2e-moves-ca.crt";
    let b64 = base64::engine::general_purpose::STANDARD.encode(&ca);
    ok(&format!("echo {b64} | base64 -d > {ca_path}"));
    let _ca_cleanup = CleanUp(format!("rm -f {ca_path}"));

    // a plain-HTTP client on the TLS side gets nothing: no status, no byte of an answer
    let o = tb::sh(
        "curl -sS -m 10 -o /tmp/plain.out -w '%{http_code}' http://10.213.0.2:9002/healthz; echo \" rc=$?\"; cat /tmp/plain.out 2>/dev/null | wc -c; rm -f /tmp/plain.out",
    );
    let out = o.stdout.trim().to_string();
    // closed unanswered, not even a TLS alert: curl's 52 ("Empty reply from server") or, as the
    // request was left unread, 56 ("Connection reset by peer")
    assert!(
        out == "000 rc=52\n0" || out == "000 rc=56\n0",
        "no status, no byte: {out:?} {}",
        o.stderr
    );
    eprintln!(
        "plain HTTP to the TLS side: {out:?}, curl: {}",
        o.stderr.trim()
    );
    // the same over TLS, checked against the test's CA and the address: answered
    assert_eq!(
        ok(&format!(
            "curl -sS -m 10 --cacert {ca_path} -o /dev/null -w '%{{http_code}}' https://10.213.0.2:9002/healthz"
        )),
        "200"
    );

    let id = new_id();
    let (before, snaps_before) = populate(&id);
    let token = master.token(&target_id, &id, &["move"]);
    // http:// to a target that is not loopback, without moves.allow_http: 400, nothing started
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/move"),
        Some(&json!({"target": TARGET, "token": token, "start": true}).to_string()),
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")), "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("clear text") && e.contains("https://") && e.contains("moves.allow_http"),
        "says why and how: {v}"
    );
    let o = tb::sh(&format!(
        "COCALC_MOVE_TOKEN='{token}' cocalc-project-host move {id} --to {TARGET}"
    ));
    assert_eq!(o.code, 2, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("clear text"), "{}", o.stderr);
    // a pin that is not a SHA-256: 400 before any connection
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/move"),
        Some(&json!({"target": TLS_TARGET, "token": token, "pin_sha256": "abcd"}).to_string()),
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")), "{v}");
    assert_eq!(tb::status(&id)["state"], "running");
    nothing_on_peer(&peer, &id);

    // the wrong pin (through the CLI: D-Bus MoveProjectWith): the TLS handshake fails, the move
    // with it; the project runs on here, whole, and nothing reached the target
    let wrong = "0f".repeat(32);
    let o = tb::sh(&format!(
        "COCALC_MOVE_TOKEN='{token}' cocalc-project-host move {id} --to {TLS_TARGET} --pin sha256:{wrong}"
    ));
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("TLS handshake with 10.213.0.2:9002")
            && o.stderr.contains("not the pinned one")
            && o.stderr.contains(&pin),
        "a clear TLS/pin error naming the certificate it got: {}",
        o.stderr
    );
    tb::wait_for("the project running", 60, || {
        (tb::status(&id)["state"] == "running").then_some(())
    });
    assert_eq!(inventory(ok, &id), before, "the source is intact");
    nothing_on_peer(&peer, &id);

    // the right pin (the HTTP body's): the move completes over TLS
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/move"),
        Some(
            &json!({"target": TLS_TARGET, "token": token, "start": true, "pin_sha256": pin})
                .to_string(),
        ),
    );
    assert_eq!(s, 202, "{v}");
    let t0 = std::time::Instant::now();
    let v = wait_op(v["op"].as_str().unwrap(), &["failed", "done"]);
    assert_eq!(v["phase"], "done", "{v}");
    eprintln!(
        "move over TLS of a 200 MB project with 3 snapshots: {:?}, {} bytes, downtime {} ms",
        t0.elapsed(),
        v["bytes_sent"],
        v["downtime_ms"]
    );
    moved_whole(&peer, &id, &before, &snaps_before);

    // no pin: the certificate must chain to moves.ca_file and name the target's address
    let _ca = DropIn::install(TLS_DROP_IN, &format!("[moves]\nca_file = \"{ca_path}\"\n"));
    let id2 = new_id();
    tb::start(&id2, None);
    ok(&format!(
        "podman exec project-{id2} sh -c 'echo via-ca > /home/user/f'"
    ));
    let token2 = master.token(&target_id, &id2, &["move"]);
    let (s, v) = http(
        "POST",
        &format!("/projects/{id2}/move"),
        Some(&json!({"target": TLS_TARGET, "token": token2, "start": true}).to_string()),
    );
    assert_eq!(s, 202, "{v}");
    let v = wait_op(v["op"].as_str().unwrap(), &["failed", "done"]);
    assert_eq!(v["phase"], "done", "{v}");
    assert_eq!(
        peer.ok(&format!("podman exec project-{id2} cat /home/user/f")),
        "via-ca"
    );

    // a renewed certificate is served after SIGHUP, by the same daemon
    let pid = || peer.ok("systemctl show -P MainPID cocalc-project-host.service");
    let pid_before = pid();
    let d = "/etc/cocalc-project-host";
    peer.ok(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout e2e-api.key.new -out e2e-api.crt.new -days 2 -subj /CN=renewed -addext subjectAltName=IP:10.213.0.2 2>/dev/null \
         && mv e2e-api.key.new e2e-api.key && mv e2e-api.crt.new e2e-api.crt \
         && systemctl kill -s HUP cocalc-project-host.service"
    ));
    let renewed = peer.ok(&format!(
        "openssl x509 -in {d}/e2e-api.crt -outform der | sha256sum | cut -c1-64"
    ));
    assert_ne!(renewed, pin);
    tb::wait_for("the renewed certificate served", 20, || {
        let served = ok(
            "openssl s_client -connect 10.213.0.2:9002 </dev/null 2>/dev/null | openssl x509 -outform der | sha256sum | cut -c1-64",
        );
        (served == renewed).then_some(())
    });
    assert_eq!(pid(), pid_before, "reloaded, not restarted");
    drop(master);
    drop(peer);
}

/// Runs a shell command on the machine when dropped.
struct CleanUp(String);

impl Drop for CleanUp {
    fn drop(&mut self) {
        sh(&self.0);
    }
}
