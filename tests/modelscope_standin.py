"""A loopback stand-in of ModelScope's model API: the two calls server/setup/modelscope.py makes.

Framing implemented here (as the modelscope package and modelscope.cn use it):
- `GET /api/v1/models/{owner}/{name}/repo/files?Revision=master&Recursive=True` ->
  200 `{"Code": 200, "Success": true, "Message": "success", "Data": {"Files": [{"Name", "Path", "Type": "blob",
  "Size", "Sha256", "Revision": <commit>}, ...]}}`; one `"Type": "tree"` entry (a folder) is listed too, as the
  real list has them. Another repository: 200 `{"Code": 10010205001, "Success": false, "Message": "..."}`.
- `GET /api/v1/models/{owner}/{name}/repo?Revision=master&FilePath={path}` -> the file's bytes, 206 with
  `Content-Range` for `Range: bytes=N-`; an unknown path: 404.
The faults of FakeHub (cut a transfer midway, corrupt, fail, deny) work the same way here.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import parse_qs, urlsplit

from tests.fake_hub import FakeHub


class ModelScopeStandin(FakeHub):
    def __init__(self, folder, repo: str = "ZhipuAI/chatglm2-6b"):
        super().__init__(folder, repo)

    def file_entry(self, name: str) -> dict:
        data = self.files[name]
        return {"Name": name, "Path": name, "Type": "blob", "Size": len(data),
                "Sha256": hashlib.sha256(data).hexdigest(), "Revision": self.commit}

    def handle(self, req, head: bool):
        url = urlsplit(req.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        entry = {"method": req.command, "path": url.path, "query": query, "range": req.headers.get("Range"),
                 "sent": 0, "agent": req.headers.get("User-Agent", ""),
                 "authorization": req.headers.get("Authorization")}
        self.log.append(entry)
        if self.deny:
            return self.error(req, self.deny, None, "Access denied")
        prefix = f"/api/v1/models/{self.repo}/repo"
        if url.path == prefix + "/files":
            if query.get("Revision") != "master":
                return self.reply(req, {"Code": 10010205001, "Success": False, "Message": "revision not found"},
                                  head, entry)
            files = [self.file_entry(n) for n in self.files] + [{"Name": "assets", "Path": "assets", "Type": "tree",
                                                                 "Size": 0, "Sha256": ""}]
            return self.reply(req, {"Code": 200, "Success": True, "Message": "success", "Data": {"Files": files}},
                              head, entry)
        if url.path.startswith("/api/v1/models/") and url.path.endswith("/files"):
            return self.reply(req, {"Code": 10010205001, "Success": False, "Message": "model not found"}, head, entry)
        if url.path == prefix and query.get("FilePath") in self.files:
            return self.send_file(req, query["FilePath"], head, entry)
        return self.error(req, 404, None, "Not found")

    def reply(self, req, body: dict, head: bool, entry: dict):
        return self.send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head, entry)

    def downloads(self, name: str) -> list[dict]:
        return [e for e in self.log if e["method"] == "GET" and e["query"].get("FilePath") == name]
