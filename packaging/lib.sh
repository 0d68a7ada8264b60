# Sourced by build-deb.sh and build-rpm.sh: their shared argument parsing and tool check.

# package_args DEFAULT_OUT "$@": sets PROFILE (dev, or release with --release) and OUT.
package_args() {
  PROFILE=dev; OUT=$1; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --release) PROFILE=release ;;
      --out) OUT=$2; shift ;;
      *) echo "usage: $0 [--release] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
  done
}

# need_tool NAME COMMAND PACKAGE: installs PACKAGE when COMMAND is missing (as root; like
# tests/testbed/testbed.sh's host packages), else says what to install.
need_tool() {
  command -v "$2" >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "$1: $2 missing (apt-get install $3)" >&2; exit 1; }
  echo "$1: installing $3" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$3" >/dev/null
}
