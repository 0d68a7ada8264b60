//! The D-Bus interface, its policy and the CLI, against the installed daemon.
use crate::tb::{new_id, ok, sh, start, stop};

const DEST: &str = "com.cocalc.ProjectHost1";
const MANAGER: &str = "/com/cocalc/ProjectHost1";
pub const NOBODY: &str = "setpriv --reuid=nobody --regid=nogroup --clear-groups";

/// The object path of a project, escaped like systemd does.
pub fn path(id: &str) -> String {
    let mut p = String::from("/com/cocalc/ProjectHost1/project/");
    for (i, b) in id.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            p.push(b as char);
        } else {
            p += &format!("_{b:02x}");
        }
    }
    p
}

fn state_prop(id: &str) -> String {
    ok(&format!(
        "busctl get-property {DEST} {} com.cocalc.ProjectHost1.Project State",
        path(id)
    ))
}

#[test]
fn busctl_drives_projects_and_sees_their_objects() {
    let id = new_id();
    let out = ok(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {id} ''"
    ));
    assert!(
        out.starts_with("a{sv}") && out.contains("\"state\" s \"running\""),
        "{out}"
    );
    assert_eq!(
        ok(&format!("systemctl is-active cocalc-project-{id}")),
        "active"
    );
    let tree = ok(&format!("busctl tree --list {DEST}"));
    assert!(tree.lines().any(|l| l == path(&id)), "{tree}");
    assert_eq!(state_prop(&id), "s \"running\"");
    assert_eq!(
        ok(&format!(
            "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProject s {id}"
        )),
        format!("o \"{}\"", path(&id))
    );
    // the per-project object's own methods
    ok(&format!(
        "busctl call {DEST} {} com.cocalc.ProjectHost1.Project Stop b false",
        path(&id)
    ));
    assert_eq!(state_prop(&id), "s \"opened\"");
    assert_eq!(
        sh(&format!("systemctl is-active cocalc-project-{id}"))
            .stdout
            .trim(),
        "inactive"
    );
    let list = ok(&format!(
        "busctl --json=short call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager ListProjects"
    ));
    assert!(list.contains(&id), "{list}");

    // errors are named
    let o = sh(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProjectStatus s ../x"
    ));
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("invalid project id"), "{}", o.stderr);
    let o = sh(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProject s {}",
        new_id()
    ));
    assert!(o.stderr.contains("no such project"), "{}", o.stderr);
    let o = sh(&format!(
        "busctl --json=short call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {} '{{\"imgae\":1}}' 2>&1; \
         dbus-send --system --print-reply --dest={DEST} {MANAGER} com.cocalc.ProjectHost1.Manager.GetProject string:x 2>&1",
        new_id()
    ));
    assert!(o.stdout.contains("imgae"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("com.cocalc.ProjectHost1.Error.InvalidProjectId"),
        "{}",
        o.stdout
    );
}

#[test]
fn a_start_over_http_emits_the_dbus_signals() {
    let id = new_id();
    // a monitor on the bus while the project starts and stops over HTTP
    let out = ok(&format!(
        "timeout 20 busctl monitor --match 'type=signal,sender={DEST}' > /tmp/e2e-mon.$$ 2>&1 & m=$!
         # busctl says so once it is a monitor on the bus (after BecomeMonitor): wait for that
         for i in $(seq 100); do grep -q 'Monitoring bus message stream' /tmp/e2e-mon.$$ && break; sleep 0.05; done
         grep -q 'Monitoring bus message stream' /tmp/e2e-mon.$$ || {{ echo 'the monitor never became ready' >&2; cat /tmp/e2e-mon.$$ >&2; exit 1; }}
         curl -sf {auth} -X POST http://127.0.0.1:9002/projects/{id}/start >/dev/null
         curl -sf {auth} -X POST http://127.0.0.1:9002/projects/{id}/stop >/dev/null
         sleep 0.5; kill $m; wait $m 2>/dev/null; cat /tmp/e2e-mon.$$; rm -f /tmp/e2e-mon.$$",
        auth = crate::tb::AUTH
    ));
    let members: Vec<&str> = out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("Member="))
        .collect();
    assert!(members.contains(&"ProjectNew"), "{out}");
    assert!(members.contains(&"ProjectStateChanged"), "{out}");
    assert!(members.contains(&"PropertiesChanged"), "{out}");
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for state in ["running", "opened"] {
        let args = format!("MESSAGE \"ss\" {{ STRING \"{id}\"; STRING \"{state}\"; }}");
        assert!(
            flat.contains(&args),
            "no ProjectStateChanged({id}, {state}):\n{out}"
        );
    }
}

