//! Projects for real: transient units wrapping podman on btrfs subvolumes, behind the HTTP API.
use serde_json::Value;

use crate::tb::{self, STORAGE, http, new_id, ok, sh, start, status, stop, wait_for};

fn container_pid(id: &str) -> u32 {
    ok(&format!(
        "podman inspect -f '{{{{.State.Pid}}}}' project-{id}"
    ))
    .parse()
    .unwrap()
}

fn containers_named(id: &str) -> usize {
    ok(&format!(
        "podman ps -a --format '{{{{.Names}}}}' --filter name=project-{id}"
    ))
    .lines()
    .filter(|l| !l.is_empty())
    .count()
}

fn unit_active(id: &str) -> String {
    sh(&format!("systemctl is-active cocalc-project-{id}.service"))
        .stdout
        .trim()
        .to_string()
}

#[test]
fn start_runs_a_real_unit_as_an_unprivileged_user() {
    let id = new_id();
    let v = start(&id, None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["unit"], format!("cocalc-project-{id}.service"));
    assert_eq!(v["sub_state"], "running");
    assert!(v["main_pid"].as_u64().is_some_and(|p| p > 1), "{v}");
    assert!(v["server"].as_str().is_some_and(|s| s.len() == 36), "{v}");
    assert_eq!(unit_active(&id), "active");
    assert_eq!(
        ok(&format!(
            "systemctl show -p Slice --value cocalc-project-{id}"
        )),
        "cocalc-projects.slice"
    );
    assert_eq!(containers_named(&id), 1);

    // inside: user `user`, home on the subvolume, files owned by an unprivileged host uid
    assert_eq!(ok(&format!("podman exec project-{id} id -un")), "user");
    assert_eq!(
        ok(&format!(
            "podman exec project-{id} sh -c 'echo $HOME $COCALC_PROJECT_ID'"
        )),
        format!("/home/user {id}")
    );
    ok(&format!(
        "podman exec project-{id} sh -c 'echo hello > /home/user/hello.txt'"
    ));
    let home = format!("{STORAGE}/project-{id}");
    assert_eq!(
        ok(&format!(
            "btrfs subvolume show {home} >/dev/null && echo subvol"
        )),
        "subvol"
    );
    assert_eq!(ok(&format!("cat {home}/hello.txt")), "hello");
    // the project's own host ids (from the pool at 2^30): its user is base + 1000
    let owner: u32 = ok(&format!("stat -c %u {home}")).parse().unwrap();
    assert!(owner >= (1 << 30) + 1000, "home owner {owner}");
    let base = owner - 1000;
    assert_eq!(
        ok(&format!("stat -c %u:%g {home}/hello.txt")),
        format!("{owner}:{owner}")
    );
    // container root is not host root: the container's processes live in a user namespace
    let pid = container_pid(&id);
    let map = ok(&format!("cat /proc/{pid}/uid_map"));
    let f: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(
        f,
        ["0", &base.to_string(), "65536"],
        "uid_map of {pid}: {map}"
    );
    assert_eq!(
        ok(&format!("stat -c %u /proc/{pid}")),
        owner.to_string(),
        "the container's init runs as user"
    );
    // the container's output is in the unit's journal
    let log = wait_for("container output in the journal", 10, || {
        let l = ok(&format!(
            "journalctl -u cocalc-project-{id} -o cat --no-pager"
        ));
        l.contains(&format!("cocalc project {id} up as user"))
            .then_some(l)
    });
    assert!(!log.is_empty());
    stop(&id, false);
}

