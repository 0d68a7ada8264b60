//! The public side (cocalc-project-host-proxy.socket, :8080) with real clients inside the
//! machine: busybox httpd in a `network: none` project reached through both path forms, 100 MB
//! streamed each way with checksums and the daemon's RSS, a WebSocket round trip through an echo
//! backend (python3 raw-socket client), the cookie exchange with curl's cookie jar, and the
//! refusals (401/403/400/502/503/504), including what a hostile project tries: reading the
//! host's credentials from the requests it gets, setting the host's cookie, walking out of its
//! prefix.
use serde_json::{Value, json};

use crate::tb::{self, DropIn, new_id, ok, sh, sh_in, stop, wait_for};

const PROXY: &str = "http://127.0.0.1:8080";

/// The project's command: httpd on 8000 over its home (with the port form's base path too), a
/// CGI that echoes its environment (the request headers as HTTP_*), one that checksums its
/// body, 100 MB of random data with its md5, a WebSocket-style echo on 9000 (nc running a script
/// that answers the upgrade, then cat), and a server on 7000 that never answers.
fn project_cmd() -> String {
    let ws = r#"#!/bin/sh
while read -r l; do l=$(printf %s "$l" | tr -d "\r"); [ -z "$l" ] && break; done
printf "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
exec cat
"#;
    let script = format!(
        r#"set -e
cd /home/user
mkdir -p cgi-bin "$COCALC_PROJECT_ID/port/8000"
echo hello > hello.txt
cp hello.txt "$COCALC_PROJECT_ID/port/8000/"
printf '#!/bin/sh\necho Content-Type: text/plain\necho\nenv\n' > cgi-bin/env
printf '#!/bin/sh\necho Content-Type: text/plain\necho\nmd5sum\n' > cgi-bin/sum
printf '%s' '{ws}' > ws.sh
chmod +x cgi-bin/env cgi-bin/sum ws.sh
nc -ll -p 9000 -e /home/user/ws.sh &
nc -ll -p 7000 -e sleep 600 &
head -c 104857600 /dev/urandom > big
md5sum big | cut -d" " -f1 > big.md5
echo ok > ready
exec httpd -f -p 8000 -h /home/user"#
    );
    json!({"network": "none", "cmd": ["/bin/sh", "-c", script]}).to_string()
}

/// A project serving [`project_cmd`], ready (its files written).
struct Project {
    id: String,
}

impl Project {
    fn start() -> Project {
        Project::start_at(PROXY, "")
    }

    /// Started and waited for through the proxy at `base` (with extra curl options).
    fn start_at(base: &str, curl_opts: &str) -> Project {
        let id = new_id();
        tb::start(&id, Some(&project_cmd()));
        let p = Project { id };
        wait_for("the project's server and files", 60, || {
            let o = sh(&format!(
                "curl -sf {curl_opts} {} {base}/{}/server/8000/ready",
                tb::AUTH,
                p.id
            ));
            (o.stdout.trim() == "ok").then_some(())
        });
        p
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        stop(&self.id, true);
    }
}

/// `curl -s` inside the machine with `args`; (status, body).
fn curl(args: &str) -> (u16, String) {
    let o = sh(&format!(
        "curl -s --path-as-is -m 30 -o /tmp/px-body.$$ -w '%{{http_code}}' {args}; r=$?; echo; cat /tmp/px-body.$$; rm -f /tmp/px-body.$$; exit $r"
    ));
    assert_eq!(o.code, 0, "curl {args}: {}", o.stderr);
    let (status, body) = o.stdout.split_once('\n').unwrap_or((&o.stdout, ""));
    (status.trim().parse().unwrap(), body.to_string())
}

fn code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    v["code"].as_str().unwrap_or_default().to_string()
}

fn daemon_rss_kib() -> u64 {
    ok("ps -o rss= -p $(systemctl show -p MainPID --value cocalc-project-host.service)")
        .parse()
        .unwrap()
}

