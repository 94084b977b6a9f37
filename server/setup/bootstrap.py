"""First start: download the ChatGLM2-6B checkpoint into the model folder with huggingface_hub.

Only the files the loader uses are fetched (no `*.py`), straight into the model folder (not the user-profile
cache). Each file is transferred by huggingface_hub's `http_get` into `<name>.incomplete`, which survives a
stopped start: the next start resumes it with an HTTP range request (`hf_hub_download` deletes partial files
since huggingface_hub 1.x, so it cannot resume across restarts). Transient failures are retried with backoff.
Every downloaded file is checked against the hub's metadata (size, and the LFS sha256 or git blob id): a
mismatch is deleted and fetched once more, then reported.

Where from: `--mirror auto` (the default) uses huggingface.co when it answers within a few seconds and otherwise
the well-known mirror hf-mirror.com (mainland China cannot reach huggingface.co), saying so on the console; a URL
pins one source.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from ..config import Settings
from ..errors import DownloadError, TransientError  # noqa: F401 (defined in errors.py, importable here too)
from ..model.checkpoint import CACHE_NAME, missing_files
from ..model.disk import free_bytes, has_room

log = logging.getLogger(__name__)

METADATA_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")
WEIGHT_LAYOUTS = (  # preferred first: (index file, shard prefix, shard suffix, single file)
    ("model.safetensors.index.json", "model-", ".safetensors", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model-", ".bin", "pytorch_model.bin"),
)
# --mirror auto: tried in order; the first that accepts a connection within PROBE_SECONDS is used
AUTO_ENDPOINTS = ("https://huggingface.co", "https://hf-mirror.com")
PROBE_SECONDS = 5.0
RETRIES = 5
BACKOFF_SECONDS = 2.0  # doubled after each failed try
MANUAL = ("请手动下载 / Download by hand: https://huggingface.co/{repo}/tree/main "
          "(中国大陆可用镜像 / mainland China mirror: https://hf-mirror.com/{repo}/tree/main) → {folder}")

Report = Callable[..., None]  # report(state, **detail), e.g. Engine.set_state


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1) of small files


def ensure_model(settings: Settings, report: Report | None = None, only: tuple[str, ...] = ()) -> None:
    """Download whatever the model folder lacks (and re-check it with --verify); `only` names the files wanted
    when not the whole model is (a front end needs only tokenizer.model)."""
    folder = settings.model_dir
    if only:
        missing = [name for name in only if not (folder / name).is_file()]
    else:
        missing = missing_files(folder) if folder.is_dir() else ["config.json", "tokenizer.model", "the weights"]
    if not missing and not settings.verify:
        return
    if settings.offline and not missing:
        raise DownloadError("--verify 需要联网 / --verify compares every file with the hub's checksums, so it needs "
                            "the network: drop --offline (or HF_HUB_OFFLINE).")
    if settings.offline:
        raise DownloadError(
            f"离线模式下模型文件缺失 / Offline mode, and the model folder lacks: {', '.join(missing)}.\n"
            + MANUAL.format(repo=settings.repo, folder=folder))
    report = report or (lambda state, **detail: None)
    report("downloading", progress=0.0)
    settings = settings.replace(mirror=choose_endpoint(settings.mirror))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"无法创建模型文件夹 / Cannot create {folder}: {exc.strerror or exc}. "
                            "Choose a folder you can write to with --model-dir.") from exc
    files, commit = remote_files(settings)
    if only:
        files = [f for f in files if f.name in only]
    todo = [f for f in files if not present(folder / f.name, f)]
    if settings.verify:
        for f in files:
            if f not in todo and not verified(folder / f.name, f):
                log.warning("%s does not match the hub's %s: downloading it again", f.name,
                            "size" if not present(folder / f.name, f) else "checksum")
                todo.append(f)
    converted = bool(only) or (folder / CACHE_NAME).exists()  # no conversion follows a partial download
    check_download_space(folder, sum(f.size for f in todo), 0 if converted else sum(f.size for f in files))
    fetch_all(settings, commit, todo, report)


def choose_endpoint(mirror: str | None) -> str:
    """The hub to download from: a pinned URL as is; for auto, the first of AUTO_ENDPOINTS that answers."""
    if mirror and mirror.lower() != "auto":
        return mirror.rstrip("/")
    for endpoint in AUTO_ENDPOINTS:
        if reachable(endpoint):
            if endpoint != AUTO_ENDPOINTS[0]:
                log.warning("%s 连不上，改用镜像 %s / %s cannot be reached: downloading from the mirror %s instead "
                            "(pin a source with mirror = … in settings.ini)", AUTO_ENDPOINTS[0], endpoint,
                            AUTO_ENDPOINTS[0], endpoint)
            return endpoint
    return AUTO_ENDPOINTS[0]  # neither answers: the download's retries then say what is wrong


def reachable(endpoint: str) -> bool:
    """Whether the endpoint's host accepts a TCP connection quickly (a blocked host times out or refuses)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def remote_files(settings: Settings) -> tuple[list[RemoteFile], str]:
    """The files to fetch and the commit they belong to."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.mirror)
    info = with_retries(settings, "read the file list", lambda: api.model_info(
        settings.repo, revision=settings.revision, files_metadata=True))
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = [n for n in METADATA_FILES if n in siblings]
    for index, prefix, suffix, single in WEIGHT_LAYOUTS:
        if index in siblings:
            names += [index] + sorted(n for n in siblings if n.startswith(prefix) and n.endswith(suffix))
            break
        if single in siblings:
            names.append(single)
            break
    if "config.json" not in names or "tokenizer.model" not in names or len(names) <= len(METADATA_FILES):
        raise DownloadError(f"仓库内容不完整 / {settings.repo}@{settings.revision} does not look like a ChatGLM2 "
                            f"checkpoint (it lacks config.json, tokenizer.model or weights). Check --repo.")
    files = [RemoteFile(n, siblings[n].size or 0, siblings[n].lfs.sha256 if siblings[n].lfs else None,
                        siblings[n].blob_id) for n in names]
    return files, info.sha or settings.revision


def fetch_all(settings: Settings, commit: str, files: list[RemoteFile], report: Report) -> None:
    total = sum(f.size for f in files)
    if not files:
        return
    log.info("downloading %d files (%.2f GB) of %s into %s", len(files), total / 1e9, settings.repo,
             settings.model_dir)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"总计 Total ({len(files)} files)", position=0) as overall:
        done = 0  # bytes of the files already finished
        for f in files:
            def progress(n, f=f, done=done):  # n: bytes of this file so far (a re-fetch starts again from 0)
                if done + min(n, f.size) == overall.n:
                    return  # nothing new: each value (100 % too) is reported once
                overall.n = done + min(n, f.size)
                overall.refresh()
                report("downloading", progress=round(overall.n / total, 4), downloaded_bytes=overall.n,
                       total_bytes=total, file=f.name)

            fetch_verified(settings, commit, f, progress)
            progress(f.size)  # complete (also when nothing was left to transfer)
            done += f.size
    report("loading")


def fetch_verified(settings: Settings, commit: str, f: RemoteFile, progress) -> None:
    path = settings.model_dir / f.name
    for attempt in (1, 2):
        with_retries(settings, f"download {f.name}", lambda: fetch(settings, commit, f, progress))
        if verified(path, f):
            return
        log.warning("%s does not match the hub's checksum (try %d); deleting it", f.name, attempt)
        path.unlink(missing_ok=True)
    raise DownloadError(f"文件校验失败 / {f.name} was downloaded twice and both copies fail the checksum. "
                        "The mirror or network may be corrupting data: try another --mirror, or "
                        + MANUAL.format(repo=settings.repo, folder=settings.model_dir))


def with_retries(settings: Settings, what: str, call):
    """Run a hub call; retry transient failures with exponential backoff, then give one clear message."""
    delay = BACKOFF_SECONDS
    for attempt in range(1, RETRIES + 1):
        try:
            return hub_call(settings, what, call)
        except TransientError as exc:
            if attempt == RETRIES:
                raise DownloadError(str(exc)) from exc
            log.warning("%s failed: %s; trying again in %.0f s (%d/%d)", what, exc.__cause__, delay, attempt, RETRIES)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("RETRIES is at least 1")


def fetch(settings: Settings, commit: str, f: RemoteFile, progress) -> None:
    """Transfer one file, continuing `<name>.incomplete` where an earlier try or start left it."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    path = settings.model_dir / f.name
    partial = path.with_name(path.name + ".incomplete")
    if partial.exists() and partial.stat().st_size > f.size:
        partial.unlink()  # cannot be a prefix of this file
    with open(partial, "ab") as out:
        resume = out.tell()
        if resume:
            log.info("resuming %s at %.1f MB", f.name, resume / 1e6)
        if resume < f.size or f.size == 0:
            url = hf_hub_url(settings.repo, f.name, revision=commit, endpoint=settings.mirror)
            # build_hf_headers passes HF_TOKEN on when it is set
            http_get(url, out, resume_size=resume, headers=build_hf_headers(), expected_size=f.size,
                     displayed_filename=f.name, tqdm_class=progress_bar_reporting(progress))
    partial.replace(path)


