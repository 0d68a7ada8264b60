#!/usr/bin/env bash
# Lints and inspects the built packages; any lintian or rpmlint warning or error fails, and so
# does a package that lacks a file, a dependency or a maintainer-script behaviour checked below.
#   tests/packaging/check.sh DEB RPM
# Needs lintian, rpm and rpmlint (.ci/run installs them). Run by scripts/test; no root needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEB=$1 RPM=$2
missing=()
for t in lintian:lintian rpmlint:rpmlint rpm:rpm; do command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}"); done
if [ ${#missing[@]} -gt 0 ]; then
  # like the testbed's host packages: installed when missing (root), else said so
  [ "$(id -u)" = 0 ] || { echo "check.sh: missing ${missing[*]} (apt-get install ${missing[*]})" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
fails=0 checks=0
pass() { checks=$((checks + 1)); }
fail() { checks=$((checks + 1)); fails=$((fails + 1)); echo "FAIL: $*" >&2; }
has() { # has WHAT TEXT PATTERN...: every fixed-string PATTERN occurs in TEXT
  local what=$1 text=$2; shift 2
  for p in "$@"; do
    if grep -qF -- "$p" <<<"$text"; then pass; else fail "$what lacks: $p"; fi
  done
}
hasnt() {
  local what=$1 text=$2; shift 2
  for p in "$@"; do
    if grep -qE -- "$p" <<<"$text"; then fail "$what has: $p"; else pass; fi
  done
}

echo "==> lintian $DEB"
# --fail-on warning: a new warning fails; overrides (debian/*.lintian-overrides) say why
if out=$(lintian --fail-on error,warning --display-level '>=warning' "$DEB" 2>&1); then pass; else fail "lintian:"; fi
grep -E '^[EW]: ' <<<"$out" >&2 || true

echo "==> rpmlint $RPM"
if out=$(rpmlint -c packaging/rpm/rpmlint.toml "$RPM" 2>&1) && ! grep -qE ': [EW]: ' <<<"$out"; then pass; else
  fail "rpmlint:"; grep -E ': [EW]: |badness' <<<"$out" >&2 || true
fi

echo "==> .deb contents and maintainer scripts"
files=$(dpkg-deb -c "$DEB" | awk '{print $6}')
has "deb files" "$files" ./usr/bin/cocalc-project-host \
  ./usr/share/man/man8/cocalc-project-host.8.gz ./usr/share/man/man5/cocalc-project-host.toml.5.gz \
  ./usr/share/bash-completion/completions/cocalc-project-host \
  ./usr/share/zsh/vendor-completions/_cocalc-project-host \
  ./usr/share/fish/vendor_completions.d/cocalc-project-host.fish \
  ./usr/lib/sysusers.d/cocalc-project-host.conf ./usr/share/doc/cocalc-project-host/copyright \
  ./lib/systemd/system/cocalc-project-host.service ./lib/systemd/system/cocalc-project-host.socket \
  ./lib/systemd/system/cocalc-project-host-proxy.socket ./lib/systemd/system/cocalc-project-host-ssh.socket \
  ./lib/systemd/system/cocalc-project-host-snapshots.timer ./lib/systemd/system/cocalc-projects.slice \
  ./etc/cocalc-project-host/config.toml
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$DEB" "$tmp/DEBIAN"
has "deb conffiles" "$(cat "$tmp/DEBIAN/conffiles")" /etc/cocalc-project-host/config.toml
has "deb md5sums" "$(cat "$tmp/DEBIAN/md5sums")" usr/bin/cocalc-project-host
has "deb Depends" "$(dpkg-deb -f "$DEB" Depends)" "libc6 (>=" podman btrfs-progs dbus catatonit "systemd (>= 252)"
post=$(cat "$tmp/DEBIAN/postinst") prerm=$(cat "$tmp/DEBIAN/prerm")
has "postinst" "$post" "systemd-sysusers" "admin-token" \
  "deb-systemd-helper enable 'cocalc-project-host.socket'" \
  "deb-systemd-helper enable 'cocalc-project-host-proxy.socket'" \
  "deb-systemd-helper enable 'cocalc-project-host-ssh.socket'" \
  "deb-systemd-helper enable 'cocalc-project-host-snapshots.timer'" \
  "deb-systemd-invoke try-restart 'cocalc-project-host.service'"
# upgrades restart only the daemon: never a socket (it would refuse connections meanwhile)
hasnt "postinst" "$post" "(try-)?restart .*\\.socket" "^[^#]*systemctl (start|stop|restart|enable)"
has "prerm" "$prerm" "deb-systemd-invoke stop 'cocalc-project-????????-????-????-????-????????????.service'"
hasnt "prerm" "$prerm" "^[^#]*systemctl "

echo "==> rpm -qp --scripts / --requires / -l / config flags"
scripts=$(rpm -qp --scripts "$RPM" 2>/dev/null)
has "rpm scripts" "$scripts" "systemd-sysusers" "admin-token" "preset cocalc-project-host.socket cocalc-project-host-proxy.socket cocalc-project-host-ssh.socket cocalc-project-host-snapshots.timer" \
  "disable --now cocalc-project-host.socket" "try-restart cocalc-project-host.service" \
  "systemctl stop 'cocalc-project-????????-????-????-????-????????????.service'"
hasnt "rpm scripts" "$scripts" "try-restart .*\\.socket"
has "rpm requires" "$(rpm -qp --requires "$RPM" 2>/dev/null)" "libc.so.6()(64bit)" podman btrfs-progs dbus catatonit "systemd >= 252"
rfiles=$(rpm -qp -l "$RPM" 2>/dev/null)
has "rpm files" "$rfiles" /usr/bin/cocalc-project-host \
  /usr/share/man/man8/cocalc-project-host.8.gz /usr/share/man/man5/cocalc-project-host.toml.5.gz \
  /usr/share/bash-completion/completions/cocalc-project-host \
  /usr/share/zsh/site-functions/_cocalc-project-host \
  /usr/share/fish/vendor_completions.d/cocalc-project-host.fish \
  /usr/lib/sysusers.d/cocalc-project-host.conf /usr/lib/systemd/system-preset/50-cocalc-project-host.preset \
  /usr/lib/systemd/system/cocalc-project-host.service /usr/lib/systemd/system/cocalc-project-host.socket \
  /usr/lib/systemd/system/cocalc-project-host-proxy.socket /usr/lib/systemd/system/cocalc-project-host-ssh.socket \
  /usr/lib/systemd/system/cocalc-project-host-snapshots.timer /usr/lib/systemd/system/cocalc-projects.slice
# %config(noreplace): flags c (config) and n (noreplace)
has "rpm config flags" "$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" 2>/dev/null)" \
  "cn /etc/cocalc-project-host/config.toml"

echo "package checks: $((checks - fails)) passed, $fails failed"
[ "$fails" = 0 ]