#[test]
fn only_operators_may_act_over_the_bus() {
    let id = new_id();
    start(&id, None);
    // other local users may not act (nor read projects: see
    // authority::local_users_outside_the_group_see_only_version_and_counts)
    for call in [
        format!("{MANAGER} com.cocalc.ProjectHost1.Manager StopProject sb {id} true"),
        format!(
            "{MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {} ''",
            new_id()
        ),
        format!("{} com.cocalc.ProjectHost1.Project Stop b true", path(&id)),
    ] {
        let o = sh(&format!("{NOBODY} busctl call {DEST} {call}"));
        assert_ne!(o.code, 0, "{call}");
        assert!(o.stderr.contains("Access denied"), "{call}: {}", o.stderr);
    }
    assert_eq!(
        ok(&format!("systemctl is-active cocalc-project-{id}")),
        "active"
    );

    // a member of group cocalc-project-host may
    ok(
        "getent passwd e2e-operator >/dev/null || useradd --system --no-create-home -G cocalc-project-host e2e-operator",
    );
    let op = "setpriv --reuid=e2e-operator --regid=nogroup --init-groups";
    ok(&format!(
        "{op} busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StopProject sb {id} false"
    ));
    assert_eq!(
        sh(&format!("systemctl is-active cocalc-project-{id}"))
            .stdout
            .trim(),
        "inactive"
    );
    ok(&format!("{op} cocalc-project-host start {id}"));
    assert_eq!(
        ok(&format!("systemctl is-active cocalc-project-{id}")),
        "active"
    );
    // nobody through the CLI: one clear line, exit 1
    let o = sh(&format!("{NOBODY} cocalc-project-host stop {id}"));
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr.trim(),
        "cocalc-project-host: access denied: this needs root or membership in group cocalc-project-host"
    );
    stop(&id, false);
}

#[test]
fn the_cli_is_a_systemctl_like_client() {
    let id = new_id();
    let out = ok(&format!(
        "cocalc-project-host start {id} --memory 256M --env GREETING=hi"
    ));
    assert!(out.starts_with(&format!("{id}: running")), "{out}");
    assert_eq!(
        ok(&format!("podman exec project-{id} sh -c 'echo $GREETING'")),
        "hi"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok("cocalc-project-host list --json")).unwrap();
    let me = list["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project_id"] == id.as_str())
        .cloned();
    assert_eq!(
        me.as_ref().map(|p| p["state"].clone()),
        Some("running".into()),
        "{list}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&format!("cocalc-project-host status {id} --json"))).unwrap();
    assert_eq!(st["state"], "running");
    assert_eq!(st["unit"], format!("cocalc-project-{id}.service"));
    // human output: an aligned table, no colour codes when not on a terminal, no debug formatting
    let table = ok("cocalc-project-host list");
    assert!(table.starts_with("PROJECT "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("  running  ")),
        "{table}"
    );
    for text in [&table, &out] {
        assert!(
            !text.contains('\x1b') && !text.contains("Some(") && !text.contains("Error {"),
            "{text}"
        );
    }
    // exit codes: 2 usage (invalid id, bad option), 4 no such project, 0 ok
    let o = sh("cocalc-project-host status not-a-uuid");
    assert_eq!(o.code, 2, "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    assert!(
        o.stderr.contains("invalid project id \"not-a-uuid\""),
        "{o:?}"
    );
    let o = sh(&format!("cocalc-project-host status {}", new_id()));
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.stderr.contains("no such project"), "{o:?}");
    assert_eq!(
        sh(&format!("cocalc-project-host start {id} --memory lots")).code,
        2
    );
    assert_eq!(sh("cocalc-project-host frobnicate").code, 2);
    let out = ok(&format!("cocalc-project-host stop {id}"));
    assert!(out.starts_with(&format!("{id}: opened")), "{out}");
    // a failure is exit 1 with the reason on one line (an allowed image podman does not have)
    let _images = crate::tb::allow_localhost_images();
    let o = sh(&format!(
        "cocalc-project-host start {} --image localhost/nope:1",
        new_id()
    ));
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.stderr.contains("image not known") && o.stderr.trim().lines().count() == 1,
        "{o:?}"
    );
}

