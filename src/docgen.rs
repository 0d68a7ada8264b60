//! Manual pages and shell completions, made from the code when the packages are built
//! (`cocalc-project-host generate man|completions DIR`, run by `packaging/stage.sh` for the .deb
//! and the RPM), so that they list every subcommand and config key of this build:
//!
//! - `cocalc-project-host.8`: clap's definitions (clap_mangen), every visible subcommand in one
//!   COMMANDS section;
//! - `cocalc-project-host.toml.5`: the keys of [`crate::config::keys`] (read from the config
//!   code), each explained by its comment block in `packaging/config.toml` (the file installed as
//!   `/etc/cocalc-project-host/config.toml`). A key without a comment block there is an error
//!   here and fails `docgen::tests`: document a new key in that one file.
//! - completions for bash, zsh and fish (clap_complete).
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::api::error::{EXIT_FAILURE, EXIT_NO_SUCH_PROJECT, EXIT_OK, EXIT_USAGE};

/// The documented configuration: the packaged config.toml, every key commented out with its
/// default or an example (the page tells which, see [`config_page`]) and explained by the
/// comment lines above it.
pub const CONFIG_DOC: &str = include_str!("../packaging/config.toml");

/// Name of the program, its man pages and completion files.
const NAME: &str = "cocalc-project-host";

/// Writes `cocalc-project-host.8` and `cocalc-project-host.toml.5` into `dir`.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (file, page) in [
        (format!("{NAME}.8"), program_page(cmd)?),
        (
            format!("{NAME}.toml.5"),
            config_page(CONFIG_DOC).map_err(io::Error::other)?,
        ),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, page)?;
        out.push(path);
    }
    Ok(out)
}

/// Writes the completions under the names each shell looks for: `DIR/bash/cocalc-project-host`,
/// `DIR/zsh/_cocalc-project-host` and `DIR/fish/cocalc-project-host.fish`.
pub fn completions(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    // clap (without its `string` feature) names commands with &'static str: the one command
    // of this short-lived `generate` run is leaked to lend its names to the copy
    let mut cmd = visible(Box::leak(Box::new(cmd)));
    let mut out = Vec::new();
    for (sh, file) in [
        (Shell::Bash, NAME.to_string()),
        (Shell::Zsh, format!("_{NAME}")),
        (Shell::Fish, format!("{NAME}.fish")),
    ] {
        let path = dir.join(sh.to_string()).join(file);
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        let mut f = std::fs::File::create(&path)?;
        clap_complete::generate(sh, &mut cmd, NAME, &mut f);
        f.flush()?;
        out.push(path);
    }
    Ok(out)
}

/// `cmd` without its hidden subcommands (clap_complete would offer them): a copy with the names,
/// texts and arguments completion needs.
fn visible(cmd: &'static clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(visible),
        );
    if let Some(v) = cmd.get_version() {
        out = out.version(v);
    }
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    out
}

/// cocalc-project-host(8): clap's page, with a COMMANDS section holding every visible subcommand
/// (its synopsis and options), then exit status, files and related pages.
pub fn program_page(cmd: clap::Command) -> io::Result<String> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .source(format!("{NAME} {version}"))
        .manual("System Administration");
    let mut w = Vec::new();
    man.render_title(&mut w)?;
    man.render_name_section(&mut w)?;
    man.render_synopsis_section(&mut w)?;
    man.render_description_section(&mut w)?;
    Roff::new()
        .control("PP", [])
        .text([
            roman("The daemon ("),
            bold("serve"),
            roman(
                ") is socket-activated by cocalc-project-host.socket (the HTTP API), \
                 cocalc-project-host-proxy.socket and cocalc-project-host-ssh.socket, and owns \
                 com.cocalc.ProjectHost1 on the system bus. The other commands are its clients \
                 over D-Bus (members of the group cocalc-project-host, or root) or prepare it.",
            ),
        ])
        .to_writer(&mut w)?;
    man.render_options_section(&mut w)?;
    writeln!(w, ".SH COMMANDS")?;
    commands(&cmd, &mut w)?;
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, what) in [
        (EXIT_OK, "success"),
        (
            EXIT_FAILURE,
            "failure (the daemon refused or could not do it; the message says why)",
        ),
        (
            EXIT_USAGE,
            "bad usage or input (an unknown option, a malformed id or value)",
        ),
        (EXIT_NO_SUCH_PROJECT, "this host does not know the project"),
    ] {
        r.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(what)]);
    }
    r.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/cocalc-project-host/config.toml",
            "the configuration, see cocalc-project-host.toml(5)",
        ),
        (
            "/etc/cocalc-project-host/config.d/*.toml",
            "drop-ins (also in /run and /usr/lib), read after config.toml",
        ),
        (
            "/etc/cocalc-project-host/admin-token",
            "the API's admin token, made once at installation (root only)",
        ),
        (
            "/var/lib/cocalc-project-host/",
            "the store (state.db) and the default project storage (projects.img, mounted on projects/)",
        ),
    ] {
        r.control("TP", []).text([italic(path)]).text([roman(what)]);
    }
    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "cocalc-project-host.toml(5), systemctl(1), journalctl(1), busctl(1), systemd-cgtop(1), \
         systemd.socket(5), podman(1), btrfs(8)",
    )]);
    r.to_writer(&mut w)?;
    String::from_utf8(w).map_err(io::Error::other)
}