def progress_bar_reporting(progress):
    """A tqdm class for http_get whose bar also reports this file's bytes to `progress`."""
    class Bar(tqdm):
        def update(self, n=1):
            result = super().update(n)
            progress(self.n)
            return result

    return Bar


# -- checks ----------------------------------------------------------------------------------------------------
def present(path: Path, f: RemoteFile) -> bool:
    return path.is_file() and path.stat().st_size == f.size


def verified(path: Path, f: RemoteFile) -> bool:
    if not present(path, f):
        return False
    if f.sha256:
        return file_digest(path, hashlib.sha256()) == f.sha256
    if f.blob_id:  # git hashes "blob <size>\0" followed by the content
        return file_digest(path, hashlib.sha1(f"blob {f.size}\0".encode())) == f.blob_id
    return True


def file_digest(path: Path, digest) -> str:
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_download_space(folder: Path, download: int, conversion: int) -> None:
    """The download and (unless the converted cache exists) the conversion after it must fit."""
    if not has_room(folder, download + conversion):
        raise DownloadError(
            f"磁盘空间不足 / Not enough disk space in {folder}: the download needs {download / 1e9:.1f} GB and the "
            f"converted copy {conversion / 1e9:.1f} GB, but only {free_bytes(folder) / 1e9:.1f} GB are free. "
            "Free some space, or put the model on another disk with --model-dir.")