/// Blocks of our own interfaces in an introspection document, whitespace-normalised.
fn our_interfaces(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<interface name=\"com.cocalc.ProjectHost1.") {
        let end = rest[i..]
            .find("</interface>")
            .map(|e| i + e + "</interface>".len())
            .unwrap_or(rest.len());
        // zbus introspects children recursively: keep each interface once
        let block = rest[i..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !out.contains(&block) {
            out.push(block);
        }
        rest = &rest[end..];
    }
    out
}

#[test]
fn the_checked_in_introspection_matches_the_daemon() {
    let id = new_id();
    start(&id, None);
    let mut live = our_interfaces(&ok(&format!(
        "busctl introspect --xml-interface {DEST} {MANAGER}"
    )));
    for block in our_interfaces(&ok(&format!(
        "busctl introspect --xml-interface {DEST} {}",
        path(&id)
    ))) {
        if !live.contains(&block) {
            live.push(block);
        }
    }
    stop(&id, false);
    assert_eq!(live.len(), 2, "{live:?}");
    let file = format!(
        "{}/dbus/com.cocalc.ProjectHost1.xml",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("UPDATE_DBUS_XML").is_some() {
        let xml = ok(&format!(
            "busctl introspect --xml-interface {DEST} {MANAGER}"
        ));
        let manager = &xml[xml
            .find("  <interface name=\"com.cocalc.ProjectHost1.Manager\"")
            .unwrap()..];
        let manager = &manager[..manager.find("</interface>").unwrap() + "</interface>".len()];
        start(&id, None);
        let pxml = ok(&format!(
            "busctl introspect --xml-interface {DEST} {}",
            path(&id)
        ));
        stop(&id, false);
        let project = &pxml[pxml
            .find("  <interface name=\"com.cocalc.ProjectHost1.Project\"")
            .unwrap()..];
        let project = &project[..project.find("</interface>").unwrap() + "</interface>".len()];
        let doc = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- com.cocalc.ProjectHost1: the manager object /com/cocalc/ProjectHost1 and the project objects\n     /com/cocalc/ProjectHost1/project/<escaped id>. Generated from the live daemon:\n     UPDATE_DBUS_XML=1 cargo test --features e2e --test e2e introspection -->\n<node>\n{manager}\n{project}\n</node>\n"
        );
        std::fs::write(&file, doc).unwrap();
    }
    let checked_in = our_interfaces(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        checked_in, live,
        "dbus/com.cocalc.ProjectHost1.xml drifted from the daemon: regenerate it with UPDATE_DBUS_XML=1"
    );
}

