//! The file server on the proxy listener (`/<id>/files/…`): uploads, Range downloads, listings,
//! deletes, mkdir, the quota (507 and nothing left), ownership by the project user, read-only
//! snapshots, and the attacks of a hostile project user: symlinks out of the home (static, and
//! swapped in a loop while requests run), `..`, absolute paths, NUL and overlong paths.
use crate::tb::{self, ADMIN_TOKEN_FILE, AUTH, STORAGE, http, new_id, ok, sh, start, stop};

const PROXY: &str = "http://127.0.0.1:8080";
const MIB: u64 = 1024 * 1024;

/// A curl call to the proxy with the admin token: status, body (as text) and the headers.
#[track_caller]
fn curl(args: &str, path: &str) -> (u16, String, String) {
    let cmd = format!(
        "curl -sS --path-as-is -m 120 {AUTH} -D /tmp/e2e-h.$$ -o /tmp/e2e-b.$$ -w '%{{http_code}}' {args} '{PROXY}{path}'; r=$?; echo; cat /tmp/e2e-b.$$; echo; echo '--headers--'; cat /tmp/e2e-h.$$; rm -f /tmp/e2e-b.$$ /tmp/e2e-h.$$; exit $r"
    );
    let o = sh(&cmd);
    assert_eq!(o.code, 0, "curl {args} {path}: {}", o.stderr);
    let (status, rest) = o.stdout.split_once('\n').unwrap();
    let (body, headers) = rest.rsplit_once("\n--headers--\n").unwrap();
    (
        status.trim().parse().unwrap(),
        body.to_string(),
        headers.to_lowercase(),
    )
}

#[track_caller]
fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn files(id: &str, path: &str) -> String {
    format!("/{id}/files/{path}")
}

fn exec(id: &str, cmd: &str) -> tb::Out {
    sh(&format!("podman exec project-{id} sh -c '{cmd}'"))
}