#[test]
fn stop_keeps_files_and_a_new_start_sees_them() {
    let id = new_id();
    start(&id, None);
    ok(&format!(
        "podman exec project-{id} sh -c 'echo kept > /home/user/keep.txt'"
    ));
    let v = stop(&id, false);
    assert_eq!(v["state"], "opened", "{v}");
    assert!(v.get("main_pid").is_none(), "{v}");
    assert_eq!(unit_active(&id), "inactive");
    assert_eq!(
        ok(&format!(
            "systemctl list-units --all --no-legend 'cocalc-project-{id}.service' | wc -l"
        )),
        "0"
    );
    assert_eq!(containers_named(&id), 0);
    assert_eq!(ok(&format!("cat {STORAGE}/project-{id}/keep.txt")), "kept");
    assert_eq!(status(&id)["state"], "opened");
    // stopping a stopped project is fine and does nothing
    assert_eq!(stop(&id, false)["state"], "opened");

    let v = start(&id, None);
    assert_eq!(v["state"], "running");
    assert_eq!(
        ok(&format!("podman exec project-{id} cat /home/user/keep.txt")),
        "kept"
    );
    // starting a running project is fine and does nothing
    let again = start(&id, None);
    assert_eq!(again["main_pid"], v["main_pid"], "no second container");
    assert_eq!(containers_named(&id), 1);
    // force stop kills at once, still leaving nothing behind
    let v = stop(&id, true);
    assert_eq!(v["state"], "opened");
    assert_eq!(containers_named(&id), 0);
    assert_eq!(unit_active(&id), "inactive");
}

