//! Access to the testbed machine: run commands inside, talk HTTP to the installed daemon.
//! The testbed must be up with the package installed (scripts/test does both); if it is not,
//! every test fails loudly.
//!
//! Two flavours serve the same tests, chosen by `TESTBED_FLAVOUR`: `nspawn` (default,
//! tests/testbed/testbed.sh: systemd-nspawn, the build host's cgroup v1 hybrid layout) and `vm`
//! (tests/testbed/vm.sh: a qemu VM with its own kernel and cgroup v2, under TCG). Waits scale by
//! `TESTBED_TIME_SCALE` (default 1, and 5 in the VM, which runs ~30x slower).
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Output of a command run inside the machine.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Which testbed the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// systemd-nspawn on the build host (cgroup v1 hybrid here)
    Nspawn,
    /// a qemu VM with Debian's kernel (cgroup v2)
    Vm,
}

pub fn flavour() -> Flavour {
    match std::env::var("TESTBED_FLAVOUR").as_deref() {
        Err(_) | Ok("" | "nspawn") => Flavour::Nspawn,
        Ok("vm") => Flavour::Vm,
        Ok(other) => panic!("TESTBED_FLAVOUR={other:?}: expected nspawn or vm"),
    }
}

fn script() -> String {
    let name = match flavour() {
        Flavour::Nspawn => "testbed.sh",
        Flavour::Vm => "vm.sh",
    };
    format!("{}/tests/testbed/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The factor for every wait of the harness (see the module doc).
pub fn time_scale() -> u64 {
    match std::env::var("TESTBED_TIME_SCALE") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("TESTBED_TIME_SCALE={v:?}: expected a whole number")),
        Err(_) if flavour() == Flavour::Vm => 5,
        Err(_) => 1,
    }
}

/// Whether the machine runs the unified cgroup v2 hierarchy. The VM flavour exists for it, so
/// there a v1 machine is a failure, not a reason to test less.
#[track_caller]
pub fn cgroup_v2() -> bool {
    let v2 = ok("stat -f -c %T /sys/fs/cgroup") == "cgroup2fs";
    if flavour() == Flavour::Vm {
        assert!(v2, "the VM testbed must have cgroup v2 at /sys/fs/cgroup");
    }
    v2
}

fn check_up() {
    static UP: Once = Once::new();
    UP.call_once(|| {
        let out = Command::new(script())
            .arg("exec")
            .arg("systemctl")
            .arg("is-system-running")
            .output();
        match out {
            Ok(o)
                if matches!(
                    String::from_utf8_lossy(&o.stdout).trim(),
                    "running" | "degraded"
                ) => {}
            Ok(o) => panic!(
                "the testbed is not up (run scripts/test, or tests/testbed/testbed.sh up): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run {}: {e}", script()),
        }
    });
}