#[test]
fn upload_download_list_delete_and_mkdir_with_or_without_the_project_running() {
    let id = new_id();
    start(&id, None);
    // an upload creates its parents; the file is the project user's inside the container
    ok("printf 'hello, files' > /tmp/e2e-up.txt");
    let (s, b, _) = curl("-T /tmp/e2e-up.txt", &files(&id, "a/b/hello.txt"));
    assert_eq!(s, 201, "{b}");
    let v = json(&b);
    assert_eq!(
        (v["path"].as_str(), v["size"].as_u64()),
        (Some("a/b/hello.txt"), Some(12)),
        "{v}"
    );
    assert_eq!(
        exec(
            &id,
            "stat -c %u:%g:%a /home/user/a/b/hello.txt /home/user/a"
        )
        .stdout,
        "1000:1000:644\n1000:1000:755\n"
    );
    assert_eq!(
        exec(&id, "cat /home/user/a/b/hello.txt").stdout,
        "hello, files"
    );
    // replaced: 200, no temporary file left
    ok("printf 'hello, again' > /tmp/e2e-up.txt");
    let (s, b, _) = curl("-T /tmp/e2e-up.txt", &files(&id, "a/b/hello.txt"));
    assert_eq!(s, 200, "{b}");
    assert_eq!(exec(&id, "ls -A /home/user/a/b").stdout, "hello.txt\n");

    // download: whole, a range, a suffix, an unsatisfiable one; validators
    let (s, b, h) = curl("", &files(&id, "a/b/hello.txt"));
    assert_eq!((s, b.as_str()), (200, "hello, again"));
    assert!(h.contains("content-type: text/plain"), "{h}");
    assert!(
        h.contains("accept-ranges: bytes") && h.contains("last-modified:"),
        "{h}"
    );
    assert!(h.contains("content-security-policy: sandbox"), "{h}");
    let etag = h
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    let (s, b, h) = curl("-H 'Range: bytes=7-11'", &files(&id, "a/b/hello.txt"));
    assert_eq!((s, b.as_str()), (206, "again"), "{h}");
    assert!(h.contains("content-range: bytes 7-11/12"), "{h}");
    let (s, b, _) = curl("-H 'Range: bytes=-5'", &files(&id, "a/b/hello.txt"));
    assert_eq!((s, b.as_str()), (206, "again"));
    let (s, b, h) = curl("-H 'Range: bytes=12-'", &files(&id, "a/b/hello.txt"));
    assert_eq!(s, 416, "{b}");
    assert_eq!(json(&b)["code"], "range_not_satisfiable");
    assert!(h.contains("content-range: bytes */12"), "{h}");
    let (s, _, _) = curl(
        &format!("-H 'If-None-Match: {etag}'"),
        &files(&id, "a/b/hello.txt"),
    );
    assert_eq!(s, 304);
    let (s, b, _) = curl(
        "-H 'Range: bytes=0-4' -H 'If-Range: \"stale\"'",
        &files(&id, "a/b/hello.txt"),
    );
    assert_eq!((s, b.as_str()), (200, "hello, again"));
    // HEAD: the headers only (curl -I writes them where the body would go)
    let (s, b, h) = curl("-I", &files(&id, "a/b/hello.txt"));
    assert_eq!(s, 200);
    assert!(!b.contains("hello"), "{b}");
    assert!(h.contains("content-length: 12"), "{h}");

    // listings: JSON and a plain page with escaped names
    exec(
        &id,
        "touch \"/home/user/a/<b>&.txt\" && ln -s b /home/user/a/link",
    );
    let (s, b, _) = curl("", &files(&id, "a"));
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    let names: Vec<(&str, &str)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [("<b>&.txt", "file"), ("b", "dir"), ("link", "symlink")],
        "{v}"
    );
    assert_eq!(v["truncated"], false);
    assert!(
        v["entries"][1]["mtime"].as_u64().unwrap() > 1_700_000_000_000,
        "{v}"
    );
    let (s, b, h) = curl("", &format!("{}?format=html", files(&id, "a/")));
    assert_eq!(s, 200);
    assert!(h.contains("content-type: text/html"), "{h}");
    assert!(
        b.contains("&lt;b&gt;&amp;.txt") && !b.contains("<b>&"),
        "{b}"
    );
    assert!(b.contains("href=\"b/\""), "{b}");

    // mkdir, delete a file, an empty directory; a full one is refused
    let (s, b, _) = curl("-X POST", &format!("{}?mkdir", files(&id, "new/dir")));
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        exec(&id, "stat -c %u /home/user/new/dir").stdout.trim(),
        "1000"
    );
    let (s, _, _) = curl("-X POST", &format!("{}?mkdir", files(&id, "new/dir")));
    assert_eq!(s, 200, "mkdir of an existing directory is fine");
    let (s, b, _) = curl("-X POST", &format!("{}?mkdir", files(&id, "a/b/hello.txt")));
    assert_eq!(
        (s, json(&b)["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (s, b, _) = curl("-X DELETE", &files(&id, "new"));
    assert_eq!(
        (s, json(&b)["code"].as_str()),
        (409, Some("directory_not_empty"))
    );
    assert_eq!(curl("-X DELETE", &files(&id, "new/dir")).0, 204);
    assert_eq!(curl("-X DELETE", &files(&id, "a/link")).0, 204);
    assert_eq!(
        exec(&id, "ls /home/user/a/b").stdout,
        "hello.txt\n",
        "the link's target stays"
    );
    let (s, b, _) = curl("-X DELETE", &files(&id, "nothing-here"));
    assert_eq!((s, json(&b)["code"].as_str()), (404, Some("not_found")));
    let (s, b, _) = curl("-X PATCH", &files(&id, "a"));
    assert_eq!(
        (s, json(&b)["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // the project stopped: files are still served, written as its user
    stop(&id, false);
    let (s, b, _) = curl("", &files(&id, "a/b/hello.txt"));
    assert_eq!((s, b.as_str()), (200, "hello, again"));
    let (s, b, _) = curl("-T /tmp/e2e-up.txt", &files(&id, "while-stopped.txt"));
    assert_eq!(s, 201, "{b}");
    let base = ok(&format!("stat -c %u {STORAGE}/project-{id}"));
    assert_eq!(
        ok(&format!(
            "stat -c %u {STORAGE}/project-{id}/while-stopped.txt"
        )),
        base,
        "the home's owner (the project user) owns it"
    );
    start(&id, None);
    assert_eq!(
        exec(&id, "stat -c %u /home/user/while-stopped.txt")
            .stdout
            .trim(),
        "1000"
    );
    // a project without storage here
    let (s, b, _) = curl("", &files(&new_id(), ""));
    assert_eq!(
        (s, json(&b)["code"].as_str()),
        (404, Some("no_such_project"))
    );
    stop(&id, true);
    ok("rm -f /tmp/e2e-up.txt");
}

#[test]
fn snapshots_are_readable_and_read_only() {
    let id = new_id();
    start(&id, None);
    exec(&id, "echo v1 > /home/user/f.txt");
    let (s, v) = http(
        "POST",
        &format!("/projects/{id}/snapshots"),
        Some(r#"{"name":"s1"}"#),
    );
    assert_eq!(s, 201, "{v}");
    let (s, b, _) = curl("", &files(&id, ".snapshots/s1/f.txt"));
    assert_eq!((s, b.as_str()), (200, "v1\n"));
    let (s, b, _) = curl("", &files(&id, ".snapshots"));
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["entries"][0]["name"], "s1");
    ok("echo x > /tmp/e2e-x");
    for (args, path) in [
        ("-T /tmp/e2e-x", ".snapshots/s1/f.txt"),
        ("-T /tmp/e2e-x", ".snapshots/s1/new"),
        ("-T /tmp/e2e-x", ".snapshots"),
        ("-X DELETE", ".snapshots/s1/f.txt"),
        ("-X DELETE", ".snapshots/s1"),
        ("-X POST", ".snapshots/x?mkdir"),
    ] {
        let (s, b, _) = curl(args, &files(&id, path));
        assert_eq!(
            (s, json(&b)["code"].as_str()),
            (403, Some("read_only")),
            "{args} {path}"
        );
    }
    assert_eq!(
        ok(&format!("cat {STORAGE}/.snapshots/project-{id}/s1/f.txt")),
        "v1"
    );
    stop(&id, true);
}

#[test]
fn bad_paths_are_refused() {
    let id = new_id();
    start(&id, None);
    for (path, status) in [
        ("..", 400),
        ("a/../..", 400),
        ("%2e%2e/%2e%2e/etc/passwd", 400),
        ("a/%2e%2e/%2e%2e", 400),
        ("%2Fetc%2Fpasswd", 400),
        ("/etc/passwd", 400),
        ("a%00b", 400),
    ] {
        let (s, b, _) = curl("", &files(&id, path));
        assert_eq!(s, status, "{path}: {b}");
        assert!(!b.contains("root:"), "{path}: {b}");
    }
    let long = "x".repeat(300);
    let (s, b, _) = curl("", &files(&id, &long));
    assert_eq!((s, json(&b)["code"].as_str()), (400, Some("invalid_path")));
    let deep = "d/".repeat(2100);
    let (s, _, _) = curl("", &files(&id, &deep));
    assert!(s == 400 || s == 414 || s == 431, "{s}");
    stop(&id, true);
}

#[test]
fn a_write_past_the_quota_is_507_and_leaves_nothing() {
    let id = new_id();
    start(&id, Some(&format!("{{\"disk\":{}}}", 50 * MIB)));
    ok("head -c 80M /dev/urandom > /tmp/e2e-big");
    let (s, b, _) = curl("-T /tmp/e2e-big", &files(&id, "big"));
    assert_eq!(
        (s, json(&b)["code"].as_str()),
        (507, Some("quota_exceeded")),
        "{b}"
    );
    assert_eq!(
        exec(&id, "ls -A /home/user | grep -c -e ^big -e cocalc-upload")
            .stdout
            .trim(),
        "0"
    );
    // the space came back: a smaller file fits
    ok("head -c 10M /dev/urandom > /tmp/e2e-big");
    let (s, b, _) = curl("-T /tmp/e2e-big", &files(&id, "fits"));
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        exec(&id, "md5sum < /home/user/fits").stdout,
        ok("md5sum < /tmp/e2e-big") + "\n"
    );
    ok("rm -f /tmp/e2e-big");
    stop(&id, true);
}

#[test]
fn symlinks_out_of_the_home_never_leak_static_or_swapped() {
    let (id, other) = (new_id(), new_id());
    start(&id, None);
    start(&other, None);
    exec(&other, "echo OTHER-SECRET > /home/user/secret");
    let other_home = format!("../project-{other}");
    // static links: to a host file, into another project (relative and absolute), /proc magic
    exec(
        &id,
        &format!(
            "ln -s /etc/shadow /home/user/shadow; ln -s /etc /home/user/etc; \
             ln -s {other_home}/secret /home/user/rel; ln -s {STORAGE}/project-{other}/secret /home/user/abs; \
             ln -s /proc/1/root/etc/shadow /home/user/magic; mkdir /home/user/real; echo mine > /home/user/real/secret"
        ),
    );
    for p in ["shadow", "etc/shadow", "etc/passwd", "rel", "abs", "magic"] {
        let (s, b, _) = curl("", &files(&id, p));
        assert!(s == 403 || s == 404, "{p}: {s} {b}");
        assert!(
            !b.contains("root:") && !b.contains("OTHER-SECRET"),
            "{p}: {b}"
        );
    }
    let (s, _, _) = curl("-T /etc/hostname", &files(&id, "etc/planted"));
    assert!(s == 403 || s == 404, "{s}");
    ok("! test -e /etc/planted");

    // a link swapped as fast as the project user can, while requests go through it (renamed
    // over: `d` always exists, so an upload's parent creation never turns it into a directory)
    exec(
        &id,
        &format!(
            "cd /home/user && ln -s real d && (while :; do for t in real {other_home} real /etc real {STORAGE}/project-{other}; do ln -sfn $t d.new; mv -Tf d.new d; done; done) >/dev/null 2>&1 & echo $! > /tmp/swapper.pid"
        ),
    );
    let out = ok(&format!(
        "cd /tmp && t=$(cat {ADMIN_TOKEN_FILE}) && for i in $(seq 300); do \
         curl -s -w '\\n' -H \"Authorization: Bearer $t\" {PROXY}{} \
         --next -s -w '\\n' -H \"Authorization: Bearer $t\" {PROXY}{} \
         --next -s -o /dev/null -H \"Authorization: Bearer $t\" -T /etc/hostname {PROXY}{}; done",
        files(&id, "d/secret"),
        files(&id, "d/shadow"),
        files(&id, "d/planted"),
    ));
    exec(&id, "kill $(cat /tmp/swapper.pid)");
    let mine = out.lines().filter(|l| l.trim() == "mine").count();
    assert!(
        !out.contains("OTHER-SECRET"),
        "another project's file leaked"
    );
    assert!(!out.contains("root:"), "a host file leaked");
    assert!(
        mine >= 10,
        "the link led to the project's own file {mine} times: the race was not run"
    );
    println!("swapped link: {mine} of 300 reads got the project's own file, none another's");
    ok(&format!(
        "! test -e {STORAGE}/project-{other}/planted && ! test -e /etc/planted"
    ));
    stop(&id, true);
    stop(&other, true);
}

/// A 100 MB upload and download stream through the daemon with bounded memory: checksums
/// match and the daemon's RSS (sampled during both transfers) stays within a few buffers.
#[test]
fn large_transfers_stream_with_flat_memory() {
    let id = new_id();
    start(&id, None);
    ok("head -c 100M /dev/urandom > /var/tmp/e2e-100m");
    let pid = ok("systemctl show -p MainPID --value cocalc-project-host.service");
    let rss = format!("awk '/^VmRSS/ {{print $2}}' /proc/{pid}/status");
    let before: u64 = ok(&rss).parse().unwrap();
    // sample the RSS every 50 ms while the transfers run; the largest is kept
    let out = ok(&format!(
        "touch /var/tmp/e2e-sampling; echo 0 > /var/tmp/e2e-rss-max; \
         (m=0; while test -e /var/tmp/e2e-sampling; do r=$({rss}); [ \"$r\" -gt \"$m\" ] && m=$r; echo $m > /var/tmp/e2e-rss-max; sleep 0.05; done) & \
         up=$(curl -sS -m 300 {AUTH} -T /var/tmp/e2e-100m -o /dev/null -w '%{{speed_upload}}' {PROXY}{p}); \
         down=$(curl -sS -m 300 {AUTH} -o /var/tmp/e2e-100m.back -w '%{{speed_download}}' {PROXY}{p}); \
         rm /var/tmp/e2e-sampling; wait; echo $up $down $(cat /var/tmp/e2e-rss-max)",
        p = files(&id, "big.bin"),
    ));
    let f: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (up, down, max) = (f[0] / 1e6, f[1] / 1e6, f[2] as u64);
    assert_eq!(
        ok("sha256sum < /var/tmp/e2e-100m"),
        ok("sha256sum < /var/tmp/e2e-100m.back")
    );
    assert_eq!(
        ok(&format!("sha256sum < {STORAGE}/project-{id}/big.bin")),
        ok("sha256sum < /var/tmp/e2e-100m")
    );
    println!(
        "100 MB through /files/: upload {up:.0} MB/s, download {down:.0} MB/s; daemon RSS {before} kB before, at most {max} kB during"
    );
    assert!(
        max < before + 48 * 1024,
        "the daemon grew by {} kB during 100 MB transfers",
        max - before
    );
    ok("rm -f /var/tmp/e2e-100m /var/tmp/e2e-100m.back /var/tmp/e2e-rss-max");
    stop(&id, true);
}
