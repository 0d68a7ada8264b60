//! Disk quotas, snapshots, restore, rolling snapshots, scratch and /tmp: real btrfs qgroups and
//! subvolumes under real containers, behind the HTTP API.
use cocalc_project_host::domain::snapshots::{basic_iso, parse_basic_iso};
use serde_json::Value;

use crate::tb::{self, STORAGE, http, new_id, ok, sh, start, status, stop, wait_for};

const MIB: u64 = 1 << 20;

fn exec(id: &str, cmd: &str) -> tb::Out {
    sh(&format!("podman exec project-{id} sh -c '{cmd}'"))
}

fn exec_root(id: &str, cmd: &str) -> tb::Out {
    sh(&format!("podman exec --user 0 project-{id} sh -c '{cmd}'"))
}

fn home(id: &str) -> String {
    format!("{STORAGE}/project-{id}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Stops the snapshot timer while a test drives sweeps with its own clock (a real sweep in the
/// middle would add a snapshot of today); starts it again however the test ends.
struct TimerPaused;

impl TimerPaused {
    fn new() -> TimerPaused {
        ok("systemctl stop cocalc-project-host-snapshots.timer");
        TimerPaused
    }
}

impl Drop for TimerPaused {
    fn drop(&mut self) {
        sh("systemctl start cocalc-project-host-snapshots.timer");
    }
}

/// Names of a project's manual snapshots (the timer may add rolling ones meanwhile).
fn manual_names(id: &str) -> Vec<String> {
    snapshots(id)
        .iter()
        .filter(|s| s["kind"] == "manual")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn main_pid(id: &str) -> Value {
    status(id)["main_pid"].clone()
}

fn set_quota(id: &str, disk: Option<u64>) -> (u16, Value) {
    let body = format!(
        "{{\"disk\":{}}}",
        disk.map_or("null".to_string(), |d| d.to_string())
    );
    http("POST", &format!("/projects/{id}/quota"), Some(&body))
}

fn snapshots(id: &str) -> Vec<Value> {
    let (s, v) = http("GET", &format!("/projects/{id}/snapshots"), None);
    assert_eq!(s, 200, "{v}");
    v["snapshots"].as_array().unwrap().clone()
}

fn snapshot_names(id: &str) -> Vec<String> {
    snapshots(id)
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn sweep(id: &str, now: u64) -> Value {
    let (s, v) = http(
        "POST",
        "/snapshots/sweep",
        Some(&format!("{{\"now\":{now},\"projects\":[\"{id}\"]}}")),
    );
    assert_eq!(s, 200, "{v}");
    v["projects"][0].clone()
}

#[test]
fn quota_is_enforced_inside_and_can_be_raised_live() {
    let (id, other) = (new_id(), new_id());
    let v = start(&id, Some(&format!("{{\"disk\":{}}}", 50 * MIB)));
    assert_eq!(v["disk"]["quota"], 50 * MIB, "{v}");
    start(&other, None);
    let pid = main_pid(&id);

    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/big bs=1M count=80 2>&1; echo rc=$?",
    );
    assert!(
        o.stdout.contains("Disk quota exceeded") && !o.stdout.contains("rc=0"),
        "the 80 MB write must fail with EDQUOT: {}",
        o.stdout
    );
    // nothing else is harmed: another project and the host write on the same filesystem
    let o = exec(
        &other,
        "dd if=/dev/zero of=/home/user/big bs=1M count=80 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("rc=0"), "{}", o.stdout);
    ok(&format!(
        "dd if=/dev/zero of={STORAGE}/host-write-probe bs=1M count=10 2>/dev/null && rm {STORAGE}/host-write-probe"
    ));
    // status (from memory, refreshed every few seconds) shows the home full
    ok("sync");
    let used = wait_for("status to show ~50 MB used", 30, || {
        let u = status(&id)["disk"]["used"].as_u64()?;
        (u > 45 * MIB).then_some(u)
    });
    assert!(used <= 51 * MIB, "used {used} over the quota");
    println!(
        "quota 50 MiB: used {:.1} MiB after the failed write",
        used as f64 / MIB as f64
    );

    // raise it while the project runs: the same write now succeeds, no restart
    let (s, v) = set_quota(&id, Some(200 * MIB));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["disk"]["quota"], 200 * MIB, "{v}");
    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/big2 bs=1M count=80 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("rc=0"), "{}", o.stdout);
    assert_eq!(main_pid(&id), pid, "no restart");
    let q = ok(&format!(
        "btrfs qgroup show --raw -re -f {} | tail -1",
        home(&id)
    ));
    assert!(q.contains(&(200 * MIB).to_string()), "{q}");

    // the raised quota is kept for the next start
    stop(&id, false);
    let v = start(&id, None);
    assert_eq!(v["disk"]["quota"], 200 * MIB, "{v}");
    // lowered below what is used: the project is over quota at once, writes fail, it can
    // still delete, and then write again within the new limit
    let (s, v) = set_quota(&id, Some(60 * MIB));
    assert_eq!(
        (s, &v["disk"]["quota"]),
        (200, &Value::from(60 * MIB)),
        "{v}"
    );
    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/more bs=1M count=5 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("Disk quota exceeded"), "{}", o.stdout);
    // changing the limit of a subvolume over its limit works (btrfs refuses it through the
    // subvolume itself; the host goes through the filesystem root)
    ok("sync");
    let (s, v) = set_quota(&id, Some(61 * MIB));
    assert_eq!(
        (s, &v["disk"]["quota"]),
        (200, &Value::from(61 * MIB)),
        "{v}"
    );
    assert_eq!(exec(&id, "rm -f /home/user/big2 /home/user/more").code, 0);
    ok("sync");
    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/more bs=1M count=5 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("rc=0"), "{}", o.stdout);
    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/fill bs=1M count=20 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("Disk quota exceeded"), "{}", o.stdout);
    assert_eq!(set_quota(&id, Some(300 * MIB)).0, 200);
    // no limit at all
    let (s, v) = set_quota(&id, None);
    assert_eq!(s, 200, "{v}");
    assert!(v["disk"]["quota"].is_null(), "{v}");

    // bad requests
    let (s, v) = set_quota(&id, Some(1000));
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_config")),
        "{v}"
    );
    let (s, v) = http("POST", &format!("/projects/{id}/quota"), Some("{}"));
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")), "{v}");
    let (s, v) = set_quota(&new_id(), Some(100 * MIB));
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("no_such_project")),
        "{v}"
    );
    stop(&id, true);
    stop(&other, true);
}