/// One `.SS` per visible subcommand, depth first, with its synopsis and options (clap_mangen's
/// sections, their `.SH` headings dropped).
fn commands(cmd: &clap::Command, w: &mut Vec<u8>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        let mut r = Roff::new();
        r.control("SS", [full.as_str()]);
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            r.text([roman(about.to_string())]);
        }
        r.to_writer(w)?;
        if sub.has_subcommands() {
            commands(sub, w)?;
            continue;
        }
        let man = clap_mangen::Man::new(sub.clone());
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut part)?;
        }
        let part = String::from_utf8(part).map_err(io::Error::other)?;
        for line in part.lines() {
            if line.starts_with(".SH ") {
                writeln!(w, ".PP")?;
            } else {
                writeln!(w, "{line}")?;
            }
        }
    }
    Ok(())
}

/// The config documentation, parsed: an introduction, then per table its keys, each with the
/// value shown and the comment block explaining it (shared by keys written one after another).
#[derive(Debug, Default)]
struct ConfigDoc {
    intro: Vec<String>,
    tables: Vec<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// `""` for the top level
    name: String,
    entries: Vec<Entry>,
    /// comment lines after the table's last key
    notes: Vec<String>,
}

#[derive(Debug, Default)]
struct Entry {
    prose: Vec<String>,
    /// (key, value shown)
    keys: Vec<(String, String)>,
}

impl ConfigDoc {
    fn parse(text: &str) -> ConfigDoc {
        let mut doc = ConfigDoc::default();
        let mut table = Table::default();
        let mut prose: Vec<String> = Vec::new();
        let mut in_intro = true;
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                if in_intro {
                    doc.intro.append(&mut prose);
                    in_intro = false;
                }
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table.notes.append(&mut prose);
                doc.tables.push(std::mem::take(&mut table));
                table.name = name.to_string();
                continue;
            }
            if let Some((key, value)) = key_line(line) {
                in_intro = false;
                match table.entries.last_mut() {
                    // a key right after another one shares its comment block
                    Some(e) if prose.is_empty() => e.keys.push((key, value)),
                    _ => table.entries.push(Entry {
                        prose: std::mem::take(&mut prose),
                        keys: vec![(key, value)],
                    }),
                }
                continue;
            }
            let text = line.strip_prefix('#').unwrap_or(line);
            prose.push(text.strip_prefix(' ').unwrap_or(text).to_string());
        }
        table.notes.append(&mut prose);
        doc.tables.push(table);
        doc
    }

    /// Every documented key, dotted, with its entry.
    fn keys(&self) -> impl Iterator<Item = (String, &Entry)> {
        self.tables.iter().flat_map(|t| {
            t.entries.iter().flat_map(move |e| {
                e.keys.iter().map(move |(k, _)| {
                    let dotted = if t.name.is_empty() {
                        k.clone()
                    } else {
                        format!("{}.{k}", t.name)
                    };
                    (dotted, e)
                })
            })
        })
    }
}

/// `#key = value` (a key commented out: no space after the `#`), or `key = value`.
fn key_line(line: &str) -> Option<(String, String)> {
    let l = line.strip_prefix('#').unwrap_or(line);
    let (key, value) = l.split_once(" = ")?;
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ok.then(|| (key.to_string(), value.to_string()))
}