#[test]
fn limits_change_live_over_dbus_and_the_cli() {
    let id = new_id();
    start(&id, Some(r#"{"memory":67108864}"#));
    let unit = format!("cocalc-project-{id}");
    let pid = ok(&format!("systemctl show -p MainPID --value {unit}"));
    assert_eq!(
        ok(&format!("systemctl show -p MemoryMax --value {unit}")),
        "67108864"
    );
    let out = ok(&format!(
        "cocalc-project-host set-limits {id} --memory 256M --pids 300"
    ));
    assert!(
        out.starts_with(&format!("{id}: limits in force now")),
        "{out}"
    );
    assert_eq!(
        ok(&format!("systemctl show -p MemoryMax --value {unit}")),
        "268435456"
    );
    assert_eq!(
        ok(&format!("systemctl show -p TasksMax --value {unit}")),
        "300"
    );
    assert_eq!(
        ok(&format!("systemctl show -p MainPID --value {unit}")),
        pid,
        "no restart"
    );
    // over the bus, on the project object
    let d = ok(&format!(
        "busctl --json=short call {DEST} {} com.cocalc.ProjectHost1.Project SetLimits s '{{\"cpu\":0.5}}'",
        path(&id)
    ));
    assert!(d.contains("\"live\":{\"type\":\"b\",\"data\":true}"), "{d}");
    assert_eq!(
        ok(&format!(
            "systemctl show -p CPUQuotaPerSecUSec --value {unit}"
        )),
        "500ms"
    );
    // not for everyone, and bad values are named
    let o = sh(&format!(
        "{NOBODY} cocalc-project-host set-limits {id} --memory 1G"
    ));
    assert_eq!(o.code, 1, "{o:?}");
    let o = sh(&format!("cocalc-project-host set-limits {id} --cpu=-1"));
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("cpu"), "{o:?}");
    stop(&id, false);
}

#[test]
fn snapshots_and_quota_over_the_cli() {
    let id = new_id();
    start(&id, None);
    ok(&format!(
        "podman exec project-{id} sh -c 'echo one > /home/user/f.txt'"
    ));
    let out = ok(&format!(
        "cocalc-project-host snapshot create {id} before-change"
    ));
    assert_eq!(out, format!("{id}: snapshot before-change taken"));
    ok(&format!(
        "podman exec project-{id} sh -c 'echo two > /home/user/f.txt'"
    ));
    let list: serde_json::Value = serde_json::from_str(&ok(&format!(
        "cocalc-project-host snapshot list {id} --json"
    )))
    .unwrap();
    let snaps = list["snapshots"].as_array().unwrap();
    assert!(
        snaps
            .iter()
            .any(|s| s["name"] == "before-change" && s["kind"] == "manual"),
        "{list}"
    );
    let table = ok(&format!("cocalc-project-host snapshot list {id}"));
    assert!(
        table.starts_with("NAME ") && table.contains("before-change"),
        "{table}"
    );
    // restore needs the project stopped: exit 1 with the reason
    let o = sh(&format!(
        "cocalc-project-host snapshot restore {id} before-change"
    ));
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("stop it before restoring"), "{o:?}");
    stop(&id, false);
    ok(&format!(
        "cocalc-project-host snapshot restore {id} before-change"
    ));
    start(&id, None);
    assert_eq!(
        ok(&format!("podman exec project-{id} cat /home/user/f.txt")),
        "one"
    );
    // bad and unknown names, unknown projects
    assert_eq!(
        sh(&format!("cocalc-project-host snapshot create {id} ../x")).code,
        2
    );
    assert_eq!(
        sh(&format!("cocalc-project-host snapshot delete {id} no-such")).code,
        4
    );
    assert_eq!(
        sh(&format!("cocalc-project-host snapshot list {}", new_id())).code,
        4
    );
    ok(&format!(
        "cocalc-project-host snapshot delete {id} before-change"
    ));
    // quota through the CLI shows in the status, and btrfs holds it (the D-Bus/CLI status has
    // no disk figures: the daemon's status over HTTP is where it shows)
    ok(&format!("cocalc-project-host set-quota {id} 64M"));
    let st: serde_json::Value =
        serde_json::from_str(&ok(&format!("cocalc-project-host status {id} --json"))).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    let st = crate::tb::status(&id);
    assert_eq!(st["disk"]["quota"], 64u64 << 20, "{st}");
    let q = ok(&format!(
        "btrfs qgroup show --raw -re -f {}/project-{id} | tail -1",
        crate::tb::STORAGE
    ));
    assert_eq!(
        q.split_whitespace().nth(3),
        Some((64u64 << 20).to_string().as_str()),
        "{q}"
    );
    // the sweep the timer runs, over the bus
    let sweep: serde_json::Value =
        serde_json::from_str(&ok("cocalc-project-host snapshot-sweep")).unwrap();
    assert!(
        sweep["projects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["project_id"] == id.as_str()),
        "{sweep}"
    );
    let o = sh(&format!("{NOBODY} cocalc-project-host snapshot-sweep"));
    assert_eq!(o.code, 1, "{o:?}");
    stop(&id, false);
}