#[test]
fn busybox_httpd_through_both_forms_with_clean_headers_and_100mb_each_way() {
    let p = Project::start();
    let id = &p.id;
    let auth = tb::AUTH;
    // both forms: /port/ keeps the path (httpd serves <home>/<id>/port/8000/…), /server/ strips
    assert_eq!(
        curl(&format!("{auth} {PROXY}/{id}/port/8000/hello.txt")),
        (200, "hello\n".into())
    );
    assert_eq!(
        curl(&format!("{auth} {PROXY}/{id}/server/8000/hello.txt")),
        (200, "hello\n".into())
    );
    // what the project's server sees: no host credential, the X-Forwarded-* fields
    let (s, env) = curl(&format!(
        "{auth} -H 'Cookie: app=1; cocalc_project_host=stolen?' -H 'X-Forwarded-For: 192.0.2.9' {PROXY}/{id}/server/8000/cgi-bin/env"
    ));
    assert_eq!(s, 200, "{env}");
    println!("CGI environment:\n{env}");
    assert!(!env.contains("HTTP_AUTHORIZATION"), "{env}");
    assert!(!env.contains("cocalc_project_host"), "{env}");
    let token = ok(&format!("cat {}", tb::ADMIN_TOKEN_FILE));
    assert!(!env.contains(&token), "the admin token reached the project");
    assert!(
        env.contains(&format!("HTTP_X_FORWARDED_PREFIX=/{id}/server/8000")),
        "{env}"
    );
    assert!(env.contains("HTTP_X_FORWARDED_PROTO=http"), "{env}");
    assert!(
        env.contains("HTTP_X_FORWARDED_FOR=192.0.2.9, 127.0.0.1"),
        "{env}"
    );
    assert!(
        env.contains("HTTP_X_FORWARDED_HOST=127.0.0.1:8080"),
        "{env}"
    );

    // 100 MB down, 100 MB up, streamed: checksums match and the daemon's RSS stays flat
    let rss0 = daemon_rss_kib();
    let want = curl(&format!("{auth} {PROXY}/{id}/server/8000/big.md5")).1;
    let t = std::time::Instant::now();
    let got = ok(&format!(
        "curl -sf -m 120 {auth} {PROXY}/{id}/server/8000/big | md5sum | cut -d' ' -f1"
    ));
    let down = t.elapsed();
    assert_eq!(got, want.trim(), "download checksum");
    ok(
        "head -c 104857600 /dev/urandom > /var/tmp/px-up && md5sum /var/tmp/px-up | cut -d' ' -f1 > /var/tmp/px-up.md5",
    );
    let t = std::time::Instant::now();
    let sum = ok(&format!(
        "curl -sf -m 120 {auth} -H 'Content-Type: application/octet-stream' --data-binary @/var/tmp/px-up {PROXY}/{id}/server/8000/cgi-bin/sum | cut -d' ' -f1"
    ));
    let up = t.elapsed();
    assert_eq!(sum, ok("cat /var/tmp/px-up.md5"), "upload checksum");
    sh("rm -f /var/tmp/px-up /var/tmp/px-up.md5");
    let rss1 = daemon_rss_kib();
    println!(
        "100 MB down in {down:?}, up in {up:?}; daemon RSS {rss0} KiB before, {rss1} KiB after"
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "daemon RSS grew by {} KiB over 200 MB streamed",
        rss1.saturating_sub(rss0)
    );
}

