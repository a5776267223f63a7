"""A local stand-in for the Hugging Face Hub over HTTP (`FakeHub`), and `run_cli` with a hub environment.

`FakeHub` is an HTTP server on 127.0.0.1 that implements the endpoints a push uses (create repo,
create branch, card validation, preupload, the LFS batch / upload / verify steps, commit), checks
the bearer token, records every request and stores what arrives. Tests run the CLI in a subprocess
with HF_ENDPOINT pointing at it (huggingface_hub reads the endpoint at import), and the server shuts
itself down when the test ends or after a deadline, whichever comes first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_moetuneTestToken0123456789abcdefXYZ"
MAX_REQUESTS = 200  # a push of a few files needs ~10; anything near this is a runaway loop
MAX_BODY = 64 << 20
DEADLINE_S = 60.0


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[dict] = []  # method, path, authorization
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.validated_cards: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(DEADLINE_S, self.shutdown)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection ends its handler thread
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # --------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            for _ in range(100_000):  # bounded: a chunk per iteration
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    break
            raise ValueError("request body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length)

    def _reply(self, status: int, payload=None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        hub = self.server
        body = self._body()
        with hub.lock:
            hub.requests.append(
                {"method": method, "path": self.path, "authorization": self.headers.get("Authorization")}
            )
            too_many = len(hub.requests) > MAX_REQUESTS
        if too_many:
            self._reply(503, {"error": "fake hub: too many requests"})
            threading.Thread(target=hub.shutdown, daemon=True).start()
            return
        path = self.path.split("?")[0]
        if path.startswith("/lfs-upload/"):  # pre-signed storage URL: no token, like S3
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._reply(400, {"error": "sha256 mismatch"})
            with hub.lock:
                hub.lfs[oid] = body
            return self._reply(200)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        try:
            payload = (
                json.loads(body) if body and "ndjson" not in self.headers.get("Content-Type", "") else None
            )
        except ValueError:
            return self._reply(400, {"error": "bad json"})
        return self._route(method, path, payload, body)

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_GET(self) -> None:
        self._handle("GET")

    # --------------------------------------------------------------------- the Hub
    def _route(self, method: str, path: str, payload, body: bytes) -> None:
        hub = self.server
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(
                    409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                )
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            hub.validated_cards.append(payload["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if path == "/lfs-verify":
            return self._reply(200 if payload["oid"] in hub.lfs else 404, {})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, ref = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"})
            if action == "branch":
                if ref in repo["branches"]:
                    return self._reply(409, {"error": "Reference already exists"})
                repo["branches"][ref] = dict(repo["branches"]["main"])
                return self._reply(200, {})
            if action == "preupload":
                files = [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                     "shouldIgnore": False, "oid": None}
                    for f in payload["files"]
                ]  # fmt: skip
                return self._reply(200, {"files": files})
            if action == "commit":
                return self._commit(repo_id, repo, ref, body)
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                             "verify": {"href": f"{hub.url}/lfs-verify"}}}
                for o in payload["objects"]
            ]  # fmt: skip
            return self._reply(200, {"transfer": "basic", "objects": objects})
        return self._reply(404, {"error": f"fake hub: no route for {method} {path}"})

    def _commit(self, repo_id: str, repo: dict, ref: str, body: bytes) -> None:
        hub = self.server
        branch = repo["branches"].get(ref)
        if branch is None:
            return self._reply(404, {"error": f"Invalid rev id: {ref}"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._reply(400, {"error": "commit payload must start with a header"})
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                branch[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in hub.lfs:
                    return self._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                branch[value["path"]] = hub.lfs[value["oid"]]
            else:
                return self._reply(400, {"error": f"fake hub: unsupported commit entry {line['key']}"})
        return self._reply(
            200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40}
        )


def run_cli(*args: str, endpoint: str | None = None, token: str | None = TOKEN, home: Path, **env_extra):
    """Run `moetune ARGS` in a fresh interpreter with a hub environment; (returncode, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_HOME=str(home),  # no stored login from the machine running the tests
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",  # exercise the LFS upload protocol (the fake hub has no Xet storage)
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(ROOT),
    )
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], env=env, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr
