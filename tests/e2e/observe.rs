//! Seeing what the host does (issue 16): a project's logs (first, last, since, follow, resume),
//! the event stream (order, resume, gaps), `/metrics` read by a real Prometheus parser, start
//! phase timings, and who may read which project's logs and events.
use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::tb::{self, API, AUTH, As, http_as, new_id, ok, sh, start, status, stop};

/// Reads an SSE stream inside the machine for at most `secs` (or until it ends); prints one JSON
/// object per event: {id, event, data, recv_us}. argv: URL SECS LAST_EVENT_ID [TOKEN].
const SSE_READER: &str = r#"
import json, os, sys, threading, time, urllib.request
url, secs, last = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tok = sys.argv[4] if len(sys.argv) > 4 else open("/etc/cocalc-project-host/admin-token").read().split()[0]
h = {"Authorization": "Bearer " + tok, "Accept": "text/event-stream"}
if last:
    h["Last-Event-ID"] = last
def read():
    r = urllib.request.urlopen(urllib.request.Request(url, headers=h))
    print(json.dumps({"status": r.status, "content_type": r.headers.get("content-type")}), flush=True)
    ev = {}
    for raw in r:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("id: "):
            ev["id"] = line[4:]
        elif line.startswith("event: "):
            ev["event"] = line[7:]
        elif line.startswith("data: "):
            ev["data"] = json.loads(line[6:])
        elif line == "" and ev:
            ev["recv_us"] = int(time.time() * 1e6)
            print(json.dumps(ev), flush=True)
            ev = {}
t = threading.Thread(target=read, daemon=True)
t.start()
t.join(secs)
sys.stdout.flush()
os._exit(0)
"#;