#[test]
fn nested_subvolumes_cannot_escape_the_quota() {
    let helper = tb::static_helper("btrfs_escape");
    // first, that the hole is real: podman's own default profile lets a user make subvolumes
    let probe = format!("{STORAGE}/escape-probe-{}", new_id());
    ok(&format!(
        "btrfs -q subvolume create {probe} && chown 101000:101000 {probe}"
    ));
    tb::push(&helper, &format!("{probe}/btrfs_escape"));
    ok(&format!("chmod 755 {probe}/btrfs_escape"));
    let o = ok(&format!(
        "podman run --rm --uidmap 0:100000:65536 --gidmap 0:100000:65536 --user 1000:1000 \
         --security-opt seccomp=/usr/share/containers/seccomp.json -v {probe}:/home/user \
         localhost/cocalc-project:latest /home/user/btrfs_escape /home/user"
    ));
    assert!(o.contains("subvol_create ok"), "{o}");
    let nested = ok(&format!("btrfs subvolume list -o {probe} | wc -l"));
    assert_ne!(
        nested, "0",
        "the default profile let the user make subvolumes"
    );
    ok(&format!(
        "for p in {probe}/nested-*; do btrfs -q subvolume delete $p; done; btrfs -q subvolume delete {probe}"
    ));

    // in a project, every way of making a subvolume fails, as the user and as container root
    let id = new_id();
    start(&id, Some(&format!("{{\"disk\":{}}}", 64 * MIB)));
    tb::push(&helper, &format!("{}/btrfs_escape", home(&id)));
    ok(&format!("chmod 755 {}/btrfs_escape", home(&id)));
    // container root has no capabilities (not even DAC_OVERRIDE): it cannot enter the user's
    // 0750 home at all; open a directory for it so its attempts reach the btrfs ioctls
    ok(&format!(
        "chmod 755 {h} && mkdir -m 777 {h}/open && cp {h}/btrfs_escape {h}/open/",
        h = home(&id)
    ));
    for (who, o) in [
        ("user", exec(&id, "/home/user/btrfs_escape /home/user")),
        (
            "root",
            exec_root(&id, "/home/user/open/btrfs_escape /home/user/open"),
        ),
    ] {
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines.len(), 9, "{who}: {}{}", o.stdout, o.stderr);
        for l in &lines[..8] {
            assert!(l.ends_with(" EPERM"), "{who}: {l}\n{}", o.stdout);
        }
        // other ioctls still work
        assert_eq!(lines[8], "getflags ok", "{who}");
    }
    assert_eq!(
        ok(&format!("btrfs subvolume list -o {} | wc -l", home(&id))),
        "0",
        "no nested subvolume exists"
    );
    // and the quota still holds for everything the project can write
    let o = exec(
        &id,
        "dd if=/dev/zero of=/home/user/big bs=1M count=100 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("Disk quota exceeded"), "{}", o.stdout);
    let _ = std::fs::remove_file(helper);
    stop(&id, true);
}

