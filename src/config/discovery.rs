//! Which fragment files apply, as systemd and zincati find drop-ins (`liboverdrop`): under each
//! root (lowest priority first), `config.toml` and `config.d/*.toml`. A file in a later root
//! replaces the file of the same name in an earlier one; a symlink to `/dev/null` masks it.
//! `config.toml` applies first, then the drop-ins in lexical order of their file names, whichever
//! root each comes from.
use std::path::{Path, PathBuf};

/// Where fragments are read from, lowest priority first.
pub const DEFAULT_ROOTS: [&str; 3] = [
    "/usr/lib/cocalc-project-host",
    "/run/cocalc-project-host",
    "/etc/cocalc-project-host",
];

/// Overrides [`DEFAULT_ROOTS`] (colon-separated), for tests and development.
pub const ROOTS_ENV: &str = "COCALC_PROJECT_HOST_CONFIG_DIRS";

/// The fragment files under `roots`, in the order they apply. Only regular files (or symlinks
/// to `/dev/null`, which mask) are fragments; dotfiles are ignored.
pub fn fragment_files(roots: &[PathBuf]) -> Vec<PathBuf> {
    let main =
        liboverdrop::scan(roots, "", &["toml"], true).remove(std::ffi::OsStr::new("config.toml"));
    let drop_ins = liboverdrop::scan(roots, "config.d", &["toml"], true);
    main.into_iter().chain(drop_ins.into_values()).collect()
}

/// Fragment-named symlinks under `roots` that point anywhere but `/dev/null`: liboverdrop does
/// not follow them, so [`super::load`] refuses them rather than silently leaving them out.
pub(super) fn unfollowed_symlinks(roots: &[PathBuf]) -> Vec<PathBuf> {
    let candidates = roots.iter().flat_map(|root| {
        let drop_ins = std::fs::read_dir(root.join("config.d"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        std::iter::once(root.join("config.toml")).chain(drop_ins)
    });
    candidates
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
                && std::fs::read_link(p).is_ok_and(|t| t != Path::new("/dev/null"))
        })
        .collect()
}

/// The roots to read: [`ROOTS_ENV`] when set, else [`DEFAULT_ROOTS`].
pub fn roots_from_env() -> Vec<PathBuf> {
    match std::env::var_os(ROOTS_ENV) {
        Some(v) => std::env::split_paths(&v).collect(),
        None => DEFAULT_ROOTS.iter().map(PathBuf::from).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn same_names_override_dev_null_masks_and_names_order() {
        let d = std::env::temp_dir().join(format!("cph-discovery-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let (usr, run, etc) = (d.join("usr"), d.join("run"), d.join("etc"));
        let write = |root: &PathBuf, name: &str| {
            std::fs::create_dir_all(root.join("config.d")).unwrap();
            std::fs::write(root.join(name), "").unwrap();
        };
        write(&usr, "config.toml");
        write(&usr, "config.d/20.toml");
        write(&usr, "config.d/10.toml");
        write(&usr, "config.d/30-masked.toml");
        write(&usr, "config.d/x.conf"); // not .toml: ignored
        write(&usr, "config.d/.hidden.toml"); // dotfile: ignored
        write(&usr, "other.toml"); // only config.toml is read from a root itself
        write(&run, "config.d/20.toml"); // replaces /usr/lib's 20.toml
        write(&etc, "config.toml"); // replaces /usr/lib's config.toml
        write(&etc, "config.d/05.toml");
        symlink("/dev/null", etc.join("config.d/30-masked.toml")).unwrap();
        let got: Vec<String> = fragment_files(&[usr, run, etc.clone()])
            .iter()
            .map(|p| p.strip_prefix(&d).unwrap().display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "etc/config.toml",
                "etc/config.d/05.toml",
                "usr/config.d/10.toml",
                "run/config.d/20.toml",
            ]
        );
        assert!(unfollowed_symlinks(&[d.join("usr"), etc.clone()]).is_empty());
        symlink(d.join("usr/config.d/10.toml"), etc.join("config.d/11.toml")).unwrap();
        assert_eq!(
            unfollowed_symlinks(&[d.join("usr"), etc.clone()]),
            [etc.join("config.d/11.toml")]
        );
        std::fs::remove_file(etc.join("config.d/11.toml")).unwrap();
        // config.toml masked too: no main file at all
        symlink("/dev/null", etc.join("config.toml.tmp")).unwrap();
        std::fs::rename(etc.join("config.toml.tmp"), etc.join("config.toml")).unwrap();
        let got = fragment_files(&[d.join("usr"), etc]);
        assert!(got.iter().all(|p| !p.ends_with("config.toml")), "{got:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