/// What is wrong between the code's keys and the documented ones (empty: nothing).
fn drift(doc: &ConfigDoc, code: &[String]) -> Vec<String> {
    let documented: Vec<(String, &Entry)> = doc.keys().collect();
    let mut problems = Vec::new();
    for k in code {
        match documented.iter().find(|(d, _)| d == k) {
            None => problems.push(format!(
                "config key `{k}` is not documented in packaging/config.toml (add a comment block and `#{} = <default>` under its table)",
                k.rsplit('.').next().unwrap_or(k)
            )),
            Some((_, e)) if e.prose.iter().all(|l| l.trim().is_empty()) => {
                problems.push(format!("config key `{k}` has no explanation in packaging/config.toml"))
            }
            Some(_) => {}
        }
    }
    for (d, _) in &documented {
        if !code.contains(d) {
            problems.push(format!(
                "packaging/config.toml documents `{d}`, which the config code does not accept"
            ));
        }
    }
    problems
}

/// cocalc-project-host.toml(5), from `text` (the packaged config.toml); an error lists every key
/// of the code that `text` does not explain, and every key it documents that the code lacks.
pub fn config_page(text: &str) -> Result<String, String> {
    let doc = ConfigDoc::parse(text);
    let problems = drift(&doc, &crate::config::keys());
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let version = env!("CARGO_PKG_VERSION");
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "COCALC-PROJECT-HOST.TOML",
            "5",
            "",
            &format!("{NAME} {version}"),
            "File Formats",
        ],
    );
    r.control("SH", ["NAME"]);
    r.text([roman(
        "cocalc-project-host.toml - configuration of the CoCalc project host daemon",
    )]);
    r.control("SH", ["SYNOPSIS"]);
    for p in [
        "/etc/cocalc-project-host/config.toml",
        "/etc/cocalc-project-host/config.d/*.toml",
        "/run/cocalc-project-host/config.d/*.toml",
        "/usr/lib/cocalc-project-host/config.d/*.toml",
    ] {
        r.text([italic(p)]).control("br", []);
    }
    r.control("SH", ["DESCRIPTION"]);
    paragraphs(&mut r, &doc.intro);
    r.text([roman(
        "Each key below is shown with its default value, or with an example where the page says \
         so. \
         A change takes effect when the daemon restarts (systemctl restart \
         cocalc-project-host.service; running projects keep running).",
    )]);
    r.control("SH", ["KEYS"]);
    for t in &doc.tables {
        if t.entries.is_empty() && t.notes.is_empty() {
            continue;
        }
        let heading = if t.name.is_empty() {
            "Top level".to_string()
        } else {
            format!("[{}]", t.name)
        };
        r.control("SS", [heading.as_str()]);
        for e in &t.entries {
            for (i, (k, v)) in e.keys.iter().enumerate() {
                r.control(if i == 0 { "TP" } else { "TQ" }, []);
                let note = if is_default(&t.name, k, v) {
                    ""
                } else {
                    " (an example, not the default)"
                };
                r.text([
                    bold(k.as_str()),
                    roman(" = "),
                    roman(v.as_str()),
                    italic(note),
                ]);
            }
            r.text([roman(e.prose.join(" "))]);
        }
        if !t.notes.is_empty() {
            r.control("PP", []);
            r.text([roman(t.notes.join(" "))]);
        }
    }
    r.control("SH", ["SEE ALSO"]);
    r.text([roman("cocalc-project-host(8), systemd.unit(5)")]);
    Ok(r.to_roff())
}

/// Whether `key = value` under `[table]` leaves the settings at their defaults: the page says
/// which values shown are only examples, from the config code itself.
fn is_default(table: &str, key: &str, value: &str) -> bool {
    let text = if table.is_empty() {
        format!("{key} = {value}\n")
    } else {
        format!("[{table}]\n{key} = {value}\n")
    };
    crate::config::merge([(Path::new("config.toml"), text.as_str())])
        .is_ok_and(|s| s == crate::config::Settings::default())
}

