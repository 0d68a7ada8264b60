//! One wire schema: the same bad input gets the same answer over HTTP (status + JSON code), D-Bus
//! (error name) and the CLI (exit code), as the error table in `src/api/error.rs` says; and the
//! status reads the same on all three.
use cocalc_project_host::api::ErrorKind;
use serde_json::Value;

use crate::tb::{Out, http, http_as, new_id, ok, sh, start, stop};

const DEST: &str = "com.cocalc.ProjectHost1";
const MANAGER: &str = "/com/cocalc/ProjectHost1";
const NOBODY: &str = "setpriv --reuid=nobody --regid=nogroup --clear-groups";

/// The object path of a project, as the daemon answers it.
fn path(id: &str) -> String {
    let o = ok(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProject s {id}"
    ));
    o.trim_start_matches("o ").trim_matches('"').to_string()
}

/// The D-Bus error name of a failed call (`dbus-send` prints it; `busctl` only the message).
/// `call` is `<path> <interface.Method> <args…>` in dbus-send's syntax.
#[track_caller]
fn bus_error(prefix: &str, call: &str) -> String {
    let o = sh(&format!(
        "{prefix} dbus-send --system --print-reply --dest={DEST} {call}"
    ));
    assert_ne!(o.code, 0, "the call succeeded: {call}: {o:?}");
    o.stderr
        .trim()
        .strip_prefix("Error ")
        .and_then(|e| e.split(':').next())
        .unwrap_or_else(|| panic!("no error name from dbus-send: {o:?}"))
        .to_string()
}

/// One bad input over the three transports (`None`: that transport cannot express it).
struct Case<'a> {
    what: &'a str,
    http: (&'a str, String, Option<String>),
    bus: Option<String>,
    cli: Option<String>,
    want: ErrorKind,
    /// run the bus call and the CLI as nobody (HTTP: no token)
    anonymous: bool,
}

#[track_caller]
fn check(c: &Case<'_>) {
    let (method, p, body) = &c.http;
    let (status, v) = if c.anonymous {
        http_as(crate::tb::As::Nobody, method, p, body.as_deref())
    } else {
        http(method, p, body.as_deref())
    };
    let code = v["code"].as_str().unwrap_or_default();
    let kind = ErrorKind::from_code(code)
        .unwrap_or_else(|| panic!("{}: HTTP code {code:?} is not in the table: {v}", c.what));
    assert_eq!(kind, c.want, "{}: HTTP {status} {v}", c.what);
    assert_eq!(status, kind.status(), "{}: {v}", c.what);
    assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let prefix = if c.anonymous { NOBODY } else { "" };
    if let Some(call) = &c.bus {
        let name = bus_error(prefix, call);
        assert_eq!(name, kind.dbus_name(), "{}: D-Bus {call}", c.what);
    }
    if let Some(cmd) = &c.cli {
        let o: Out = sh(&format!("{prefix} cocalc-project-host {cmd}"));
        assert_eq!(
            o.code,
            i32::from(kind.exit_code()),
            "{}: CLI {cmd}: {o:?}",
            c.what
        );
        assert!(o.stdout.is_empty(), "{}: {o:?}", c.what);
        assert_eq!(o.stderr.lines().count(), 1, "one line: {o:?}");
    }
}

