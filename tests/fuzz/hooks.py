"""schemathesis hooks for the fuzz run against the testbed (tests/fuzz/schemathesis.sh).

A start with a schema-valid config really starts a container. Values that are valid but can
never run in the testbed are swapped for runnable ones; invalid values are never touched, so
negative cases stay negative. What is swapped:
  image   -> the testbed's image (any other name is `image not known`: 500 start_failed)
  cmd     -> dropped, the image's CMD runs (a random command does not exist in the image)
  memory  -> at least 256 MiB, pids -> at least 256 (podman itself runs in the unit's cgroup)
Everything else (env, network, cpu, swap, disk, scratch, tmp, ids, bodies) is fuzzed as generated.
"""
import re

import schemathesis

IMAGE = "localhost/cocalc-project:latest"
IMAGE_RE = re.compile(r"^[A-Za-z0-9./:_@][A-Za-z0-9./:_@-]*$")


def _int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


@schemathesis.hook
def map_body(context, body):
    op = context.operation
    if op is None or op.method.upper() != "POST" or not op.path.endswith("/start"):
        return body
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
    if _int(c.get("memory"), 4 << 20, 2**64 - 1):
        c["memory"] = max(c["memory"], 256 << 20)
    if _int(c.get("pids"), 1, 4194304):
        c["pids"] = max(c["pids"], 256)
    return {**body, "config": c}