/// Runs `cmd` with bash inside the machine, feeding `stdin`.
pub fn sh_in(cmd: &str, stdin: &[u8]) -> Out {
    check_up();
    let mut child = Command::new(script())
        .args(["exec", "bash", "-c", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn testbed exec");
    {
        let mut i = child.stdin.take().expect("stdin");
        // a command may exit without reading all of it
        let _ = i.write_all(stdin);
    }
    let o = child.wait_with_output().expect("wait testbed exec");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs `cmd` with bash inside the machine.
pub fn sh(cmd: &str) -> Out {
    sh_in(cmd, b"")
}

/// Runs `cmd` inside and asserts it succeeds; returns trimmed stdout.
#[track_caller]
pub fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert_eq!(
        o.code, 0,
        "`{cmd}` failed ({}):\n{}{}",
        o.code, o.stdout, o.stderr
    );
    o.stdout.trim().to_string()
}

pub const API: &str = "http://127.0.0.1:9002";

/// The admin token the package made, read inside the machine at each call.
pub const ADMIN_TOKEN_FILE: &str = "/etc/cocalc-project-host/admin-token";

/// curl arguments that send the admin token (for raw curl calls inside the machine).
pub const AUTH: &str = r#"-H "Authorization: Bearer $(cat /etc/cocalc-project-host/admin-token)""#;

/// Which credentials a request carries.
#[derive(Debug, Clone, Copy)]
pub enum As<'a> {
    /// the package's admin token
    Admin,
    /// no Authorization header
    Nobody,
    /// `Authorization: Bearer <token>`
    Bearer(&'a str),
}

/// An HTTP request to the daemon from inside the machine, with the admin token; returns status
/// and JSON body. The path is sent as given (`--path-as-is`: curl does not squash `/../`).
#[track_caller]
pub fn http(method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_as(As::Admin, method, path, body)
}

/// [`http`] with the given credentials.
#[track_caller]
pub fn http_as(who: As, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let auth = match who {
        As::Admin => AUTH.to_string(),
        As::Nobody => String::new(),
        As::Bearer(t) => format!("-H 'Authorization: Bearer {}'", t.replace('\'', "")),
    };
    let cmd = format!(
        "curl -sS --path-as-is -m {} {auth} -o /tmp/e2e-body.$$ -w '%{{http_code}}' -X {method} {} '{API}{path}'; r=$?; echo; cat /tmp/e2e-body.$$; rm -f /tmp/e2e-body.$$; exit $r",
        120 * time_scale(),
        if body.is_some() {
            "-H 'content-type: application/json' --data-binary @-"
        } else {
            ""
        }
    );
    let o = sh_in(&cmd, body.unwrap_or("").as_bytes());
    assert_eq!(o.code, 0, "curl {method} {path} failed: {}", o.stderr);
    let (status, rest) = o.stdout.split_once('\n').unwrap_or((&o.stdout, ""));
    let status: u16 = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status from curl: {:?}", o.stdout));
    let v = serde_json::from_str(rest)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {rest:?}"));
    (status, v)
}

#[track_caller]
pub fn start(id: &str, config: Option<&str>) -> Value {
    let body = config.map(|c| format!("{{\"config\":{c}}}"));
    let (s, v) = http("POST", &format!("/projects/{id}/start"), body.as_deref());
    assert_eq!(s, 200, "start {id}: {v}");
    v
}

#[track_caller]
pub fn stop(id: &str, force: bool) -> Value {
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/stop"),
        Some(&format!("{{\"force\":{force}}}")),
    );
    assert_eq!(s, 200, "stop {id}: {v}");
    v
}

#[track_caller]
pub fn status(id: &str) -> Value {
    let (s, v) = http("GET", &format!("/projects/{id}/status"), None);
    assert_eq!(s, 200, "status {id}: {v}");
    v
}

/// A fresh project id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Polls `f` until it returns `Some` or `secs` (× [`time_scale`]) pass.
#[track_caller]
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let secs = secs * time_scale();
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where project homes live in the machine (the package's default storage).
pub const STORAGE: &str = "/var/lib/cocalc-project-host/projects";

/// Copies a host file into the machine.
#[track_caller]
pub fn push(host_file: &std::path::Path, machine_path: &str) {
    check_up();
    let o = Command::new(script())
        .arg("push")
        .arg(host_file)
        .arg(machine_path)
        .output()
        .expect("spawn testbed push");
    assert!(
        o.status.success(),
        "push {} → {machine_path}: {}",
        host_file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A config drop-in in force (daemon restarted) while this lives.
pub struct DropIn(&'static str);

impl DropIn {
    pub fn install(path: &'static str, toml: &str) -> DropIn {
        // base64 through the shell: any text, quotes included
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(toml);
        ok(&format!(
            "mkdir -p $(dirname {path}) && echo {b64} | base64 -d > {path} && systemctl restart cocalc-project-host.service"
        ));
        DropIn(path)
    }
}

impl Drop for DropIn {
    fn drop(&mut self) {
        sh(&format!(
            "rm -f {}; systemctl restart cocalc-project-host.service",
            self.0
        ));
    }
}

/// Lets start configs name any `localhost/` image (the default allowlist is the default image
/// only), for tests that need podman itself to refuse a missing one.
pub fn allow_localhost_images() -> DropIn {
    DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-images.toml",
        "[projects]\nimages = [\"localhost/*\"]\n",
    )
}

/// Builds a static helper from tests/e2e/<name>.c on the host (the images have no compiler);
/// `-pthread` so helpers may start threads.
pub fn static_helper(name: &str) -> std::path::PathBuf {
    let out = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let src = format!("{}/tests/e2e/{name}.c", env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("cc")
        .args(["-static", "-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        o.status.success(),
        "cc -static {src}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The host's id, as the daemon reports it in a status.
pub fn host_id() -> String {
    let (s, v) = http("GET", &format!("/projects/{}/status", new_id()), None);
    assert_eq!(s, 200, "{v}");
    v["server"].as_str().unwrap().to_string()
}

/// A fresh master signing key: its 32-byte seed and its public key in base64, as
/// `auth.master_public_keys` takes it (the seed's randomness is the OS's, by v4 UUIDs).
pub fn master_key() -> ([u8; 32], String) {
    use base64::Engine as _;
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    (
        seed,
        base64::engine::general_purpose::STANDARD.encode(public),
    )
}