/// Runs the reader; its events (the first line, status and content type, is checked and dropped).
fn sse(path: &str, secs: f64, last: &str, token: Option<&str>) -> Vec<Value> {
    let cmd = format!(
        "cat > /tmp/e2e-sse.py && python3 /tmp/e2e-sse.py '{API}{path}' {secs} '{last}' {}",
        token.unwrap_or("")
    );
    let o = tb::sh_in(&cmd, SSE_READER.as_bytes());
    assert_eq!(o.code, 0, "sse reader: {}{}", o.stdout, o.stderr);
    let mut lines = o.stdout.lines();
    let head: Value = serde_json::from_str(lines.next().unwrap_or("{}")).unwrap();
    assert_eq!(head["status"], 200, "{path}: {}{}", o.stdout, o.stderr);
    assert_eq!(head["content_type"], "text/event-stream", "{head}");
    lines.map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `GET /projects/:id/logs?<query>` as JSON lines.
fn logs(id: &str, query: &str) -> Vec<Value> {
    let out = ok(&format!(
        "curl -sS -f -m 20 {AUTH} '{API}/projects/{id}/logs?{query}'"
    ));
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn messages(v: &[Value]) -> Vec<&str> {
    v.iter().map(|l| l["message"].as_str().unwrap()).collect()
}

/// A query value: a cursor's `;` and `=` percent-encoded.
fn enc(s: &str) -> String {
    s.replace('=', "%3D").replace(';', "%3B")
}

#[test]
fn logs_first_last_since_follow_and_resume() {
    let id = new_id();
    // 30 numbered lines at once, then a tick a second
    start(
        &id,
        Some(
            r#"{"cmd":["sh","-c","i=1; while [ $i -le 30 ]; do echo line-$i; i=$((i+1)); done; while true; do sleep 1; echo tick; done"]}"#,
        ),
    );
    let all = tb::wait_for("line-30 in the logs", 20, || {
        let l = logs(&id, "lines=1000");
        messages(&l).contains(&"line-30").then_some(l)
    });
    let numbered: Vec<&str> = messages(&all)
        .into_iter()
        .filter(|m| m.starts_with("line-"))
        .collect();
    let want: Vec<String> = (1..=30).map(|n| format!("line-{n}")).collect();
    assert_eq!(numbered, want, "first to last, in order");
    for l in &all {
        assert!(l["cursor"].as_str().unwrap().starts_with("s="), "{l}");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["priority"].as_u64().unwrap() <= 7, "{l}");
    }
    // the last N
    let last3 = logs(&id, "lines=3");
    assert_eq!(last3.len(), 3);
    assert!(last3[2]["usec"].as_u64() >= all.last().unwrap()["usec"].as_u64());
    // since a cursor: the lines after it
    let at = |m: &str| all.iter().find(|l| l["message"] == m).unwrap();
    let c10 = at("line-10")["cursor"].as_str().unwrap();
    let after = logs(&id, &format!("lines=5&since={}", enc(c10)));
    // -n keeps the newest: ask for enough to see the start of the range
    let after_all = logs(&id, &format!("lines=1000&since={}", enc(c10)));
    assert_eq!(after_all[0]["message"], "line-11", "{after_all:?}");
    assert_eq!(after.len(), 5);
    // since a time (µs)
    let u20 = at("line-20")["usec"].as_u64().unwrap();
    let since_t = logs(&id, &format!("lines=1000&since={u20}"));
    assert!(
        since_t.iter().all(|l| l["usec"].as_u64().unwrap() >= u20),
        "{since_t:?}"
    );
    assert!(messages(&since_t).contains(&"line-20"));
    assert!(!messages(&since_t).contains(&"line-19"));
    // follow: every tick arrives within 1 s of journald receiving it
    let followed = sse(
        &format!("/projects/{id}/logs?follow=1&lines=1"),
        3.5,
        "",
        None,
    );
    let ticks: Vec<&Value> = followed
        .iter()
        .filter(|e| e["event"] == "log" && e["data"]["message"] == "tick")
        .collect();
    assert!(ticks.len() >= 2, "{followed:?}");
    let lags: Vec<i64> = ticks
        .iter()
        .map(|t| t["recv_us"].as_i64().unwrap() - t["data"]["usec"].as_i64().unwrap())
        .collect();
    println!("followed log lines arrived after (µs): {lags:?}");
    for t in &ticks {
        let lag =
            t["recv_us"].as_u64().unwrap() as i64 - t["data"]["usec"].as_u64().unwrap() as i64;
        assert!(lag < 1_000_000, "a followed line came {lag} µs late: {t}");
        assert_eq!(t["id"], t["data"]["cursor"]);
    }
    // resume after a disconnect: Last-Event-ID = the cursor of line-25
    let c25 = at("line-25")["cursor"].as_str().unwrap();
    let resumed = sse(&format!("/projects/{id}/logs?follow=1"), 1.5, c25, None);
    let m: Vec<&str> = resumed
        .iter()
        .map(|e| e["data"]["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        &m[..5],
        ["line-26", "line-27", "line-28", "line-29", "line-30"]
    );
    // bad queries: 400 invalid_query, nothing streamed
    for q in [
        "lines=0",
        "lines=x",
        "since=yesterday",
        "since=s%3Dx",
        "follow=2",
        "x=1",
    ] {
        let (s, v) = tb::http("GET", &format!("/projects/{id}/logs?{q}"), None);
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid_query")),
            "{q}: {v}"
        );
    }
    stop(&id, true);
}

#[test]
fn a_flood_past_the_rate_limit_shows_as_suppressed_lines() {
    let _limit = tb::DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-observe.toml",
        "[projects]\nlog_rate_limit_interval = \"5s\"\nlog_rate_limit_burst = 50\n",
    );
    let id = new_id();
    // 5000 lines at once; journald writes its "Suppressed N messages" entry about the unit when
    // the unit logs again after the window: the line after the pause
    start(
        &id,
        Some(
            r#"{"cmd":["sh","-c","i=0; while [ $i -lt 5000 ]; do echo flood-$i; i=$((i+1)); done; sleep 6; echo after; sleep 600"]}"#,
        ),
    );
    let (entries, after) = tb::wait_for("the line after the flood", 40, || {
        let l = logs(&id, "lines=1000");
        messages(&l).contains(&"after").then(|| {
            let s: Vec<Value> = l
                .iter()
                .filter(|l| l["suppressed"].as_u64().is_some())
                .cloned()
                .collect();
            (s, l.len())
        })
    });
    assert!(
        !entries.is_empty(),
        "no suppressed-lines entry among {after} lines"
    );
    let total: u64 = entries
        .iter()
        .map(|l| l["suppressed"].as_u64().unwrap())
        .sum();
    // at most 50 lines per 5 s window got through
    assert!(total >= 4000, "{entries:?}");
    let n = entries[0]["suppressed"].as_u64().unwrap();
    assert_eq!(
        entries[0]["message"],
        format!("suppressed {n} lines (journald rate limit)")
    );
    stop(&id, true);
}