# -- errors ----------------------------------------------------------------------------------------------------


def hub_call(settings: Settings, what: str, call):
    """Run a huggingface_hub call; turn its failures into TransientError or one clear DownloadError."""
    from huggingface_hub import errors

    where = settings.mirror or "https://huggingface.co"
    not_found = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                 getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError))
    missing = DownloadError(f"找不到模型仓库 / {settings.repo}@{settings.revision} (or one of its files) was not "
                            f"found on {where} (404). Check --repo, --revision and --mirror.")
    try:
        return call()
    except errors.GatedRepoError as exc:
        raise DownloadError(f"无权访问 / {settings.repo} needs you to accept its terms or log in (401/403): set "
                            "HF_TOKEN to an access token.") from exc
    except not_found as exc:
        log.debug("hub error", exc_info=True)
        raise missing from exc
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        log.debug("hub error", exc_info=True)
        if status in (401, 403):
            raise DownloadError(f"无权访问 / {where} refused access to {settings.repo} ({status}): check HF_TOKEN, "
                                "or try another --mirror.") from exc
        if status == 404:
            raise missing from exc
        raise TransientError(f"{where} answered {status} while trying to {what}") from exc
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            raise DownloadError(f"没有写入权限 / Cannot write {exc.filename} ({exc.strerror}): move the project to a "
                                "folder you can write to, or set model_dir in settings.ini (--model-dir).") from exc
        if exc.errno == 28:  # ENOSPC
            raise DownloadError(f"磁盘已满 / The disk is full ({exc.filename}): free some space and start again; "
                                "the download resumes where it stopped.") from exc
        log.debug("network error", exc_info=True)
        raise TransientError(network_message(where, what, exc)) from exc
    except Exception as exc:  # httpx's network errors are not OSErrors
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "h11"):
            log.debug("network error", exc_info=True)
            raise TransientError(network_message(where, what, exc)) from exc
        raise


def network_message(where: str, what: str, exc: Exception) -> str:
    return (f"无法连接 / Cannot reach {where} to {what} ({type(exc).__name__}: {exc}). Check the network; in "
            f"mainland China set mirror = https://hf-mirror.com in settings.ini (or --mirror). Starting again resumes "
            "the download.")