#[test]
fn snapshots_are_read_only_and_restore_brings_files_back() {
    let id = new_id();
    start(&id, None);
    assert!(exec(&id, "echo v1 > /home/user/hello.txt").code == 0);
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/snapshots"),
        Some(r#"{"name":"s1"}"#),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "s1");
    assert_eq!(v["kind"], "manual");
    let list = snapshots(&id);
    let s1 = list.iter().find(|s| s["name"] == "s1").unwrap();
    assert_eq!(s1["name"], "s1");
    let created = s1["created"].as_u64().unwrap();
    assert!(created.abs_diff(now_ms()) < 120_000, "{s1}");
    // quotas are on: sizes are known
    assert!(s1["referenced"].as_u64().is_some_and(|r| r > 0), "{s1}");
    assert!(s1["exclusive"].as_u64().is_some(), "{s1}");
    // on the host it is a read-only subvolume outside the home
    let snap = format!("{STORAGE}/.snapshots/project-{id}/s1");
    assert_eq!(ok(&format!("btrfs property get -ts {snap} ro")), "ro=true");
    assert_eq!(ok(&format!("stat -c %a {STORAGE}/.snapshots")), "700");

    // inside, the project sees it read-only at ~/.snapshots and can change nothing there,
    // not even as container root
    assert_eq!(
        exec(&id, "cat /home/user/.snapshots/s1/hello.txt")
            .stdout
            .trim(),
        "v1"
    );
    for cmd in [
        "echo x > /home/user/.snapshots/s1/hello.txt",
        "touch /home/user/.snapshots/s1/new",
        "rm -f /home/user/.snapshots/s1/hello.txt",
        "rm -rf /home/user/.snapshots/s1",
        "mv /home/user/.snapshots/s1 /home/user/moved",
        "mkdir /home/user/.snapshots/x",
        "umount /home/user/.snapshots",
    ] {
        for (who, o) in [("user", exec(&id, cmd)), ("root", exec_root(&id, cmd))] {
            assert_ne!(o.code, 0, "{who} could: {cmd}");
        }
    }
    assert_eq!(ok(&format!("cat {snap}/hello.txt")), "v1");

    // delete the file; restoring needs the project stopped
    assert_eq!(
        exec(
            &id,
            "rm /home/user/hello.txt && echo v2 > /home/user/new.txt"
        )
        .code,
        0
    );
    let restore = format!("/projects/{id}/snapshots/s1/restore");
    let (s, v) = http("POST", &restore, None);
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("project_running")),
        "{v}"
    );
    stop(&id, false);
    let (s, v) = http("POST", &restore, None);
    assert_eq!((s, v), (200, serde_json::json!({"restored": "s1"})));
    start(&id, None);
    assert_eq!(exec(&id, "cat /home/user/hello.txt").stdout.trim(), "v1");
    assert_ne!(
        exec(&id, "test -e /home/user/new.txt").code,
        0,
        "the home is the snapshot's, whole"
    );
    // the snapshot is still there, and the restored home is a fresh subvolume with the quota
    assert_eq!(manual_names(&id), ["s1"]);
    assert_eq!(
        ok(&format!("stat -c %i {}", home(&id))),
        "256",
        "the home is a subvolume"
    );
    ok(&format!("! ls -d {STORAGE}/.restore-* 2>/dev/null"));

    // errors
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            format!("/projects/{id}/snapshots/nope/restore"),
            None,
            404,
            "no_such_snapshot",
        ),
        (
            "DELETE",
            format!("/projects/{id}/snapshots/nope"),
            None,
            404,
            "no_such_snapshot",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots/..%2f..%2fetc/restore"),
            None,
            400,
            "invalid_snapshot_name",
        ),
        (
            "DELETE",
            format!("/projects/{id}/snapshots/.hidden"),
            None,
            400,
            "invalid_snapshot_name",
        ),
        (
            "DELETE",
            format!("/projects/{id}/snapshots/a..b"),
            None,
            400,
            "invalid_snapshot_name",
        ),
        (
            "DELETE",
            format!("/projects/{id}/snapshots/{}", "x".repeat(65)),
            None,
            400,
            "invalid_snapshot_name",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"../x"}"#),
            400,
            "invalid_snapshot_name",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"a/b"}"#),
            400,
            "invalid_snapshot_name",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"auto-x"}"#),
            400,
            "invalid_snapshot_name",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots"),
            Some(r#"{"name":"s1"}"#),
            409,
            "snapshot_exists",
        ),
        (
            "POST",
            format!("/projects/{id}/snapshots"),
            Some(r#"{"nam":"s1"}"#),
            400,
            "invalid_body",
        ),
        (
            "GET",
            format!("/projects/{}/snapshots", new_id()),
            None,
            404,
            "no_such_project",
        ),
        (
            "GET",
            "/projects/not-an-id/snapshots".to_string(),
            None,
            400,
            "invalid_project_id",
        ),
    ];
    for (m, p, body, want, code) in &cases {
        let (s, v) = http(m, p, *body);
        assert_eq!(
            (s, v["code"].as_str()),
            (*want, Some(*code)),
            "{m} {p} {body:?}: {v}"
        );
    }
    ok(&format!(
        "! test -e {STORAGE}/x && ! test -e {STORAGE}/.snapshots/x"
    ));

    // a snapshot without a name gets manual-<UTC time>; delete removes it
    let (s, v) = http("POST", &format!("/projects/{id}/snapshots"), Some("{}"));
    assert_eq!(s, 201, "{v}");
    let name = v["name"].as_str().unwrap().to_string();
    assert!(
        name.starts_with("manual-2") && name.ends_with('Z'),
        "{name}"
    );
    assert_eq!(manual_names(&id), ["s1", name.as_str()]);
    for n in ["s1", name.as_str()] {
        let (s, v) = http("DELETE", &format!("/projects/{id}/snapshots/{n}"), None);
        assert_eq!((s, v["deleted"].as_str()), (200, Some(n)), "{v}");
    }
    assert!(manual_names(&id).is_empty());
    // whatever the user leaves at ~/.snapshots cannot keep the project from starting
    stop(&id, false);
    ok(&format!(
        "rmdir {h}/.snapshots && ln -s /etc {h}/.snapshots",
        h = home(&id)
    ));
    start(&id, None);
    assert_eq!(exec(&id, "ls -d /home/user/.snapshots.moved-*").code, 0);
    assert_eq!(
        exec(&id, "ls /home/user/.snapshots | grep -vc ^auto-")
            .stdout
            .trim(),
        "0"
    );
    stop(&id, true);
}