#[test]
fn a_websocket_round_trip_through_the_proxy() {
    let p = Project::start();
    // a raw-socket client: the upgrade, then bytes both ways through the tunnel
    let client = format!(
        r#"
import socket, sys
tok = open("{file}").read().strip()
s = socket.create_connection(("127.0.0.1", 8080), timeout=10)
s.sendall(("GET /{id}/server/9000/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok +
           "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    c = s.recv(1)
    if not c: sys.exit("closed during the head: %r" % head)
    head += c
print(head.split(b"\r\n")[0].decode())
for msg in [b"hello through the tunnel\n", b"x" * 65536 + b"\n"]:
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        c = s.recv(65536)
        if not c: sys.exit("closed after %d bytes" % len(got))
        got += c
    assert got == msg, (len(got), len(msg))
print("echoed")
"#,
        file = tb::ADMIN_TOKEN_FILE,
        id = p.id
    );
    let o = sh_in("python3 -", client.as_bytes());
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.starts_with("HTTP/1.1 101"), "{}", o.stdout);
    assert!(o.stdout.contains("echoed"), "{}", o.stdout);
}

#[test]
fn the_token_is_exchanged_for_a_cookie_and_refusals_are_clear() {
    let p = Project::start();
    let id = &p.id;
    let jar = "/tmp/px-jar";
    sh(&format!("rm -f {jar}"));
    // ?token= → 303 to the same URL without it, with the cookie; the jar then is enough
    let o = ok(&format!(
        "curl -s -o /dev/null -c {jar} -D - '{PROXY}/{id}/server/8000/hello.txt?a=1&token='$(cat {})",
        tb::ADMIN_TOKEN_FILE
    ));
    assert!(o.starts_with("HTTP/1.1 303"), "{o}");
    let lower = o.to_lowercase();
    assert!(
        lower.contains(&format!("location: /{id}/server/8000/hello.txt?a=1\r")),
        "{o}"
    );
    assert!(lower.contains(&format!("path=/{id}/")), "{o}");
    assert!(
        lower.contains("httponly") && lower.contains("samesite=lax"),
        "{o}"
    );
    assert_eq!(
        curl(&format!("-b {jar} {PROXY}/{id}/server/8000/hello.txt")),
        (200, "hello\n".into())
    );
    // followed by curl: one request with the token ends at the page
    assert_eq!(
        curl(&format!(
            "-L -c {jar}.2 -b {jar}.2 '{PROXY}/{id}/port/8000/hello.txt?token='$(cat {})",
            tb::ADMIN_TOKEN_FILE
        )),
        (200, "hello\n".into())
    );
    // the cookie is this project's only: another project's path refuses it (403)
    let other = new_id();
    let (s, b) = curl(&format!(
        "-H 'Cookie: cocalc_project_host='$(awk '/cocalc_project_host/ {{print $7}}' {jar}) {PROXY}/{other}/server/8000/"
    ));
    assert_eq!((s, code(&b)), (403, "forbidden".into()), "{b}");
    // a tampered cookie, no credential: 401 JSON, and a page for browsers
    let (s, b) = curl(&format!(
        "-H 'Cookie: cocalc_project_host=x.y' {PROXY}/{id}/server/8000/"
    ));
    assert_eq!((s, code(&b)), (401, "invalid_token".into()));
    let (s, b) = curl(&format!("{PROXY}/{id}/server/8000/"));
    assert_eq!((s, code(&b)), (401, "unauthorized".into()));
    let (s, b) = curl(&format!("-H 'Accept: text/html' {PROXY}/{id}/server/8000/"));
    assert_eq!(s, 401);
    assert!(b.starts_with("<!doctype html>"), "{b}");
    sh(&format!("rm -f {jar} {jar}.2"));

    let auth = tb::AUTH;
    // 400: bad ports, a walk out of the prefix, a bad id
    for path in [
        format!("/{id}/port/0/"),
        format!("/{id}/port/65536/"),
        format!("/{id}/server/x/"),
        format!("/{id}/server/8000/../../{other}/server/8000/"),
        "/not-a-project/port/8000/".to_string(),
    ] {
        let (s, b) = curl(&format!("{auth} '{PROXY}{path}'"));
        assert_eq!(s, 400, "{path}: {b}");
    }
    // 502 within a second on a closed port
    let t = std::time::Instant::now();
    let (s, b) = curl(&format!("{auth} {PROXY}/{id}/server/8001/"));
    assert_eq!((s, code(&b)), (502, "backend_unavailable".into()), "{b}");
    assert!(
        t.elapsed().as_millis() < 1500,
        "{:?} (with the exec round trip)",
        t.elapsed()
    );
    // 503 for a project that does not run
    let (s, b) = curl(&format!("{auth} {PROXY}/{other}/server/8000/"));
    assert_eq!((s, code(&b)), (503, "project_not_running".into()), "{b}");
}

#[test]
fn a_hanging_backend_is_504_after_the_timeout() {
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-proxy.toml",
        "[proxy]\ntimeout = 2\n",
    );
    let p = Project::start();
    let t = std::time::Instant::now();
    let (s, b) = curl(&format!("{} {PROXY}/{}/server/7000/", tb::AUTH, p.id));
    assert_eq!((s, code(&b)), (504, "backend_timeout".into()), "{b}");
    let e = t.elapsed().as_secs_f64();
    assert!((1.9..6.0).contains(&e), "answered after {e}s");
}

#[test]
fn a_daemon_restart_loses_no_proxied_request() {
    let p = Project::start();
    // requests back to back while the daemon restarts: systemd holds the socket, the old daemon
    // finishes what it accepted, the new one (having adopted the project) answers the rest
    let out = ok(&format!(
        "(for i in $(seq 1 150); do curl -s -m 30 -o /dev/null -w '%{{http_code}}\\n' {} {PROXY}/{}/server/8000/hello.txt; done > /tmp/px-codes) & \
         sleep 0.5; systemctl restart cocalc-project-host.service; wait; sort /tmp/px-codes | uniq -c; rm -f /tmp/px-codes",
        tb::AUTH,
        p.id
    ));
    println!("{out}");
    assert_eq!(
        out.trim(),
        "150 200",
        "every request answered 200 across the restart"
    );
}

