#!/usr/bin/env bash
# Builds cocalc-project-host_<version>_<arch>.deb with dpkg-deb from the install-path tree below.
#   packaging/build-deb.sh [--release] [--out DIR]     (default: dev profile, target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=dev; OUT=target/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --release) PROFILE=release ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--release] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
cargo build --locked --profile "$PROFILE" --bin cocalc-project-host
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/cocalc-project-host
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
STAGE=target/deb-stage
rm -rf "$STAGE"; mkdir -p "$STAGE/DEBIAN" "$OUT"
# the tree mirrors the install paths
install -D -m755 "$BIN" "$STAGE/usr/bin/cocalc-project-host"
strip "$STAGE/usr/bin/cocalc-project-host" 2>/dev/null || true
for u in systemd/*.service systemd/*.socket systemd/*.slice systemd/*.timer; do
  [ -e "$u" ] && install -D -m644 "$u" "$STAGE/lib/systemd/system/$(basename "$u")"
done
install -D -m644 dbus/com.cocalc.ProjectHost1.conf "$STAGE/usr/share/dbus-1/system.d/com.cocalc.ProjectHost1.conf"
install -D -m644 dbus/com.cocalc.ProjectHost1.service "$STAGE/usr/share/dbus-1/system-services/com.cocalc.ProjectHost1.service"
[ -e dbus/com.cocalc.ProjectHost1.xml ] && install -D -m644 dbus/com.cocalc.ProjectHost1.xml "$STAGE/usr/share/dbus-1/interfaces/com.cocalc.ProjectHost1.xml"
install -D -m644 packaging/sysusers.d/cocalc-project-host.conf "$STAGE/usr/lib/sysusers.d/cocalc-project-host.conf"
install -D -m644 packaging/config.toml "$STAGE/etc/cocalc-project-host/config.toml"
install -d "$STAGE/etc/cocalc-project-host/config.d" "$STAGE/usr/lib/cocalc-project-host/config.d"
install -D -m644 README.md "$STAGE/usr/share/doc/cocalc-project-host/README.md"
install -m755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$STAGE/DEBIAN/"
echo /etc/cocalc-project-host/config.toml > "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CTRL
Package: cocalc-project-host
Version: $VERSION
Architecture: $ARCH
Maintainer: cocalc-project-host developers <root@localhost>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), systemd (>= 252), dbus, podman, catatonit, btrfs-progs, util-linux, iptables, init-system-helpers (>= 1.54)
Section: admin
Priority: optional
Description: runner node for CoCalc projects (systemd units wrapping podman on btrfs)
 Each project is a btrfs subvolume plus a container that runs as a transient systemd unit.
 The socket-activated daemon serves an HTTP API and mirrors it on D-Bus
 (com.cocalc.ProjectHost1).
CTRL
DEB="$OUT/cocalc-project-host_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz -z1 -b "$STAGE" "$DEB" >/dev/null
echo "$DEB"