fn at(iso: &str) -> u64 {
    parse_basic_iso(iso).unwrap_or_else(|| panic!("not a basic ISO time: {iso}"))
}

#[test]
fn rolling_snapshots_keep_exactly_the_policy_over_ten_simulated_weeks() {
    let _paused = TimerPaused::new();
    let id = new_id();
    start(&id, None);
    stop(&id, false);
    let h = home(&id);
    // a change and a sweep every day at 12:00 from Monday 2025-01-06 for 70 days, then four
    // more changes on the last day (Sunday 2025-03-16) every 15 minutes, then two sweeps with
    // nothing changed; each sweep with its own clock (the test hook), all in one go
    let t0 = at("20250106T120000Z");
    let mut steps: Vec<(u64, bool)> = (0..70).map(|d| (t0 + d * 86_400_000, true)).collect();
    let last = t0 + 69 * 86_400_000;
    steps.extend((1..=4).map(|i| (last + i * 900_000, true)));
    steps.extend((5..=6).map(|i| (last + i * 900_000, false)));
    let mut script = String::new();
    for (i, (t, write)) in steps.iter().enumerate() {
        if *write {
            script += &format!("echo {i} >> {h}/changes\n");
        }
        script += &format!(
            "curl -sS {} -X POST -H 'content-type: application/json' --data '{{\"now\":{t},\"projects\":[\"{id}\"]}}' {}/snapshots/sweep; echo\n",
            tb::AUTH,
            tb::API
        );
    }
    let t = std::time::Instant::now();
    let out = ok(&script);
    println!(
        "{} sweeps over 10 simulated weeks in {:.1}s",
        steps.len(),
        t.elapsed().as_secs_f64()
    );
    let results: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["projects"][0].clone())
        .collect();
    assert_eq!(results.len(), steps.len());
    for (r, (t, write)) in results.iter().zip(&steps) {
        assert!(r.get("error").is_none(), "{r}");
        if *write {
            assert_eq!(
                r["created"].as_str(),
                Some(format!("auto-{}", basic_iso(*t)).as_str()),
                "{r}"
            );
        } else {
            assert!(
                r.get("created").is_none(),
                "an unchanged project got a snapshot: {r}"
            );
            assert_eq!(r["skipped"], "unchanged", "{r}");
        }
    }
    let want = [
        "20250223T120000Z", // weekly (4th week back)
        "20250228T120000Z", // monthly (February)
        "20250302T120000Z", // weekly
        "20250309T120000Z", // weekly
        "20250310T120000Z", // daily ×6
        "20250311T120000Z",
        "20250312T120000Z",
        "20250313T120000Z",
        "20250314T120000Z",
        "20250315T120000Z",
        "20250316T121500Z", // frequent ×4 (13:00 is also this day's, week's and month's)
        "20250316T123000Z",
        "20250316T124500Z",
        "20250316T130000Z",
    ]
    .map(|w| format!("auto-{w}"));
    assert_eq!(snapshot_names(&id), want);
    let list = snapshots(&id);
    assert_eq!(list[0]["created"], at("20250223T120000Z"));
    assert!(list.iter().all(|s| s["kind"] == "auto"));
    // what is on disk is what the API lists
    let on_disk = ok(&format!("ls {STORAGE}/.snapshots/project-{id}"));
    assert_eq!(on_disk.lines().collect::<Vec<_>>(), want);
    // the content is the state at each instant: the 2025-02-28 snapshot saw 54 changes
    assert_eq!(
        ok(&format!(
            "wc -l < {STORAGE}/.snapshots/project-{id}/auto-20250228T120000Z/changes"
        )),
        "54"
    );
}

