#!/usr/bin/env python3
"""A test master for the e2e suite (docs/master-protocol.md): answers POST /register,
/heartbeat and /project-state like a master would, and appends every request it gets to a log
(one JSON object a line: path, authorization header, body) that the tests read.

    master.py --port PORT --log FILE [--answer FILE] [--cert PEM --key PEM]

--answer: a JSON file whose content answers /register (read at every register; default {}).
--cert/--key: serve HTTPS with this certificate. Listens on 127.0.0.1 only."""
import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *a):  # the journal gets our own lines only
        pass

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except ValueError:
            self.reply(400, {"error": "not JSON"})
            return
        with open(args.log, "a") as f:
            f.write(json.dumps({"path": self.path,
                                "auth": self.headers.get("authorization"),
                                "body": body}) + "\n")
        if self.path == "/register":
            answer = {}
            if args.answer:
                try:
                    with open(args.answer) as f:
                        answer = json.load(f)
                except FileNotFoundError:
                    pass
            self.reply(200, answer)
        elif self.path == "/heartbeat":
            self.reply(200, {})
        elif self.path == "/project-state":
            seqs = [r["seq"] for r in body.get("reports", [])]
            self.reply(200, {"acked": max(seqs) if seqs else 0})
        else:
            self.reply(404, {"error": "no such endpoint"})


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--answer")
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"test master on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
