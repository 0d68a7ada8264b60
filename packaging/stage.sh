#!/usr/bin/env bash
# Shared by the .deb and the RPM build: builds the binary (cargo, once) and copies the files the
# packages are made of into a fresh tree DEST/cocalc-project-host-<version>/, the generated ones
# in its build/ (binary, man/, completions/{bash,zsh,fish}/). Prints that tree's path.
#   packaging/stage.sh PROFILE DEST        (PROFILE: dev or release)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=$1 DEST=$2
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# one version for every package: Cargo.toml's must be debian/changelog's latest
CHANGELOG=$(dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null || sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog)
[ "$CHANGELOG" = "$VERSION" ] || {
  echo "stage: Cargo.toml says $VERSION, debian/changelog $CHANGELOG: add a changelog entry (dch -v $VERSION)" >&2
  exit 1
}
cargo build --locked --profile "$PROFILE" --bin cocalc-project-host >&2
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/cocalc-project-host
TREE=$DEST/cocalc-project-host-$VERSION
rm -rf "$DEST"; mkdir -p "$TREE/build" "$TREE/docs"
cp -rL debian systemd dbus packaging README.md "$TREE/"
cp docs/install.md docs/operations.md "$TREE/docs/"
cp "$BIN" "$TREE/build/cocalc-project-host"
"$BIN" generate man "$TREE/build/man" >/dev/null
"$BIN" generate completions "$TREE/build/completions" >/dev/null
echo "$TREE"
