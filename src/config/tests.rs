use super::*;
use crate::domain::limits::Amount;
use crate::domain::project::NetworkMode;

fn m(frags: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    merge(frags.iter().map(|(p, t)| (Path::new(*p), *t)))
}

#[test]
fn defaults_hold_with_no_files() {
    assert_eq!(m(&[]).unwrap(), Settings::default());
}

#[test]
fn later_fragments_win() {
    let s = m(&[
        (
            "/usr/lib/x/config.d/10.toml",
            "[projects]\nimage = \"a/b:1\"\nstop_timeout = 3\n",
        ),
        (
            "/etc/x/config.d/10.toml",
            "[projects]\nimage = \"c/d:2\"\n[storage]\nimage_size = \"1G\"\n",
        ),
    ])
    .unwrap();
    assert_eq!(s.projects.image, "c/d:2");
    assert_eq!(s.projects.stop_timeout, Duration::from_secs(3));
    assert_eq!(s.storage.image_size, 1 << 30);
}

#[test]
fn a_typo_names_file_and_key() {
    let e = m(&[("/etc/x/config.toml", "[projects]\nimgae = \"x\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/etc/x/config.toml: "), "{e}");
    assert!(e.contains("imgae"), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn bad_values_name_file_and_key() {
    let e = m(&[("/etc/x/a.toml", "[projects]\nuid_base = 0\n")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "/etc/x/a.toml: projects.uid_base: must not be 0: container root must not be host root"
    );
    let e = m(&[("/etc/x/a.toml", "[storage]\nimage_size = \"12Q\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("suffix"), "{e}");
}

#[test]
fn limits_and_slice_merge_and_validate() {
    let s = m(&[
        (
            "/usr/lib/x/config.d/50.toml",
            "[limits]\nmemory = \"512M\"\npids = 300\ncpu = 2\n[limits.max]\ncpu = 4.5\n",
        ),
        (
            "/etc/x/config.d/50.toml",
            "[limits]\npids = 400\nswap = true\n[limits.max]\nswap = true\n[slice]\nmemory_max = \"8G\"\ntasks_max = \"50%\"\ncpu_weight = 20\n",
        ),
    ])
    .unwrap();
    let d = &s.limits.default;
    assert_eq!(
        (d.memory, d.pids, d.cpu, d.swap),
        (512 << 20, 400, 2.0, true)
    );
    assert_eq!(s.limits.max.cpu, 4.5);
    assert_eq!(s.slice.memory_max, Amount::Absolute(8 << 30));
    assert_eq!(s.slice.tasks_max, Amount::Percent(50));
    assert_eq!(s.slice.cpu_weight, 20);

    let err = |t: &str| {
        m(&[("/etc/x/config.d/60.toml", t)])
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("[limits]\ncpu = 0\n"),
        "/etc/x/config.d/60.toml: limits.cpu: 0 is not a number of cores in [0.01, 1024]"
    );
    assert!(
        err("[limits]\nmemory = \"64G\"\n")
            .starts_with("/etc/x/config.d/60.toml: limits.memory: 68719476736 is above"),
        "{}",
        err("[limits]\nmemory = \"64G\"\n")
    );
    assert!(err("[limits.max]\npids = 0\n").contains(": limits.max.pids: "));
    // the defaults stay within the maxima; the maxima's own keys parse
    assert!(err("[limits]\nswap = true\n").contains(": limits.swap: "));
    assert!(
        err("[storage]\ndisk_quota = \"2G\"\n[limits.max]\ndisk = \"1G\"\n")
            .contains(": storage.disk_quota: 2147483648 is above limits.max.disk")
    );
    assert!(err("[limits.max]\nnetwork = []\n").contains(": limits.max.network: "));
    assert!(
        err("[limits.max]\nnetwork = [\"slirp4netns\"]\n")
            .contains("does not allow projects.network = \"none\"")
    );
    assert!(err("[limits.max]\nnetwork = [\"host\"]\n").contains("host"));
    let s = m(&[(
        "/etc/x/a.toml",
        "[limits.max]\ndisk = \"50G\"\nscratch = \"1G\"\ntmp = \"64M\"\nnetwork = [\"none\"]\n",
    )])
    .unwrap();
    let mx = &s.limits.max;
    assert_eq!((mx.disk, mx.scratch, mx.tmp), (50 << 30, 1 << 30, 64 << 20));
    assert!(!mx.network.contains(NetworkMode::Slirp4netns));
    assert!(err("[limits]\nio_weight = 0\n").contains(": limits.io_weight: "));
    assert!(err("[slice]\nmemory_max = \"150%\"\n").contains(": slice.memory_max: "));
    assert!(err("[slice]\ncpu_weight = 0\n").contains(": slice.cpu_weight: "));
    assert!(err("[slice]\ntasks_max = \"x%\"\n").contains("percentage"));
    let e = err("[limits]\nmemroy = \"1G\"\n");
    assert!(
        e.starts_with("/etc/x/config.d/60.toml: ") && e.contains("memroy") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn only_harmless_capabilities_may_be_kept() {
    let s = m(&[(
        "/etc/x/a.toml",
        "[projects]\ncapabilities = [\"NET_RAW\", \"CHOWN\"]\n",
    )])
    .unwrap();
    assert_eq!(s.projects.capabilities, ["NET_RAW", "CHOWN"]);
    let e = m(&[(
        "/etc/x/a.toml",
        "[projects]\ncapabilities = [\"SYS_ADMIN\"]\n",
    )])
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("/etc/x/a.toml: projects.capabilities: \"SYS_ADMIN\" may not"),
        "{e}"
    );
}

#[test]
fn the_shipped_config_is_the_defaults() {
    let text = include_str!("../../packaging/config.toml");
    assert_eq!(m(&[("config.toml", text)]).unwrap(), Settings::default());
    // uncommented, every documented key parses and still gives the defaults
    // ca_file and pin_sha256 exclude each other: the example pin is parsed on its own below
    let pin = text
        .lines()
        .find_map(|l| l.strip_prefix("#pin_sha256 = "))
        .expect("packaging/config.toml documents master.pin_sha256");
    let alone = format!("[master]\npin_sha256 = {pin}\n");
    assert!(
        m(&[("config.toml", &alone)])
            .unwrap()
            .master
            .pin_sha256
            .is_some()
    );
    let uncommented: String = text
        .lines()
        .filter(|l| !l.starts_with("#pin_sha256 = "))
        .map(|l| {
            l.strip_prefix('#')
                .filter(|r| !r.starts_with(' ') && !r.is_empty())
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut s = m(&[("config.toml", &uncommented)]).unwrap();
    // the example values that are not defaults
    s.storage.mount = None;
    s.projects.cmd = None;
    s.projects.images.clear();
    (s.storage.scratch, s.storage.tmp) = (None, None);
    s.auth.master_public_keys.clear();
    s.auth.admin_token_file = None;
    s.auth.master_issuer = None;
    s.proxy.listen = None;
    s.ssh.listen = None;
    (s.proxy.tls_cert, s.proxy.tls_key) = (None, None);
    (s.http.tls_cert, s.http.tls_key) = (None, None);
    s.moves.ca_file = None;
    let m = &mut s.master;
    (m.url, m.ca_file, m.name, m.region) = (None, None, None, None);
    (m.public_url, m.ssh_endpoint) = (None, None);
    assert_eq!(s, Settings::default());
}

#[test]
fn storage_and_snapshot_settings_merge_and_validate() {
    let s = m(&[(
        "/etc/x/config.toml",
        "[storage]\ndisk_quota = \"3G\"\ntmp = \"64M\"\n[snapshots]\ndaily = 3\nskip_untouched = \"2w\"\n",
    )])
    .unwrap();
    assert_eq!(s.storage.disk_quota, Some(3 << 30));
    assert_eq!(s.storage.tmp, Some(64 << 20));
    assert_eq!(s.storage.scratch, None);
    assert_eq!(s.snapshots.retention.daily, 3);
    assert_eq!(s.snapshots.retention.frequent, 4);
    assert_eq!(s.snapshots.skip_untouched, Duration::from_secs(14 * 86_400));
    assert!(s.snapshots.enabled);
    // a fresh install has a quota and a reserve; no limit only when said so
    let d = Settings::default();
    assert_eq!(d.storage.disk_quota, Some(10 << 30));
    assert_eq!(d.storage.reserve, Amount::Percent(5));
    let s = m(&[(
        "/etc/x/a.toml",
        "[storage]\ndisk_quota = \"unlimited\"\nreserve = \"1G\"\n",
    )])
    .unwrap();
    assert_eq!(s.storage.disk_quota, None);
    assert_eq!(s.storage.reserve, Amount::Absolute(1 << 30));
    let e = m(&[("/etc/x/a.toml", "[storage]\ndisk_quota = \"none\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unlimited"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[storage]\nreserve = \"60%\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("storage.reserve: 60% is more than 50%"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[http]\nmax_connections_per_peer = 0\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("http.max_connections_per_peer"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[ssh]\nkeepalive = \"0s\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ssh.keepalive: must be 1s to 1h"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[ssh]\nlisten = \"nope\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid socket address"), "{e}");
    let ok = m(&[(
        "/etc/x/a.toml",
        "[ssh]\nlisten = \"127.0.0.1:2222\"\nautostart = true\nkeepalive = \"10s\"\n",
    )])
    .expect("valid [ssh]");
    assert_eq!(ok.ssh.listen, Some("127.0.0.1:2222".parse().expect("addr")));
    assert!(ok.ssh.autostart);
    assert_eq!(ok.ssh.keepalive, std::time::Duration::from_secs(10));
    let e = m(&[("/etc/x/a.toml", "[storage]\ndisk_quota = 5\n")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/etc/x/a.toml: storage.disk_quota: must be at least"),
        "{e}"
    );
    let e = m(&[("/etc/x/a.toml", "[snapshots]\nhourly = 5\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("hourly"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[snapshots]\nskip_untouched = \"3y\"\n")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/etc/x/a.toml: ") && e.contains("\"3y\"") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn auth_keys_are_checked_at_load() {
    let s = m(&[(
        "/etc/x/a.toml",
        "[auth]\nmaster_public_keys = [\"Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\"]\nmax_token_lifetime = 600\n",
    )])
    .unwrap();
    assert_eq!(s.auth.master_public_keys.len(), 1);
    assert_eq!(s.auth.max_token_lifetime, Duration::from_secs(600));
    let e = m(&[("/etc/x/a.toml", "[auth]\nmaster_public_keys = [\"abc\"]\n")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/etc/x/a.toml: auth.master_public_keys: key 1"),
        "{e}"
    );
    let e = m(&[("/etc/x/a.toml", "[auth]\nadmin_token_file = \"t\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("auth.admin_token_file"), "{e}");
    let s = m(&[(
        "/etc/x/a.toml",
        "[auth]\nmaster_issuer = \"https://m.example\"\n",
    )])
    .unwrap();
    assert_eq!(s.auth.master_issuer.as_deref(), Some("https://m.example"));
    let e = m(&[("/etc/x/a.toml", "[auth]\nmaster_issuer = \"\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("auth.master_issuer"), "{e}");
}

#[test]
fn load_applies_overrides_and_masks_and_refuses_symlinked_fragments() {
    use std::os::unix::fs::symlink;
    let d = std::env::temp_dir().join(format!("cph-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let (usr, etc) = (d.join("usr"), d.join("etc"));
    for r in [&usr, &etc] {
        std::fs::create_dir_all(r.join("config.d")).unwrap();
    }
    std::fs::write(usr.join("config.d/50.toml"), "[limits]\npids = 300\n").unwrap();
    std::fs::write(etc.join("config.d/50.toml"), "[limits]\ncpu_weight = 7\n").unwrap();
    std::fs::write(usr.join("config.d/60.toml"), "[limits]\nmemroy = 1\n").unwrap();
    symlink("/dev/null", etc.join("config.d/60.toml")).unwrap();
    let roots = [usr.clone(), etc.clone()];
    let s = load(&roots).unwrap();
    // /etc's 50.toml replaced /usr/lib's whole file; the broken 60.toml is masked
    assert_eq!(
        s.limits.default.pids,
        Settings::default().limits.default.pids
    );
    assert_eq!(s.limits.default.cpu_weight, 7);
    let link = etc.join("config.d/70.toml");
    symlink(usr.join("config.d/50.toml"), &link).unwrap();
    let e = load(&roots).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: ", link.display())), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn image_allowlist_and_journal_rate_limit_parse_and_are_checked() {
    let s = m(&[(
        "/etc/x/a.toml",
        "[projects]\nimages = [\"docker.io/library/*:*\"]\nlog_rate_limit_interval = \"1m\"\nlog_rate_limit_burst = 50\n",
    )])
    .unwrap();
    assert_eq!(s.projects.images, ["docker.io/library/*:*"]);
    assert_eq!(s.projects.log_rate_limit_interval, Duration::from_secs(60));
    assert_eq!(s.projects.log_rate_limit_burst, 50);
    let e = m(&[("/etc/x/a.toml", "[projects]\nimages = [\"a/[b\"]\n")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/etc/x/a.toml: projects.images: "), "{e}");
    let e = m(&[(
        "/etc/x/a.toml",
        "[projects]\nlog_rate_limit_interval = \"2h\"\n",
    )])
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "/etc/x/a.toml: projects.log_rate_limit_interval: must be at most 3600 seconds"
    );
}

#[test]
fn proxy_settings_merge_and_validate() {
    let s = m(&[(
        "/etc/x/a.toml",
        "[proxy]\nlisten = \"127.0.0.1:8081\"\ntimeout = \"5s\"\nautostart = true\n",
    )])
    .unwrap();
    assert_eq!(s.proxy.listen, Some("127.0.0.1:8081".parse().unwrap()));
    assert_eq!(s.proxy.timeout, Duration::from_secs(5));
    assert!(s.proxy.autostart);
    for (toml, key) in [
        ("timeout = 0", "proxy.timeout"),
        ("autostart_timeout = \"1h\"", "proxy.autostart_timeout"),
        (
            "max_connections_per_peer = 0",
            "proxy.max_connections_per_peer",
        ),
        ("tls_cert = \"/c.pem\"", "proxy.tls_key"),
        (
            "tls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
            "proxy.tls_cert",
        ),
    ] {
        let e = m(&[("/etc/x/a.toml", &format!("[proxy]\n{toml}\n"))])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
}

#[test]
fn the_master_section_merges_and_names_bad_keys() {
    let s = m(&[
        (
            "/usr/lib/x/config.toml",
            "[master]\nurl = \"https://m.example/fleet\"\nname = \"h1\"\nheartbeat_interval = \"10s\"\n",
        ),
        ("/etc/x/config.d/50.toml", "[master]\nregion = \"eu\"\noutbox_limit = 5\n"),
    ])
    .unwrap();
    assert_eq!(s.master.url.as_deref(), Some("https://m.example/fleet"));
    assert_eq!(s.master.name.as_deref(), Some("h1"));
    assert_eq!(s.master.region.as_deref(), Some("eu"));
    assert_eq!(s.master.heartbeat_interval, Duration::from_secs(10));
    assert_eq!(s.master.outbox_limit, 5);
    let e = m(&[("/etc/x/a.toml", "[master]\nurl = \"http://192.0.2.7\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/etc/x/a.toml: master.url: "), "{e}");
    assert!(e.contains("loopback"), "{e}");
    let e = m(&[("/etc/x/a.toml", "[master]\ncredential = \"secret\"\n")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("credential"), "never a config value: {e}");
}

#[test]
fn api_tls_and_move_trust_merge_and_validate() {
    let s = m(&[(
        "/etc/x/a.toml",
        "[http]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n[moves]\nallow_http = true\npin_sha256 = \"ab:cd\"\n",
    )]);
    let e = s.unwrap_err().to_string();
    assert!(
        e.contains("moves.pin_sha256") && e.contains("/etc/x/a.toml"),
        "{e}"
    );
    let s = m(&[(
        "/etc/x/a.toml",
        &format!(
            "[http]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n[moves]\nallow_http = true\npin_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ),
    )])
    .unwrap();
    assert_eq!(s.http.tls_cert.as_deref(), Some(Path::new("/c.pem")));
    assert_eq!(s.http.tls_key.as_deref(), Some(Path::new("/k.pem")));
    assert!(s.moves.allow_http);
    assert_eq!(s.moves.pin_sha256, Some("ab".repeat(32)));
    assert!(
        !Settings::default().moves.allow_http,
        "plain http is opt-in"
    );
    let pin = format!("pin_sha256 = \"{}\"", "ab".repeat(32));
    for (toml, key) in [
        (
            "[http]\ntls_cert = \"/c.pem\"",
            "a.toml: http.tls_cert: needs http.tls_key",
        ),
        (
            "[http]\ntls_key = \"/k.pem\"",
            "a.toml: http.tls_key: needs http.tls_cert",
        ),
        (
            "[http]\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
            "http.tls_cert",
        ),
        ("[moves]\nca_file = \"ca.pem\"", "moves.ca_file"),
        ("[moves]\npin_sha256 = \"zz\"", "moves.pin_sha256"),
        (
            &format!("[moves]\nca_file = \"/ca.pem\"\n{pin}"),
            "moves.pin_sha256",
        ),
        ("[moves]\nallow_http = \"yes\"", "expected a boolean"),
    ] {
        let e = m(&[("/etc/x/a.toml", toml)]).unwrap_err().to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
}