/// Comment lines as paragraphs (a blank comment line separates them).
fn paragraphs(r: &mut Roff, lines: &[String]) {
    for chunk in lines.split(|l| l.trim().is_empty()) {
        if !chunk.is_empty() {
            r.text([roman(chunk.join(" "))]);
            r.control("PP", []);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_key_is_documented_in_packaging_config_toml() {
        let problems = drift(&ConfigDoc::parse(CONFIG_DOC), &crate::config::keys());
        assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
    }

    #[test]
    fn an_undocumented_or_unknown_key_is_reported() {
        let doc = ConfigDoc::parse(
            "# intro\n\n# The dir.\n#state_dir = \"/x\"\n[http]\n#max_connections_per_peer = 1\n\
             [storage]\n# Gone.\n#old = 1\n",
        );
        let code = [
            "state_dir".to_string(),
            "http.max_connections_per_peer".to_string(),
            "proxy.port".to_string(),
        ];
        let p = drift(&doc, &code).join("\n");
        assert!(p.contains("`proxy.port` is not documented"), "{p}");
        assert!(
            p.contains("`http.max_connections_per_peer` has no explanation"),
            "{p}"
        );
        assert!(p.contains("documents `storage.old`"), "{p}");
        assert!(!p.contains("state_dir"), "{p}");
        assert!(config_page("[bogus]\n# x\n#y = 1\n").is_err());
    }

    #[test]
    fn documented_values_are_valid_config() {
        // every `#key = value` line, uncommented, is accepted by the real parser and validator
        // (master.pin_sha256 excludes master.ca_file: config::tests parses it on its own)
        let text: String = CONFIG_DOC
            .lines()
            .filter(|l| !l.starts_with("#pin_sha256 = "))
            .map(|l| match key_line(l) {
                Some((k, v)) => format!("{k} = {v}\n"),
                None if l.starts_with('[') => format!("{l}\n"),
                None => String::new(),
            })
            .collect();
        crate::config::merge([(Path::new("config.toml"), text.as_str())])
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    #[test]
    fn config_page_lists_every_key_with_its_text() {
        let page = config_page(CONFIG_DOC).unwrap();
        assert!(page.starts_with(".TH COCALC-PROJECT-HOST.TOML 5"), "{page}");
        for k in crate::config::keys() {
            let leaf = k.rsplit('.').next().unwrap_or(&k).replace('_', "\\_");
            assert!(
                page.contains(&format!("\\fB{leaf}\\fR"))
                    || page.contains(&format!("\\fB{}\\fR", k.rsplit('.').next().unwrap_or(&k))),
                "{k} not in the page"
            );
        }
        assert!(page.contains(".SS [limits.max]"), "{page}");
        assert!(page.contains("token_revoked"), "trailing notes kept");
    }

    #[test]
    fn the_config_page_tells_examples_from_defaults() {
        assert!(is_default("storage", "image_size", "\"20G\""));
        assert!(is_default("", "listen", "\"127.0.0.1:9002\""));
        assert!(!is_default("storage", "mount", "\"/srv/cocalc-projects\""));
        assert!(!is_default("storage", "image_size", "\"21G\""));
        let page = config_page(CONFIG_DOC).unwrap();
        let line = page
            .lines()
            .find(|l| l.contains("\\fBmount\\fR"))
            .unwrap_or_else(|| panic!("{page}"));
        assert!(line.contains("an example, not the default"), "{line}");
    }

    #[test]
    fn completions_leave_hidden_subcommands_out() {
        let dir = std::env::temp_dir().join(format!("docgen-{}", std::process::id()));
        let cmd = clap::Command::new(NAME)
            .subcommand(clap::Command::new("visible-one"))
            .subcommand(clap::Command::new("secret-one").hide(true));
        let files = completions(cmd, &dir).unwrap();
        assert_eq!(files.len(), 3);
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.contains("visible-one"), "{}", f.display());
            assert!(!text.contains("secret-one"), "{}", f.display());
        }
        assert!(dir.join("bash").join(NAME).is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn program_page_has_every_visible_subcommand() {
        let cmd = clap::Command::new(NAME)
            .version("1.0")
            .about("x")
            .subcommand(
                clap::Command::new("snapshot")
                    .about("Snapshots.")
                    .subcommand(
                        clap::Command::new("list").about("List them.").arg(
                            clap::Arg::new("json")
                                .long("json")
                                .action(clap::ArgAction::SetTrue),
                        ),
                    ),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let page = program_page(cmd).unwrap();
        assert!(
            page.contains(".SS \"cocalc-project-host snapshot list\""),
            "{page}"
        );
        assert!(page.contains("List them."), "{page}");
        assert!(page.contains("json"), "{page}");
        assert!(!page.contains("secret"), "{page}");
        assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
    }
}