#[test]
fn events_of_two_projects_in_order_resume_and_gaps() {
    let (a, b) = (new_id(), new_id());
    let mine = |e: &&Value| {
        let p = e["data"]["project_id"].as_str().unwrap_or("");
        p == a || p == b
    };
    // the newest id now (a replay of the ring ends there)
    let before = sse("/events?follow=0", 5.0, "", None);
    let last = before
        .last()
        .map_or(String::new(), |e| e["id"].as_str().unwrap().to_string());
    // a live reader, while two projects start and stop
    let path = "/events".to_string();
    let live = std::thread::spawn(move || sse(&path, 25.0, "", None));
    std::thread::sleep(Duration::from_millis(1500));
    start(&a, None);
    start(&b, None);
    stop(&a, false);
    stop(&b, false);
    // what happened, from the ring (resume after `last`)
    let replay = sse("/events?follow=0", 5.0, &last, None);
    let seq: Vec<(String, String, String)> = replay
        .iter()
        .filter(mine)
        .filter(|e| e["event"] == "state")
        .map(|e| {
            (
                e["data"]["project_id"].as_str().unwrap().to_string(),
                e["data"]["state"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let pos = |p: &str, s: &str| {
        seq.iter()
            .position(|(pp, ss, _)| pp == p && ss == s)
            .unwrap_or_else(|| panic!("{p} {s} missing from {seq:?}"))
    };
    assert!(pos(&a, "running") < pos(&b, "running"), "{seq:?}");
    assert!(pos(&b, "running") < pos(&a, "opened"), "{seq:?}");
    assert!(pos(&a, "opened") < pos(&b, "opened"), "{seq:?}");
    let ids: Vec<u64> = replay
        .iter()
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(replay.iter().all(|e| e["event"] != "lost"), "{replay:?}");
    // the live stream saw the same events, in the same order
    let live = live.join().unwrap();
    let live_ids: Vec<&str> = live
        .iter()
        .filter(mine)
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let replay_ids: Vec<&str> = replay
        .iter()
        .filter(mine)
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(live_ids, replay_ids);
    // a client that disconnected after the 2nd event resumes with the 3rd
    let resumed = sse("/events?follow=0", 5.0, replay_ids[1], None);
    let resumed_ids: Vec<&str> = resumed
        .iter()
        .filter(mine)
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(resumed_ids, &replay_ids[2..]);
    // further behind than the ring: an explicit gap first
    let behind = sse("/events?follow=0", 5.0, "1", None);
    assert_eq!(behind[0]["event"], "lost", "{:?}", &behind[..1]);
    assert_eq!(behind[0]["data"]["from"], 2);
    let (s, v) = tb::http("GET", "/events?follow=0&lines=2", None);
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_query")), "{v}");
}

fn scrape() -> HashMap<String, f64> {
    let text = ok(&format!("curl -sS -f -m 20 {AUTH} '{API}/metrics'"));
    let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut m = HashMap::new();
    for x in s.samples {
        let mut labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let v = match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        m.insert(format!("{}{{{}}}", x.metric, labels.join(",")), v);
    }
    m
}

#[test]
fn metrics_parse_move_after_a_start_and_phase_timings_add_up() {
    let before = scrape();
    let starts = |m: &HashMap<String, f64>| {
        m.get("cocalc_project_start_duration_seconds_count{outcome=ok}")
            .copied()
            .unwrap_or(0.0)
    };
    let id = new_id();
    let v = start(&id, None);
    // the start answer's phases add up to its total within 5 %
    let ph = &v["phase_timings_ms"];
    let part = |k: &str| ph[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    let sum = part("storage") + part("unit") + part("podman") + part("ready");
    let total = part("total");
    println!("start phases (ms): {ph}");
    assert!(total > 0 && sum <= total, "{ph}");
    assert!(
        (total - sum) * 20 <= total,
        "phases {sum} ms vs total {total} ms: {ph}"
    );
    assert_eq!(status(&id)["phase_timings_ms"], *ph);
    // and the journal has them as fields of the "project started" entry
    let j = ok(&format!(
        "journalctl -u cocalc-project-host -o json --output-fields=PROJECT_ID,PHASE_TOTAL_MS,PHASE_PODMAN_MS PROJECT_ID={id} | tail -1"
    ));
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["PHASE_TOTAL_MS"], total.to_string(), "{j}");
    // memory and CPU of the running project appear after the 5 s refresh
    let label = format!("{{project_id={id}}}");
    let after = tb::wait_for("the project's memory in /metrics", 20, || {
        let m = scrape();
        m.contains_key(&format!("cocalc_project_memory_bytes{label}"))
            .then_some(m)
    });
    assert_eq!(starts(&after), starts(&before) + 1.0);
    assert!(after[&format!("cocalc_project_memory_bytes{label}")] > 0.0);
    assert!(after.contains_key(&format!("cocalc_project_cpu_seconds_total{label}")));
    assert!(after["cocalc_projects{state=running}"] >= 1.0);
    assert!(after["cocalc_daemon_open_fds{}"] > 0.0);
    assert!(after["cocalc_daemon_resident_memory_bytes{}"] > 0.0);
    let reqs = "cocalc_http_requests_total{method=POST,route=/projects/:id/start,status=200}";
    assert_eq!(after[reqs], before.get(reqs).copied().unwrap_or(0.0) + 1.0);
    assert!(
        after
            .keys()
            .all(|k| !k.contains("route=/projects/") || k.contains(":id")),
        "raw ids in route labels"
    );
    stop(&id, true);
}

/// A master key trusted while this lives (the daemon restarts to read it, and again after).
struct MasterKey([u8; 32]);

const DROP_IN: &str = "/etc/cocalc-project-host/config.d/90-e2e-observe-auth.toml";

impl MasterKey {
    fn install() -> MasterKey {
        let (seed, b64) = tb::master_key();
        tb::sh_in(
            &format!("cat > {DROP_IN}"),
            format!("[auth]\nmaster_public_keys = [\"{b64}\"]\nmax_token_lifetime = 3600\n")
                .as_bytes(),
        );
        ok("systemctl restart cocalc-project-host.service");
        MasterKey(seed)
    }

    fn token(&self, projects: Value, actions: &[&str]) -> String {
        let t = cocalc_project_host::auth::now_secs();
        let c = json!({"aud": tb::host_id(), "sub": "account-e2e", "iat": t, "exp": t + 600,
                       "scope": {"projects": projects, "actions": actions}});
        cocalc_project_host::auth::sign(&self.0, &c).unwrap()
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {DROP_IN}; systemctl restart cocalc-project-host.service"
        ));
    }
}

/// A tenant's token reads its own project's logs and events, never another's; metrics need the
/// `metrics` action.
#[test]
fn logs_and_events_stay_within_a_tokens_projects() {
    let key = MasterKey::install();
    let (mine, theirs) = (new_id(), new_id());
    start(
        &mine,
        Some(r#"{"cmd":["sh","-c","echo mine-secret; sleep 600"]}"#),
    );
    start(
        &theirs,
        Some(r#"{"cmd":["sh","-c","echo their-secret; sleep 600"]}"#),
    );
    let t = key.token(json!([mine]), &["logs", "list", "status"]);
    let get = |path: &str| {
        ok(&format!(
            "curl -sS -m 20 -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {t}' '{API}{path}'"
        ))
    };
    tb::wait_for("mine-secret in the logs", 20, || {
        let out = ok(&format!(
            "curl -sS -m 20 -H 'Authorization: Bearer {t}' '{API}/projects/{mine}/logs'"
        ));
        out.contains("mine-secret").then_some(())
    });
    // another project's logs: refused, plain and followed, whatever the query
    for q in ["", "?follow=1", "?lines=5&since=0"] {
        assert_eq!(get(&format!("/projects/{theirs}/logs{q}")), "403", "{q}");
    }
    let (s, v) = http_as(
        As::Bearer(&t),
        "GET",
        &format!("/projects/{theirs}/logs"),
        None,
    );
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    // no metrics action
    assert_eq!(get("/metrics"), "403");
    // a token without the logs action cannot read even its own project's
    let no_logs = key.token(json!([mine]), &["status"]);
    let (s, _) = http_as(
        As::Bearer(&no_logs),
        "GET",
        &format!("/projects/{mine}/logs"),
        None,
    );
    assert_eq!(s, 403);
    // events: only its own project's
    let before = sse("/events?follow=0", 5.0, "", None);
    let last = before
        .last()
        .map_or(String::new(), |e| e["id"].as_str().unwrap().to_string());
    stop(&theirs, true);
    stop(&mine, true);
    let seen = sse("/events?follow=0", 5.0, &last, Some(&t));
    let projects: Vec<&str> = seen
        .iter()
        .filter_map(|e| e["data"]["project_id"].as_str())
        .collect();
    assert!(projects.contains(&mine.as_str()), "{seen:?}");
    assert!(!projects.contains(&theirs.as_str()), "{seen:?}");
    // a metrics token scrapes (host-wide, no project)
    let m = key.token(json!([]), &["metrics"]);
    let text = ok(&format!(
        "curl -sS -f -m 20 -H 'Authorization: Bearer {m}' '{API}/metrics'"
    ));
    assert!(text.ends_with("# EOF"), "{text}");
}

/// Runs `cocalc-project-host top` under a pty (160x40) for `secs`, then presses q; the screen
/// output and the exit code.
const TOP_UNDER_PTY: &str = r#"
import fcntl, os, pty, select, struct, sys, termios, time
secs = float(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    os.environ["TERM"] = "xterm"
    os.execvp("cocalc-project-host", ["cocalc-project-host", "top", "--sort", "memory"])
out = b""
end = time.time() + secs
while time.time() < end:
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            out += os.read(fd, 65536)
        except OSError:
            break
os.write(fd, b"q")
end = time.time() + 5
code = None
while time.time() < end:
    p, status = os.waitpid(pid, os.WNOHANG)
    if p:
        code = os.waitstatus_to_exitcode(status)
        break
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            out += os.read(fd, 65536)
        except OSError:
            pass
sys.stdout.write(out.decode(errors="replace"))
print("\nEXIT", code)
"#;

#[test]
fn cli_logs_events_and_top_under_a_pty() {
    let (a, b) = (new_id(), new_id());
    start(
        &a,
        Some(r#"{"cmd":["sh","-c","echo hello-a; while true; do sleep 1; echo tick-a; done"]}"#),
    );
    start(&b, Some(r#"{"cmd":["sh","-c","echo hello-b; sleep 600"]}"#));
    tb::wait_for("hello-a through the CLI", 20, || {
        let o = sh(&format!("cocalc-project-host logs {a} -n 100"));
        (o.code == 0 && o.stdout.contains("hello-a")).then_some(())
    });
    let json = ok(&format!("cocalc-project-host logs {a} -n 3 --json"));
    assert_eq!(json.lines().count(), 3, "{json}");
    for l in json.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["cursor"].as_str().unwrap().starts_with("s="), "{v}");
    }
    // -f keeps printing: ticks that came after it started
    let o = sh(&format!(
        "timeout 3 cocalc-project-host logs -f -n 1 {a}; echo rc=$?"
    ));
    assert!(o.stdout.matches("tick-a").count() >= 2, "{}", o.stdout);
    assert!(o.stdout.contains("rc=124"), "{}", o.stdout);
    // a bad id or count: usage errors, exit 2
    assert_eq!(sh("cocalc-project-host logs nope").code, 2);
    assert_eq!(
        sh(&format!("cocalc-project-host logs {a} -n 20000")).code,
        2
    );
    // events: a follower started before a stop sees it
    let follower = std::thread::spawn(|| sh("timeout 6 cocalc-project-host events --json"));
    std::thread::sleep(Duration::from_secs(2));
    stop(&b, false);
    let o = follower.join().unwrap();
    let seen: Vec<Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        seen.iter()
            .any(|e| e["project_id"] == b.as_str() && e["state"] == "opened"),
        "{}",
        o.stdout
    );
    start(&b, Some(r#"{"cmd":["sh","-c","sleep 600"]}"#));
    // top shows both, and q quits it cleanly
    let out = tb::sh_in(
        "cat > /tmp/e2e-top.py && python3 /tmp/e2e-top.py 3",
        TOP_UNDER_PTY.as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    for id in [&a, &b] {
        assert!(
            out.stdout.contains(id.as_str()),
            "{id} not in top:\n{}",
            out.stdout
        );
    }
    // ratatui positions each word: the title's words are there, cursor moves between them
    assert!(out.stdout.contains("project(s)"), "{}", out.stdout);
    assert!(out.stdout.trim_end().ends_with("EXIT 0"), "{}", out.stdout);
    stop(&a, true);
    stop(&b, true);
}
