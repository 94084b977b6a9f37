"""ModelScope (modelscope.cn, where most people in mainland China get models) as a download source, over its plain
HTTP API. The `modelscope` package is not used: its 6.1 MB wheel (1.40.2) installs to 69 MB and brings
cryptography (16 MB), requests and modelscope-hub into the Windows bundle, for two GET requests; it imports fast
(0.2 s), but with it the transfer, resume and checks would be a second code path instead of the hub's.

The calls, as the modelscope package makes them:
- the file list: `GET {endpoint}/api/v1/models/{owner}/{name}/repo/files?Revision={rev}&Recursive=True` answers
  `{"Code": 200, "Success": true, "Data": {"Files": [{"Path", "Name", "Type": "blob" or "tree", "Size", "Sha256",
  "Revision"}, ...]}}` (an unknown model: an HTTP error, or `Success: false` with a `Message`);
- a file: `GET {endpoint}/api/v1/models/{owner}/{name}/repo?Revision={rev}&FilePath={path}`, which honours `Range`
  (resume), transferred by the same code as the hub's files.
ModelScope keeps the THUDM models under ZhipuAI/<name>, and its default branch is `master`.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

from ..errors import DownloadError, TransientError

log = logging.getLogger(__name__)

NAME = "modelscope"  # the value of --mirror that picks it
ENDPOINT = "https://www.modelscope.cn"
TIMEOUT_SECONDS = 30


def is_modelscope(mirror: str | None) -> bool:
    return (mirror or "").lower() == NAME


def repo_id(hub_repo: str) -> str:
    """ModelScope's name for a hub repository: THUDM/<name> is ZhipuAI/<name> there; others keep their name."""
    owner, _, name = hub_repo.partition("/")
    return f"ZhipuAI/{name}" if owner == "THUDM" else hub_repo


def revision(hub_revision: str) -> str:
    return "master" if hub_revision == "main" else hub_revision


def list_files(hub_repo: str, hub_revision: str) -> list[dict]:
    """The repository's files (dicts with Path, Size, Sha256), or a TransientError / DownloadError."""
    repo = repo_id(hub_repo)
    query = urlencode({"Revision": revision(hub_revision), "Recursive": "True"})
    body = get_json(f"{ENDPOINT}/api/v1/models/{repo}/repo/files?{query}", repo)
    if not body.get("Success", True) or body.get("Code", 200) != 200:
        raise DownloadError(f"找不到模型仓库 / ModelScope has no {repo}@{revision(hub_revision)} "
                            f"({str(body.get('Message', ''))[:100]}). Check --repo and --revision.")
    files = (body.get("Data") or {}).get("Files") or []
    return [f for f in files if isinstance(f, dict) and f.get("Type", "blob") == "blob" and "Path" in f]


def file_url(hub_repo: str, hub_revision: str, path: str) -> str:
    query = urlencode({"Revision": revision(hub_revision), "FilePath": path}, quote_via=quote)
    return f"{ENDPOINT}/api/v1/models/{repo_id(hub_repo)}/repo?{query}"


def get_json(url: str, repo: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "my-chatglm2"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 401, 403):
            raise DownloadError(f"找不到模型仓库 / ModelScope answered {exc.code} for {repo}: it has no such "
                                "model, or it is not public. Check --repo, or choose another --mirror.") from exc
        raise TransientError(f"ModelScope answered {exc.code} while listing {repo}") from exc
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors; ValueError: not JSON
        raise TransientError(f"无法连接 / Cannot read ModelScope's file list of {repo} "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from exc
    if not isinstance(body, dict):
        raise TransientError(f"ModelScope's file list of {repo} is not a JSON object")
    return body
