//! The .deb's behaviour on a real systemd (issue 17): an upgrade restarts only the daemon, and
//! the man pages, completions and sysusers group are where systemd, man and the shells look.
use crate::tb::{self, http, ok, sh, start, stop};

const DEB: &str = "/xchg/cocalc-project-host.deb";

/// `systemctl show -p InvocationID --value UNIT`: new on each start of the unit.
fn invocation(unit: &str) -> String {
    ok(&format!("systemctl show -p InvocationID --value {unit}"))
}

#[test]
fn upgrade_restarts_only_the_daemon_and_projects_keep_running() {
    ok("test -f /xchg/cocalc-project-host.deb");
    let (s, _) = http("GET", "/healthz", None);
    assert_eq!(s, 200);
    let id = tb::new_id();
    start(&id, None);
    let project = format!("cocalc-project-{id}.service");
    let units = [
        "cocalc-project-host.socket",
        "cocalc-project-host-proxy.socket",
        "cocalc-project-host-ssh.socket",
        "cocalc-project-host-snapshots.timer",
        project.as_str(),
    ];
    let before: Vec<String> = units.iter().map(|u| invocation(u)).collect();
    let daemon = invocation("cocalc-project-host.service");
    assert!(!daemon.is_empty(), "the daemon runs before the upgrade");

    // dpkg -i over the installed package runs the upgrade path (postinst configure <old version>)
    ok(&format!("dpkg -i {DEB} >/dev/null"));

    for (u, b) in units.iter().zip(&before) {
        assert_eq!(&invocation(u), b, "{u} was restarted by the upgrade");
        assert_eq!(ok(&format!("systemctl is-active {u}")), "active", "{u}");
    }
    let after = invocation("cocalc-project-host.service");
    assert_ne!(after, daemon, "the daemon was not restarted by the upgrade");
    assert_eq!(
        ok("systemctl is-active cocalc-project-host.service"),
        "active"
    );
    // the restarted daemon adopted the project
    assert_eq!(tb::status(&id)["state"], "running");
    stop(&id, true);
}

#[test]
fn man_pages_completions_and_group_are_installed() {
    // Documentation= of every unit resolves to a page the package installs
    for unit in [
        "cocalc-project-host.service",
        "cocalc-project-host.socket",
        "cocalc-project-host-proxy.socket",
        "cocalc-project-host-ssh.socket",
        "cocalc-project-host-snapshots.timer",
        "cocalc-project-host-storage.service",
    ] {
        let doc = ok(&format!("systemctl show -p Documentation --value {unit}"));
        // systemctl quotes each URL
        assert_eq!(
            doc.trim_matches('"'),
            "man:cocalc-project-host(8)",
            "{unit}"
        );
    }
    let page = ok("zcat /usr/share/man/man8/cocalc-project-host.8.gz");
    // every subcommand `--help` lists has its own part of the page
    let help = ok("cocalc-project-host --help");
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a Commands: list")
        .lines()
        .skip(1) // the rest of the "Commands:" line
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{help}");
    for c in commands {
        assert!(
            page.contains(&format!(".SS \"cocalc-project-host {c}\"")),
            "{c} missing from cocalc-project-host(8)"
        );
    }
    let conf = ok("zcat /usr/share/man/man5/cocalc-project-host.toml.5.gz");
    assert!(conf.contains("[limits.max]"), "{conf}");
    // bash finds the completion by the command's name, and it completes subcommands
    // (the function is the word after -F in `complete -p`)
    let o = ok(
        "bash -c '. /usr/share/bash-completion/completions/cocalc-project-host \
         && for w in $(complete -p cocalc-project-host); do [ \"$p\" = -F ] && f=$w; p=$w; done \
         && COMP_WORDS=(cocalc-project-host snap) COMP_CWORD=1 \
         && $f cocalc-project-host snap cocalc-project-host \
         && echo \"${COMPREPLY[@]}\"'",
    );
    assert!(o.contains("snapshot"), "{o}");
    ok("test -s /usr/share/zsh/vendor-completions/_cocalc-project-host");
    ok("test -s /usr/share/fish/vendor_completions.d/cocalc-project-host.fish");
    // the D-Bus group, made by systemd-sysusers from the package's sysusers.d
    let g = sh("getent group cocalc-project-host");
    assert_eq!(g.code, 0, "no group cocalc-project-host");
}
