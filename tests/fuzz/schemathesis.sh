#!/usr/bin/env bash
# Fuzzes the live daemon in the testbed with schemathesis (PyPI) against docs/openapi.yaml: every
# response must match the schema, no 5xx, no crash, schema-valid requests accepted (positive_data_acceptance:
# the spec promises no more than the host takes); unauthenticated/unsupported requests must be
# refused properly. Not use_after_free: every project id answers on every host (a status of an
# unknown id is `opened`, a config PATCH records it), so after DELETE /projects/:id the id is still
# there, without its data, by design (docs/master-protocol.md). The e2e test `auth::schemathesis_*` runs it; scripts/test installs it first.
#
#   tests/fuzz/schemathesis.sh install        make the venv target/schemathesis (pinned version)
#   tests/fuzz/schemathesis.sh run [ARGS...]  fuzz (testbed up, package installed); ARGS go to
#                                             `schemathesis run`. FUZZ_EXAMPLES (default 50) and
#                                             FUZZ_SEED (default 7) bound and fix the run.
# The request log (HAR) is written to target/schemathesis-report/requests.har.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VERSION=4.32.5
VENV=$ROOT/target/schemathesis
TB=$ROOT/tests/testbed/testbed.sh

install() {
  if [ -x "$VENV/bin/schemathesis" ] && [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $VERSION" ]; then
    return 0
  fi
  echo "installing schemathesis $VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$VERSION" >&2
}

run() {
  install
  local token out
  token=$($TB exec cat /etc/cocalc-project-host/admin-token)
  out=$ROOT/target/schemathesis-report
  rm -rf "$out"; mkdir -p "$out"
  # only the machine's network namespace: the host's tool reaches 127.0.0.1 inside the testbed;
  # run from target/ so its cache (.schemathesis/) stays out of the tree
  cd "$ROOT/target"
  PYTHONPATH=$ROOT/tests/fuzz SCHEMATHESIS_HOOKS=hooks NO_COLOR=1 \
    nsenter -t "$($TB leader)" -n -- "$VENV/bin/schemathesis" run "$ROOT/docs/openapi.yaml" \
      --url http://127.0.0.1:9002 \
      --header "Authorization: Bearer $token" \
      --checks all \
      --exclude-checks use_after_free \
      --phases examples,coverage,fuzzing,stateful \
      --max-examples "${FUZZ_EXAMPLES:-50}" \
      --seed "${FUZZ_SEED:-7}" \
      --workers 1 \
      --request-timeout 150 \
      --report har --report-har-path "$out/requests.har" \
      "$@"
}

case "${1:-}" in
  install) install ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 install|run [ARGS...]" >&2; exit 2 ;;
esac
