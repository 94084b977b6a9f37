"""A loopback HTTP server speaking the part of the Hugging Face hub protocol that huggingface_hub uses here:
model info with file metadata, `resolve` HEAD/GET with the hub's headers, and HTTP range requests.

It can cut a file midway, corrupt it, fail with a status, or throttle, and it records every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".bin", ".safetensors", ".model")


class FakeHub:
    def __init__(self, folder: Path, repo: str = "THUDM/chatglm2-6b"):
        self.repo = repo
        self.commit = "0123456789abcdef0123456789abcdef01234567"
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.log: list[dict] = []  # method, path, range, bytes sent, user agent
        self.cut_once: set[str] = set()  # the next GET sends half the file, then drops the connection
        self.corrupt: dict[str, int] = {}  # name -> how many more GETs send damaged bytes
        self.fail: dict[str, int] = {}  # name -> status answered to every later GET of it
        self.bytes_per_second: float | None = None
        self.deny: int | None = None  # answer every request with this status (401, 403)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- metadata --------------------------------------------------------------------------------------------
    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data),
                 "blobId": hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def etag(self, name: str) -> str:
        entry = self.sibling(name)
        return entry["lfs"]["sha256"] if "lfs" in entry else entry["blobId"]

    # -- requests --------------------------------------------------------------------------------------------
    def handle(self, req: BaseHTTPRequestHandler, head: bool):
        entry = {"method": req.command, "path": req.path, "range": req.headers.get("Range"), "sent": 0,
                 "agent": req.headers.get("User-Agent", "")}
        self.log.append(entry)
        if self.deny:
            return self.error(req, self.deny, None, "Access denied")
        path = req.path.split("?")[0]
        info = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        resolve = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
        if info:
            if info.group(1) != self.repo:
                return self.error(req, 404, "RepoNotFound", "Repository not found")
            body = {"id": self.repo, "modelId": self.repo, "sha": self.commit, "private": False,
                    "siblings": [self.sibling(n) for n in self.files]}
            return self.send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head, entry)
        if resolve:
            repo, _revision, name = resolve.groups()
            if repo != self.repo:
                return self.error(req, 404, "RepoNotFound", "Repository not found")
            if name not in self.files:
                return self.error(req, 404, "EntryNotFound", "Entry not found")
            return self.send_file(req, name, head, entry)
        return self.error(req, 404, None, "Not found")

    def send_file(self, req, name: str, head: bool, entry: dict):
        data = self.files[name]
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{self.etag(name)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{self.etag(name)}"', "X-Linked-Size": str(len(data))})
        if head:
            return self.send(req, 200, data, headers, True, entry)
        if name in self.fail and name not in self.cut_once:
            return self.error(req, self.fail[name], None, "Service unavailable")
        if self.corrupt.get(name, 0) > 0:
            self.corrupt[name] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if match else 200
        if name in self.cut_once:
            self.cut_once.discard(name)
            half = data[start: start + (len(data) - start) // 2]
            req.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data) - start)}.items():
                req.send_header(key, value)
            req.end_headers()
            req.wfile.write(half)
            req.wfile.flush()
            entry["sent"] = len(half)
            req.close_connection = True
            return None
        return self.send(req, status, data[start:], headers, False, entry)

    def send(self, req, status, body: bytes, headers: dict, head: bool, entry: dict):
        req.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(key, value)
        req.end_headers()
        if head:
            return
        step = 8192
        for i in range(0, len(body), step):
            if self.bytes_per_second:
                time.sleep(step / self.bytes_per_second)
            req.wfile.write(body[i:i + step])
            entry["sent"] += len(body[i:i + step])

    def error(self, req, status: int, code: str | None, message: str):
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        req.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(body)

    def gets(self, name: str) -> list[dict]:
        return [e for e in self.log if e["method"] == "GET" and e["path"].endswith("/" + name)]
