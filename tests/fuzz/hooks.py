"""schemathesis hooks for the fuzz run against the testbed (tests/fuzz/schemathesis.sh).

A start with a schema-valid config really starts a container. Values that are valid but can
never run in the testbed are swapped for runnable ones, in every phase (map_body for the fuzzing
phase, before_call for the coverage and stateful ones); invalid values are never touched, so
negative cases stay negative. What is swapped:
  image   -> the testbed's image (any other name is `image not known`: 500 start_failed)
  cmd     -> dropped, the image's CMD runs (a random command does not exist in the image)
  memory  -> at least 256 MiB, pids -> at least 256 (podman itself runs in the unit's cgroup),
             in a start config and in a live change (PATCH /config) alike
  env     -> in positive cases only, names the host refuses become FUZZ_<n> (OpenAPI 3.0 cannot
             state a rule for object keys; the spec says it in words)
  keys    -> (PUT /projects/{id}/authorized-keys) each string of a schema-valid length becomes
             a real OpenSSH public key (a random string is not one; the spec says it in words)
  follow  -> 0 on GET /events and /projects/{id}/logs when valid (their streams never end)
Everything else (env values, network, cpu, swap, disk, scratch, tmp, ids, bodies) is fuzzed as
generated.
"""
import re

import schemathesis

IMAGE = "localhost/cocalc-project:latest"
IMAGE_RE = re.compile(r"^[A-Za-z0-9./:_@][A-Za-z0-9./:_@-]*$")


def _int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_start(op):
    return op is not None and op.method.upper() == "POST" and op.path.endswith("/start")


def _is_patch(op):
    return op is not None and op.method.upper() == "PATCH" and op.path.endswith("/config")


SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHrkivy0+UVFGYDv11hiVT5n0uJUh1695nhM7H3MdrxZ fuzz"


def _is_keys(op):
    return op is not None and op.method.upper() == "PUT" and op.path.endswith("/authorized-keys")


def _real_keys(body):
    # only strings the schema allows (≤ 8192): a too-long one stays a negative case
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        return body
    keys = [SSH_KEY if isinstance(k, str) and len(k) <= 8192 else k for k in body["keys"]]
    return {**body, "keys": keys}


@schemathesis.hook
def map_body(context, body):
    if _is_keys(context.operation):
        return _real_keys(body)
    if _is_patch(context.operation) and isinstance(body, dict):
        return _floors(body)
    if not _is_start(context.operation):
        return body
    return _runnable(body)


@schemathesis.hook
def before_call(context, case, **kwargs):
    # the coverage and stateful phases do not pass their bodies through map_body
    # assign only a changed body: setting case.body re-derives the case's metadata, and a
    # negative case whose body was left alone must stay one
    body = case.body
    if _is_keys(case.operation):
        body = _real_keys(body)
    if _is_patch(case.operation) and isinstance(body, dict):
        body = _floors(body)
    if _is_start(case.operation):
        body = _runnable(body)
        meta = case.meta
        if meta is not None and str(meta.generation.mode) == "positive":
            body = _valid_env_names(body)
    if body != case.body:
        case.body = body
    _no_streams(case)


def _no_streams(case):
    # GET /events streams by default and logs with follow=1 stream until the client goes: a
    # fuzzed request would wait for its timeout. Valid follow values (or none) become follow=0 (a
    # replay that ends); an invalid one is left alone (a negative case, answered 400 at once).
    op = case.operation
    if op is None or op.method.upper() != "GET":
        return
    if op.path != "/events" and not op.path.endswith("/logs"):
        return
    query = dict(case.query or {})
    if query.get("follow") in (None, "0", "1", 0, 1, True, False):
        query["follow"] = "0"
        case.query = query


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _valid_env_names(body):
    # OpenAPI 3.0 cannot constrain object keys (propertyNames is not in its dialect); the spec says
    # the rule in words. A positive case's env gets names that follow it; values are kept.
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        return body
    env = body["config"].get("env")
    if not isinstance(env, dict):
        return body
    fixed = {}
    for i, (k, v) in enumerate(env.items()):
        ok = ENV_NAME_RE.match(k) and k not in ("HOME", "COCALC_PROJECT_ID")
        fixed[k if ok else f"FUZZ_{i}"] = v
    return {**body, "config": {**body["config"], "env": fixed}}


def _runnable(body):
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        return body
    c = dict(body["config"])
    image = c.get("image")
    if isinstance(image, str) and 0 < len(image) <= 255 and IMAGE_RE.match(image):
        c["image"] = IMAGE
    cmd = c.get("cmd")
    if (
        isinstance(cmd, list)
        and 1 <= len(cmd) <= 256
        and all(isinstance(a, str) and "\0" not in a for a in cmd)
    ):
        del c["cmd"]
    return {**body, "config": _floors(c)}


def _floors(c):
    # memory and pids floors for a start config and a live change alike: lowered live below
    # what podman's own processes need, the container dies and the next change cannot apply
    c = dict(c)
    if _int(c.get("memory"), 32 << 20, 2**63 - 1):
        c["memory"] = max(c["memory"], 256 << 20)
    if _int(c.get("pids"), 16, 16384):
        c["pids"] = max(c["pids"], 256)
    return c