#[test]
fn the_sweep_skips_unchanged_and_untouched_projects() {
    let id = new_id();
    start(&id, None);
    stop(&id, false);
    let _paused = TimerPaused::new();
    let now = now_ms();
    let r = sweep(&id, now);
    assert!(
        r["created"]
            .as_str()
            .is_some_and(|n| n.starts_with("auto-")),
        "{r}"
    );
    // nothing changed since: no new snapshot, however often it sweeps
    for i in 1..=3 {
        let r = sweep(&id, now + i * 900_000);
        assert_eq!(r["skipped"], "unchanged", "{r}");
        assert!(r.get("created").is_none(), "{r}");
    }
    // a change is seen (the sweep commits before comparing generations)
    ok(&format!("echo x >> {}/f", home(&id)));
    let r = sweep(&id, now + 4 * 900_000);
    assert!(r["created"].is_string(), "{r}");
    // a project neither running nor touched for longer than snapshots.skip_untouched (14 days)
    ok(&format!("echo y >> {}/f", home(&id)));
    let r = sweep(&id, now + 15 * 86_400_000);
    assert_eq!(r["skipped"], "untouched", "{r}");
    assert_eq!(snapshots(&id).len(), 2);
    // unknown ids and bad bodies
    let r = sweep(&new_id(), now);
    assert_eq!(r["skipped"], "no_home", "{r}");
    let (s, v) = http("POST", "/snapshots/sweep", Some(r#"{"projects":["x"]}"#));
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_project_id")),
        "{v}"
    );
    let (s, v) = http("POST", "/snapshots/sweep", Some(r#"{"when":1}"#));
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")), "{v}");
}

#[test]
fn the_snapshot_timer_is_installed_and_its_service_sweeps() {
    let timers = ok("systemctl list-timers --all --no-legend --no-pager");
    assert!(
        timers.contains("cocalc-project-host-snapshots.timer"),
        "{timers}"
    );
    assert_eq!(
        ok("systemctl is-enabled cocalc-project-host-snapshots.timer"),
        "enabled"
    );
    assert_eq!(
        ok("systemctl is-active cocalc-project-host-snapshots.timer"),
        "active"
    );
    let cal = ok("systemctl show -p TimersCalendar --value cocalc-project-host-snapshots.timer");
    assert!(cal.contains("OnCalendar=*-*-* *:00/15:00"), "{cal}");
    // the oneshot asks the daemon to sweep, over the API
    let id = new_id();
    start(&id, None);
    ok("systemctl start cocalc-project-host-snapshots.service");
    assert_eq!(
        ok("systemctl show -p Result --value cocalc-project-host-snapshots.service"),
        "success"
    );
    let names = snapshot_names(&id);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("auto-"));
    let log = ok("journalctl -u cocalc-project-host-snapshots.service -o cat --no-pager -n 20");
    assert!(log.contains(&id), "{log}");
    stop(&id, true);
}

#[test]
fn scratch_is_fresh_each_start_and_tmp_is_a_sized_tmpfs() {
    let id = new_id();
    let cfg = format!("{{\"scratch\":{},\"tmp\":{}}}", 32 * MIB, 8 * MIB);
    start(&id, Some(&cfg));
    assert_eq!(
        exec(&id, "echo s > /scratch/a && echo h > /home/user/a").code,
        0
    );
    let o = exec(
        &id,
        "dd if=/dev/zero of=/scratch/big bs=1M count=40 2>&1; echo rc=$?",
    );
    assert!(o.stdout.contains("Disk quota exceeded"), "{}", o.stdout);
    let df = exec(&id, "df -k /tmp | tail -1").stdout;
    let f: Vec<&str> = df.split_whitespace().collect();
    assert_eq!((f[0], f[1]), ("tmpfs", "8192"), "{df}");
    let o = exec(
        &id,
        "dd if=/dev/zero of=/tmp/big bs=1M count=16 2>&1; echo rc=$?",
    );
    assert!(!o.stdout.contains("rc=0"), "{}", o.stdout);
    // the scratch belongs to the project's own user, like its home
    assert_eq!(
        ok(&format!("stat -c %u {STORAGE}/.scratch/project-{id}")),
        ok(&format!("stat -c %u {STORAGE}/project-{id}"))
    );
    stop(&id, false);
    start(&id, None);
    assert_eq!(exec(&id, "cat /home/user/a").stdout.trim(), "h");
    // still configured (the stored config), so there, and empty: recreated on a cold start
    let o = exec(&id, "test -d /scratch && ls -A /scratch");
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, ""),
        "scratch after a restart: {o:?}"
    );
    ok(&format!("test -d {STORAGE}/.scratch/project-{id}"));
    assert_eq!(
        exec(&id, "echo s2 > /scratch/b").code,
        0,
        "scratch is writable"
    );
    stop(&id, false);
    // without scratch there is no /scratch (and the old one is gone)
    start(&id, Some("{}"));
    assert_ne!(exec(&id, "test -d /scratch").code, 0);
    ok(&format!("! test -e {STORAGE}/.scratch/project-{id}"));
    stop(&id, true);
}
