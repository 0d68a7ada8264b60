#!/usr/bin/env bash
# Builds cocalc-project-host-<version>-1.<arch>.rpm with rpmbuild from packaging/rpm/*.spec, and
# prints its path as the last line. The binary, man pages and completions come from
# packaging/stage.sh (cargo builds once); rpmbuild only places files and writes scriptlets.
#   packaging/build-rpm.sh [--release] [--out DIR]     (default: dev profile, target/rpm)
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/lib.sh
package_args target/rpm "$@"
need_tool build-rpm rpmbuild rpm
SRC=$(realpath "$(packaging/stage.sh "$PROFILE" target/rpm-src)")
strip "$SRC/build/cocalc-project-host"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TOP=$(realpath -m target/rpmbuild)
rm -rf "$TOP"; mkdir -p "$TOP" "$OUT"
# --nodeps: the build host may not be an RPM system (rpmbuild from Debian's rpm package)
rpmbuild -bb --nodeps --quiet \
  --define "_topdir $TOP" \
  --define "stagedir $SRC" \
  --define "version_from_cargo $VERSION" \
  --define "_build_id_links none" \
  packaging/rpm/cocalc-project-host.spec >"$TOP.log" 2>&1 \
  || { tail -30 "$TOP.log" >&2; echo "build-rpm: rpmbuild failed (log: $TOP.log)" >&2; exit 1; }
RPM=$(find "$TOP/RPMS" -name "cocalc-project-host-$VERSION-*.rpm" | head -1)
mv "$RPM" "$OUT/"
echo "$OUT/$(basename "$RPM")"