/// A self-signed certificate for 127.0.0.1 made on the host (the machine has no openssl), put
/// at `/etc/cocalc-project-host/proxy.{crt,key}` inside.
fn install_cert(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("px-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let o = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            &format!("/CN={tag}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl");
    assert!(
        o.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    tb::push(&crt, &format!("/etc/cocalc-project-host/proxy-{tag}.crt"));
    tb::push(&key, &format!("/etc/cocalc-project-host/proxy-{tag}.key"));
    let _ = std::fs::remove_dir_all(&dir);
    ok(&format!(
        "cp /etc/cocalc-project-host/proxy-{tag}.crt /etc/cocalc-project-host/proxy.crt && \
         cp /etc/cocalc-project-host/proxy-{tag}.key /etc/cocalc-project-host/proxy.key && \
         chmod 600 /etc/cocalc-project-host/proxy*.key"
    ));
    format!("/etc/cocalc-project-host/proxy-{tag}.crt")
}

#[test]
fn tls_serves_secure_cookies_and_reloads_its_certificate_on_sighup() {
    let first = install_cert("first");
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-proxy-tls.toml",
        "[proxy]\ntls_cert = \"/etc/cocalc-project-host/proxy.crt\"\ntls_key = \"/etc/cocalc-project-host/proxy.key\"\n",
    );
    let p = Project::start_at("https://127.0.0.1:8080", &format!("--cacert {first}"));
    let id = &p.id;
    let base = "https://127.0.0.1:8080";
    assert_eq!(
        curl(&format!(
            "--cacert {first} {} {base}/{id}/server/8000/hello.txt",
            tb::AUTH
        )),
        (200, "hello\n".into())
    );
    let (s, env) = curl(&format!(
        "--cacert {first} {} {base}/{id}/server/8000/cgi-bin/env",
        tb::AUTH
    ));
    assert_eq!(s, 200);
    assert!(env.contains("HTTP_X_FORWARDED_PROTO=https"), "{env}");
    let head = ok(&format!(
        "curl -s -o /dev/null -D - --cacert {first} '{base}/{id}/server/8000/?token='$(cat {})",
        tb::ADMIN_TOKEN_FILE
    ));
    assert!(head.to_lowercase().contains("; secure"), "{head}");
    // plain HTTP on the TLS listener gets nothing served
    let o = sh(&format!(
        "curl -sf -m 5 {} http://127.0.0.1:8080/{id}/server/8000/hello.txt",
        tb::AUTH
    ));
    assert_ne!(o.code, 0, "plain HTTP answered: {}", o.stdout);
    // a new certificate, SIGHUP: new connections get it, the daemon keeps running
    let pid = ok("systemctl show -p MainPID --value cocalc-project-host.service");
    let second = install_cert("second");
    ok("systemctl kill -s HUP cocalc-project-host.service");
    wait_for("the reloaded certificate", 10, || {
        let o = sh(&format!(
            "curl -sf --cacert {second} {} {base}/{id}/server/8000/hello.txt",
            tb::AUTH
        ));
        (o.code == 0).then_some(())
    });
    let o = sh(&format!(
        "curl -sf --cacert {first} {} {base}/{id}/server/8000/hello.txt",
        tb::AUTH
    ));
    assert_ne!(o.code, 0, "the old certificate is still served");
    assert_eq!(
        ok("systemctl show -p MainPID --value cocalc-project-host.service"),
        pid
    );
    sh("rm -f /etc/cocalc-project-host/proxy*.crt /etc/cocalc-project-host/proxy*.key");
}

#[test]
fn a_master_token_of_one_project_is_refused_on_another() {
    let (seed, b64) = tb::master_key();
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-proxy-master.toml",
        &format!("[auth]\nmaster_public_keys = [\"{b64}\"]\n"),
    );
    let p = Project::start();
    let (a, b) = (p.id.clone(), new_id());
    let now = cocalc_project_host::auth::now_secs();
    let token = |actions: &[&str]| {
        cocalc_project_host::auth::sign(
            &seed,
            &json!({"aud": tb::host_id(), "sub": "e2e", "exp": now + 600,
                    "scope": {"projects": [a], "actions": actions}}),
        )
        .unwrap()
    };
    let proxy_only = token(&["proxy"]);
    let bearer = |t: &str| format!("-H 'Authorization: Bearer {t}'");
    assert_eq!(
        curl(&format!(
            "{} {PROXY}/{a}/server/8000/hello.txt",
            bearer(&proxy_only)
        )),
        (200, "hello\n".into())
    );
    // project B with A's token: by header and by ?token=
    let (s, body) = curl(&format!(
        "{} {PROXY}/{b}/server/8000/hello.txt",
        bearer(&proxy_only)
    ));
    assert_eq!((s, code(&body)), (403, "forbidden".into()), "{body}");
    let (s, body) = curl(&format!(
        "'{PROXY}/{b}/server/8000/hello.txt?token={proxy_only}'"
    ));
    assert_eq!((s, code(&body)), (403, "forbidden".into()), "{body}");
    // A's files need the files action; a status-only token may not proxy
    let (s, body) = curl(&format!(
        "{} {PROXY}/{a}/files/hello.txt",
        bearer(&proxy_only)
    ));
    assert_eq!((s, code(&body)), (403, "forbidden".into()), "{body}");
    let (s, body) = curl(&format!(
        "{} {PROXY}/{a}/server/8000/hello.txt",
        bearer(&token(&["status"]))
    ));
    assert_eq!((s, code(&body)), (403, "forbidden".into()), "{body}");
}