#[test]
fn the_unit_recipe_leaves_no_container_behind() {
    let id = new_id();
    let v = start(&id, None);
    assert_eq!(v["state"], "running", "{v}");
    let unit = format!("cocalc-project-{id}.service");
    // no ExecStartPre, and an ExecStopPost that runs podman only after an unclean end (issue 18)
    let show = |p: &str| ok(&format!("systemctl show -p {p} --value {unit}"));
    assert_eq!(show("ExecStartPre"), "");
    assert!(
        show("ExecStopPost").contains("EXIT_CODE"),
        "{}",
        show("ExecStopPost")
    );
    assert!(
        show("ExecStop").contains("argv[]=/usr/bin/podman rm --force --ignore --time="),
        "{}",
        show("ExecStop")
    );

    // conmon killed: ExecStopPost removes the container
    let conmon = ok(&format!(
        "podman inspect -f '{{{{.State.ConmonPid}}}}' project-{id}"
    ));
    ok(&format!("kill -9 {conmon}"));
    wait_for("the unit to end after its conmon was killed", 30, || {
        (unit_active(&id) != "active" && unit_active(&id) != "deactivating").then_some(())
    });
    wait_for("status to show it stopped", 20, || {
        (status(&id)["state"] == "opened").then_some(())
    });
    assert_eq!(
        containers_named(&id),
        0,
        "ExecStopPost removed the container"
    );

    // a container left behind all the same (here made by hand): the next start takes the name
    // back (--replace), and a delete removes one that is left
    ok(&format!(
        "podman create --name project-{id} localhost/cocalc-project:latest true"
    ));
    let v = start(&id, None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(containers_named(&id), 1);
    assert_eq!(stop(&id, false)["state"], "opened");
    ok(&format!(
        "podman create --name project-{id} localhost/cocalc-project:latest true"
    ));
    assert_eq!(containers_named(&id), 1);
    let (s, v) = http("DELETE", &format!("/projects/{id}"), None);
    assert_eq!((s, &v["removed"]), (200, &serde_json::json!(true)), "{v}");
    assert_eq!(containers_named(&id), 0, "the delete removed the container");
}

#[test]
fn projects_survive_a_killed_daemon() {
    let (a, b) = (new_id(), new_id());
    let pa = start(&a, None)["main_pid"].clone();
    let pb = start(&b, None)["main_pid"].clone();
    ok("systemctl kill -s KILL cocalc-project-host.service");
    // the projects are their own units: untouched
    assert_eq!(unit_active(&a), "active");
    assert_eq!(unit_active(&b), "active");
    // the next request reaches a new daemon (restarted, or activated by the socket) that adopted them
    let va = status(&a);
    let vb = status(&b);
    assert_eq!(
        (va["state"].clone(), va["main_pid"].clone()),
        (Value::from("running"), pa),
        "{va}"
    );
    assert_eq!(
        (vb["state"].clone(), vb["main_pid"].clone()),
        (Value::from("running"), pb),
        "{vb}"
    );
    let (_, list) = http("GET", "/projects", None);
    let ids: Vec<&str> = list["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["project_id"].as_str())
        .collect();
    assert!(
        ids.contains(&a.as_str()) && ids.contains(&b.as_str()),
        "{list}"
    );
    stop(&a, false);
    stop(&b, false);
}

#[test]
fn a_container_that_exits_shows_as_stopped() {
    let id = new_id();
    let v = start(
        &id,
        Some(r#"{"cmd":["sh","-c","echo short-lived; sleep 1"]}"#),
    );
    assert_eq!(v["state"], "running", "{v}");
    wait_for("status to show the exit", 20, || {
        (status(&id)["state"] == "opened").then_some(())
    });
    wait_for("the unit to be gone", 20, || {
        (unit_active(&id) != "active").then_some(())
    });
    assert_eq!(containers_named(&id), 0);
    // the config of the last start is remembered for the next one
    let v = start(&id, None);
    assert_eq!(v["state"], "running");
    wait_for("status to show the exit again", 20, || {
        (status(&id)["state"] == "opened").then_some(())
    });
}

#[test]
fn concurrent_starts_and_stops_stay_consistent() {
    let one = new_id();
    let many: Vec<String> = (0..10).map(|_| new_id()).collect();
    // 20 racing start/stop calls on one project, 10 starts of different projects, all at once
    let mut script = String::from("pids=\n");
    for i in 0..20 {
        let action = if i % 2 == 0 { "start" } else { "stop" };
        script += &format!(
            "curl -s {} -o /dev/null -w '%{{http_code}}\\n' -X POST {}/projects/{one}/{action} >> /tmp/e2e-conc.$$ & pids=\"$pids $!\"\n",
            tb::AUTH,
            tb::API
        );
    }
    for id in &many {
        script += &format!(
            "curl -s {} -o /dev/null -w '%{{http_code}}\\n' -X POST {}/projects/{id}/start >> /tmp/e2e-conc.$$ & pids=\"$pids $!\"\n",
            tb::AUTH,
            tb::API
        );
    }
    script += "wait $pids; cat /tmp/e2e-conc.$$; rm -f /tmp/e2e-conc.$$\n";
    let codes = ok(&script);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        30,
        "all calls succeed: {codes}"
    );

    // the one project: what the API says is what systemd and podman say, and no duplicates
    let st = status(&one)["state"].as_str().unwrap().to_string();
    let active = unit_active(&one);
    let n = containers_named(&one);
    match st.as_str() {
        "running" => assert_eq!((active.as_str(), n), ("active", 1)),
        "opened" => assert_eq!((active.as_str(), n), ("inactive", 0)),
        s => panic!("unexpected state {s}"),
    }
    for id in &many {
        assert_eq!(status(id)["state"], "running", "{id}");
        assert_eq!(containers_named(id), 1, "{id}");
    }
    // one unit per project, whatever else runs on the machine
    let ours = many
        .iter()
        .chain([&one])
        .map(|id| format!("cocalc-project-{id}.service"))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        ok(&format!(
            "systemctl list-units --no-legend --state=running {ours} | wc -l"
        ))
        .parse::<usize>()
        .unwrap(),
        many.len() + usize::from(st == "running")
    );
    stop(&one, false);
    for id in &many {
        stop(id, true);
    }
    for id in many.iter().chain([&one]) {
        assert_eq!(containers_named(id), 0, "{id}");
    }
}

#[test]
fn bad_input_is_refused_with_json_and_changes_nothing() {
    let id = new_id();
    let other = new_id();
    let bad_id = |p: String| ("GET", p, None, 400, "invalid_project_id");
    // paths go to the daemon as written (tb::http sends them with --path-as-is): each traversal
    // reaches the id or snapshot-name parser, not curl's or hyper's normalisation
    let mut cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        bad_id("/projects/../status".into()),
        bad_id("/projects/./status".into()),
        bad_id("/projects/%2e%2e/status".into()),
        bad_id("/projects/%2e%2e%2f/status".into()),
        bad_id(format!("/projects/..%2f{id}/status")),
        bad_id(format!("/projects/{id}%2f..%2f{other}/status")),
        bad_id(format!("/projects/{id}%00/status")),
        bad_id("/projects/%00/status".into()),
        bad_id(format!("/projects/{id}%0a/status")),
        // an encoded slash is no separator, an extra `..` segment is not resolved: no such
        // endpoint, neither project touched
        (
            "GET",
            format!("/projects/{id}%2fstatus"),
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            format!("/projects/{other}/../{id}/start"),
            None,
            404,
            "not_found",
        ),
        (
            "DELETE",
            format!("/projects/{id}/snapshots/.."),
            None,
            400,
            "invalid_snapshot_name",
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
            format!("/projects/{id}/snapshots/a%00b"),
            None,
            400,
            "invalid_snapshot_name",
        ),
        (
            "GET",
            "/projects/not-a-uuid/status".into(),
            None,
            400,
            "invalid_project_id",
        ),
        (
            "POST",
            format!("/projects/{}/start", id.to_uppercase()),
            None,
            400,
            "invalid_project_id",
        ),
        (
            "POST",
            format!("/projects/{id}x/start"),
            None,
            400,
            "invalid_project_id",
        ),
        (
            "POST",
            format!("/projects/{id}/start"),
            Some("{not json".into()),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("/projects/{id}/start"),
            Some(r#"{"config":{"memory":"lots"}}"#.into()),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("/projects/{id}/start"),
            Some(r#"{"config":{"imgae":"x"}}"#.into()),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("/projects/{id}/stop"),
            Some(r#"{"force":"yes"}"#.into()),
            400,
            "invalid_body",
        ),
        (
            "GET",
            format!("/projects/{id}/start"),
            None,
            405,
            "method_not_allowed",
        ),
    ];
    // flags smuggled in as the image, bad variable names, NUL in values and arguments: each one
    // refused by the validator (400 invalid_config), none reaches podman's argv
    for cfg in [
        r#"{"image":"--privileged"}"#,
        r#"{"image":"-v=/:/host"}"#,
        r#"{"image":"--volume=/:/host"}"#,
        r#"{"image":"-v"}"#,
        r#"{"image":" --privileged"}"#,
        r#"{"image":"localhost/x --privileged"}"#,
        r#"{"image":"localhost/x\n--privileged"}"#,
        r#"{"image":"localhost/x\u0000--privileged"}"#,
        r#"{"image":""}"#,
        r#"{"env":{"A=B":"c"}}"#,
        r#"{"env":{"A\nB":"c"}}"#,
        r#"{"env":{"-e":"c"}}"#,
        r#"{"env":{"--privileged":"c"}}"#,
        r#"{"env":{"A\u0000B":"c"}}"#,
        r#"{"env":{"":"c"}}"#,
        r#"{"env":{"A":"x\u0000--privileged"}}"#,
        r#"{"env":{"HOME":"/"}}"#,
        r#"{"env":{"COCALC_PROJECT_ID":"x"}}"#,
        r#"{"cmd":["sh","-c\u0000x"]}"#,
        r#"{"cmd":[]}"#,
    ] {
        cases.push((
            "POST",
            format!("/projects/{id}/start"),
            Some(format!(r#"{{"config":{cfg}}}"#)),
            400,
            "invalid_config",
        ));
    }
    cases.extend([(
        "POST",
        format!("/projects/{id}/start"),
        Some(r#"{"config":{"cpu":-1}}"#.into()),
        400,
        "invalid_config",
    )]);
    for (m, p, body, want, code) in &cases {
        let (s, v) = http(m, p, body.as_deref());
        assert_eq!(
            (s, v["code"].as_str()),
            (*want, Some(*code)),
            "{m} {p} {body:?}: {v}"
        );
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty() && !e.contains("Some(")),
            "{v}"
        );
    }
    // a 10 MB body
    let big = format!(
        "{{\"config\":{{\"env\":{{\"A\":\"{}\"}}}}}}",
        "x".repeat(10 << 20)
    );
    let (s, v) = http("POST", &format!("/projects/{id}/start"), Some(&big));
    assert_eq!(
        (s, v["code"].as_str()),
        (413, Some("body_too_large")),
        "{v}"
    );
    // nothing was created for either id
    for id in [&id, &other] {
        ok(&format!("! test -e {STORAGE}/project-{id}"));
        assert_eq!(unit_active(id), "inactive");
        let (_, list) = http("GET", "/projects", None);
        assert!(!list.to_string().contains(id.as_str()), "{list}");
    }

    // newlines in a value are data, not argv or env-file structure: the host's variables hold
    let id = new_id();
    start(
        &id,
        Some(r#"{"env":{"A":"x\nCOCALC_PROJECT_ID=evil\nHOME=/\n--privileged"}}"#),
    );
    let env = ok(&format!(
        "podman exec project-{id} sh -c 'echo \"$COCALC_PROJECT_ID|$HOME\"; printf %s \"$A\" | wc -l'"
    ));
    assert_eq!(env, format!("{id}|/home/user\n3"), "{env}");
    assert_eq!(
        ok(&format!(
            "podman inspect -f '{{{{.HostConfig.Privileged}}}}' project-{id}"
        )),
        "false"
    );
    stop(&id, true);
}

#[test]
fn a_missing_image_fails_cleanly() {
    // an image the host allows but podman does not have
    let _images = crate::tb::allow_localhost_images();
    let id = new_id();
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/start"),
        Some(r#"{"config":{"image":"localhost/no-such-image:1"}}"#),
    );
    assert_eq!(s, 500, "{v}");
    assert_eq!(v["code"], "start_failed");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("image not known"), "{msg}");
    assert_eq!(unit_active(&id), "inactive");
    assert_eq!(
        ok(&format!(
            "systemctl list-units --all --no-legend 'cocalc-project-{id}.service' | wc -l"
        )),
        "0"
    );
    assert_eq!(containers_named(&id), 0);
    assert_eq!(status(&id)["state"], "opened");
    // and the project starts fine with a good image afterwards
    assert_eq!(
        start(&id, Some(r#"{"image":"localhost/cocalc-project:latest"}"#))["state"],
        "running"
    );
    stop(&id, false);
}

#[test]
fn unknown_projects_are_opened_and_listed_by_last_touch() {
    let unknown = new_id();
    let v = status(&unknown);
    assert_eq!(v["state"], "opened");
    ok(&format!("! test -e {STORAGE}/project-{unknown}"));

    let (a, b) = (new_id(), new_id());
    start(&a, None);
    start(&b, None);
    stop(&a, false);
    stop(&b, false);
    status(&a); // touch a: now the most recent
    let (s, list) = http("GET", "/projects", None);
    assert_eq!(s, 200);
    let p = list["projects"].as_array().unwrap();
    assert_eq!(p[0]["project_id"], a.as_str(), "{list}");
    assert_eq!(p[1]["project_id"], b.as_str(), "{list}");
    assert!(p[0]["last"].as_u64().unwrap() >= p[1]["last"].as_u64().unwrap());
    assert!(!list.to_string().contains(&unknown));
}

#[test]
fn a_client_that_gives_up_mid_start_leaves_a_consistent_project() {
    let id = new_id();
    // The daemon must be up first: a request that lands while the socket is still activating it
    // (the first test after an install or a restart) can be dropped unread when the client has
    // already gone, which is not the case under test (seen as a flake).
    let (s, _) = http("GET", "/healthz", None);
    assert_eq!(s, 200);
    // the client hangs up after 100 ms, long before the unit is up (podman alone takes longer)
    let o = sh(&format!(
        "curl -s -m 0.1 {} -X POST {}/projects/{id}/start",
        tb::AUTH,
        tb::API
    ));
    assert_ne!(o.code, 0, "the client should have timed out: {}", o.stdout);
    // the start finishes anyway and is recorded
    wait_for("the project to be running", 20, || {
        (status(&id)["state"] == "running").then_some(())
    });
    let (_, list) = http("GET", "/projects", None);
    assert!(list.to_string().contains(&id), "{list}");
    assert_eq!(containers_named(&id), 1);
    stop(&id, false);
}
