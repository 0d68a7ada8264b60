#!/usr/bin/env bash
# Builds cocalc-project-host_<version>_<arch>.deb from debian/ (debhelper compat 13) with
# dpkg-buildpackage, and prints its path as the last line.
#   packaging/build-deb.sh [--release] [--out DIR]     (default: dev profile, target/debian)
# cargo builds the binary once, here; packaging/stage.sh copies the files the package is made of
# into a source tree under target/ with the binary, man pages and completions in build/, and
# dpkg-buildpackage -b packs that tree (-d: cargo and rustc need not be Debian's; nothing is
# compiled there).
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/lib.sh
package_args target/debian "$@"
need_tool build-deb dh debhelper
SRC=$(realpath "$(packaging/stage.sh "$PROFILE" target/deb-src)")
VERSION=$(dpkg-parsechangelog -l debian/changelog -S Version)
ARCH=$(dpkg --print-architecture)
( cd "$SRC" && dpkg-buildpackage -b -d -us -uc --no-pre-clean >"$SRC.log" 2>&1 ) \
  || { tail -30 "$SRC.log" >&2; echo "build-deb: dpkg-buildpackage failed (log: $SRC.log)" >&2; exit 1; }
mkdir -p "$OUT"
DEB="$OUT/cocalc-project-host_${VERSION}_${ARCH}.deb"
mv "$(dirname "$SRC")/cocalc-project-host_${VERSION}_${ARCH}.deb" "$DEB"
echo "$DEB"