#[test]
fn autostart_off_is_503_at_once_and_on_an_authorized_request_starts_the_project() {
    let p = Project::start();
    let id = p.id.clone();
    stop(&id, false);
    let auth = tb::AUTH;
    // default off: a stopped project is 503 project_not_running at once, and stays stopped
    let t = std::time::Instant::now();
    let (s, b) = curl(&format!("{auth} {PROXY}/{id}/server/8000/hello.txt"));
    assert_eq!((s, code(&b)), (503, "project_not_running".into()), "{b}");
    assert!(
        t.elapsed().as_millis() < 1500,
        "{:?} (with the exec round trip)",
        t.elapsed()
    );
    assert_eq!(tb::status(&id)["state"], "opened");

    // on: with a master key too, for a token that is valid but for another project
    let (seed, b64) = tb::master_key();
    let _d = DropIn::install(
        "/etc/cocalc-project-host/config.d/90-e2e-proxy-autostart.toml",
        &format!("[proxy]\nautostart = true\n[auth]\nmaster_public_keys = [\"{b64}\"]\n"),
    );
    let other = new_id();
    let now = cocalc_project_host::auth::now_secs();
    let others_token = cocalc_project_host::auth::sign(
        &seed,
        &json!({"aud": tb::host_id(), "sub": "e2e", "exp": now + 600,
                "scope": {"projects": [other], "actions": ["proxy"]}}),
    )
    .unwrap();
    // unauthorized requests do not start it: no credential, a bad one, another project's
    let (s, b) = curl(&format!("{PROXY}/{id}/server/8000/hello.txt"));
    assert_eq!((s, code(&b)), (401, "unauthorized".into()), "{b}");
    let (s, b) = curl(&format!(
        "-H 'Authorization: Bearer x.y.z' {PROXY}/{id}/server/8000/hello.txt"
    ));
    assert_eq!(s, 401, "{b}");
    let (s, b) = curl(&format!(
        "-H 'Authorization: Bearer {others_token}' {PROXY}/{id}/server/8000/hello.txt"
    ));
    assert_eq!((s, code(&b)), (403, "forbidden".into()), "{b}");
    let (s, b) = curl(&format!(
        "'{PROXY}/{id}/server/8000/hello.txt?token={others_token}'"
    ));
    assert_eq!((s, code(&b)), (403, "forbidden".into()), "{b}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        tb::status(&id)["state"],
        "opened",
        "started by a refused request"
    );

    // an authorized request starts it, waits for its server and is answered
    let t = std::time::Instant::now();
    let (s, b) = curl(&format!("{auth} {PROXY}/{id}/server/8000/hello.txt"));
    println!("answered after an autostart in {:?}", t.elapsed());
    assert_eq!((s, b.as_str()), (200, "hello\n"), "{b}");
    assert_eq!(tb::status(&id)["state"], "running");

    // an id this host does not know is not created: 503, and it stays unknown
    let (s, b) = curl(&format!("{auth} {PROXY}/{other}/server/8000/hello.txt"));
    assert_eq!((s, code(&b)), (503, "project_not_running".into()), "{b}");
    assert_eq!(tb::status(&other)["state"], "opened", "not created");
    let (_, list) = tb::http("GET", "/projects", None);
    assert!(!list.to_string().contains(&other), "{list}");
}