#[test]
fn same_bad_input_same_answer_over_http_dbus_and_cli() {
    let id = new_id();
    start(&id, None);
    let obj = path(&id);
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/snapshots"),
        Some(r#"{"name":"wire-r"}"#),
    );
    assert_eq!(s, 201, "{v}");
    let unknown = new_id();
    let m = format!("{MANAGER} com.cocalc.ProjectHost1.Manager");
    let p = format!("{obj} com.cocalc.ProjectHost1.Project");
    let start_bus = |json: &str| Some(format!("{m}.StartProject string:{id} string:'{json}'"));
    let start_http = |json: &str| {
        (
            "POST",
            format!("/projects/{id}/start"),
            Some(format!("{{\"config\":{json}}}")),
        )
    };
    let limits_http = |json: &str| ("PATCH", format!("/projects/{id}/config"), Some(json.into()));
    let limits_bus = |json: &str| Some(format!("{m}.SetProjectLimits string:{id} string:'{json}'"));
    let cases = [
        Case {
            what: "bad id",
            http: ("GET", "/projects/NOT-A-UUID/status".into(), None),
            bus: Some(format!("{m}.GetProjectStatus string:NOT-A-UUID")),
            cli: Some("status NOT-A-UUID".into()),
            want: ErrorKind::InvalidProjectId,
            anonymous: false,
        },
        Case {
            what: "bad id (uppercase uuid) to stop",
            http: (
                "POST",
                format!("/projects/{}/stop", id.to_uppercase()),
                None,
            ),
            bus: Some(format!(
                "{m}.StopProject string:{} boolean:false",
                id.to_uppercase()
            )),
            cli: Some(format!("stop {}", id.to_uppercase())),
            want: ErrorKind::InvalidProjectId,
            anonymous: false,
        },
        Case {
            what: "config as a positional array",
            http: start_http(r#"["localhost/x",1073741824]"#),
            bus: start_bus(r#"["localhost/x",1073741824]"#),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "config not an object",
            http: start_http("7"),
            bus: start_bus("7"),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "config with an unknown field",
            http: start_http(r#"{"imgae":"x"}"#),
            bus: start_bus(r#"{"imgae":"x"}"#),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "config with a wrong type",
            http: start_http(r#"{"memory":"lots"}"#),
            bus: start_bus(r#"{"memory":"lots"}"#),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "limits with an unknown field",
            http: limits_http(r#"{"cpuu":1}"#),
            bus: limits_bus(r#"{"cpuu":1}"#),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "limits as an array",
            http: limits_http("[1]"),
            bus: limits_bus("[1]"),
            cli: None,
            want: ErrorKind::InvalidBody,
            anonymous: false,
        },
        Case {
            what: "a limit out of range",
            http: limits_http(r#"{"cpu_weight":0}"#),
            bus: limits_bus(r#"{"cpu_weight":0}"#),
            cli: Some(format!("set-limits {id} --cpu-weight 0")),
            want: ErrorKind::InvalidConfig,
            anonymous: false,
        },
        Case {
            what: "bad snapshot name",
            http: ("DELETE", format!("/projects/{id}/snapshots/.x"), None),
            bus: Some(format!("{p}.DeleteSnapshot string:.x")),
            cli: Some(format!("snapshot delete {id} .x")),
            want: ErrorKind::InvalidSnapshotName,
            anonymous: false,
        },
        Case {
            what: "reserved snapshot name",
            http: (
                "POST",
                format!("/projects/{id}/snapshots"),
                Some(r#"{"name":"auto-x"}"#.into()),
            ),
            bus: Some(format!("{p}.CreateSnapshot string:auto-x")),
            cli: Some(format!("snapshot create {id} auto-x")),
            want: ErrorKind::InvalidSnapshotName,
            anonymous: false,
        },
        Case {
            what: "no such snapshot",
            http: ("DELETE", format!("/projects/{id}/snapshots/no-such"), None),
            bus: Some(format!("{p}.DeleteSnapshot string:no-such")),
            cli: Some(format!("snapshot delete {id} no-such")),
            want: ErrorKind::NoSuchSnapshot,
            anonymous: false,
        },
        Case {
            what: "no such project",
            http: ("GET", format!("/projects/{unknown}/snapshots"), None),
            bus: Some(format!("{m}.GetProject string:{unknown}")),
            cli: Some(format!("snapshot list {unknown}")),
            want: ErrorKind::NoSuchProject,
            anonymous: false,
        },
        Case {
            what: "restore while running",
            http: (
                "POST",
                format!("/projects/{id}/snapshots/wire-r/restore"),
                None,
            ),
            bus: Some(format!("{p}.RestoreSnapshot string:wire-r")),
            cli: Some(format!("snapshot restore {id} wire-r")),
            want: ErrorKind::ProjectRunning,
            anonymous: false,
        },
        Case {
            what: "no credential",
            http: ("POST", format!("/projects/{id}/stop"), None),
            bus: Some(format!("{m}.StopProject string:{id} boolean:false")),
            cli: Some(format!("stop {id}")),
            want: ErrorKind::Unauthorized,
            anonymous: true,
        },
    ];
    for c in &cases {
        check(c);
    }
    // none of it changed the project
    let (s, v) = http("GET", &format!("/projects/{id}/status"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    stop(&id, false);
}

/// Fields that change between two reads of a running project.
fn steady(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("memory_current");
        if let Some(d) = o.get_mut("disk").and_then(Value::as_object_mut) {
            d.remove("used");
        }
    }
    v
}

#[test]
fn status_reads_the_same_over_http_dbus_and_cli_disk_included() {
    let id = new_id();
    start(&id, None);
    const QUOTA: u64 = 64 << 20;
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/quota"),
        Some(&format!("{{\"disk\":{QUOTA}}}")),
    );
    assert_eq!(s, 200, "{v}");
    let over_http = crate::tb::status(&id);
    assert_eq!(over_http["disk"]["quota"], QUOTA, "{over_http}");

    // the bus's dict carries disk (an a{sv}) and keeps main_pid a u32
    let bus: Value = serde_json::from_str(&ok(&format!(
        "busctl --json=short call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager GetProjectStatus s {id}"
    )))
    .unwrap();
    let d = &bus["data"][0];
    assert_eq!(d["disk"]["type"], "a{sv}", "{bus}");
    assert_eq!(d["disk"]["data"]["quota"]["data"], QUOTA, "{bus}");
    assert_eq!(d["main_pid"]["type"], "u", "{bus}");
    assert_eq!(d["main_pid"]["data"], over_http["main_pid"], "{bus}");
    for k in over_http.as_object().unwrap().keys() {
        assert!(d.get(k).is_some(), "{k} missing on the bus: {bus}");
    }

    // the CLI decodes the bus's answer into the same type and prints HTTP's JSON
    let cli: Value =
        serde_json::from_str(&ok(&format!("cocalc-project-host status {id} --json"))).unwrap();
    assert_eq!(steady(cli), steady(over_http.clone()));
    let human = ok(&format!("cocalc-project-host status {id}"));
    assert!(human.contains("quota 64.0M"), "{human}");

    // the other answers too: snapshots over HTTP and the CLI
    let (s, snap) = http(
        "POST",
        &format!("/projects/{id}/snapshots"),
        Some(r#"{"name":"wire-1"}"#),
    );
    assert_eq!(s, 201, "{snap}");
    let (_, over_http) = http("GET", &format!("/projects/{id}/snapshots"), None);
    let cli: Value = serde_json::from_str(&ok(&format!(
        "cocalc-project-host snapshot list {id} --json"
    )))
    .unwrap();
    // the bus's tuple writes "unknown" as 0, so sizes are compared by presence only
    let names = |v: &Value| -> Vec<(Value, Value, Value)> {
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].clone(), s["kind"].clone(), s["created"].clone()))
            .collect()
    };
    assert_eq!(names(&cli), names(&over_http), "{cli} vs {over_http}");
    assert!(names(&cli).iter().any(|n| n.0 == "wire-1"), "{cli}");
    let cli: Value = serde_json::from_str(&ok(&format!(
        "cocalc-project-host snapshot delete {id} wire-1 --json"
    )))
    .unwrap();
    assert_eq!(cli, serde_json::json!({"deleted": "wire-1"}));
    stop(&id, false);
}
