"""First start: download the ChatGLM2-6B checkpoint into the model folder with huggingface_hub.

Only the files the loader uses are fetched (no `*.py`), straight into the model folder (not the user-profile
cache). Each file is transferred by huggingface_hub's `http_get` into `<name>.incomplete`, which survives a
stopped start: the next start resumes it with an HTTP range request (`hf_hub_download` deletes partial files
since huggingface_hub 1.x, so it cannot resume across restarts). Transient failures are retried with backoff.
Every downloaded file is checked against the hub's metadata (size, and the LFS sha256 or git blob id): a
mismatch is deleted and fetched once more, then reported.

Where from: `--mirror auto` (the default) tries huggingface.co, then the well-known mirror hf-mirror.com, then
ModelScope (setup/modelscope.py), taking the first that answers within a few seconds and lists the model, and
says so on the console when it is not the first; a URL pins one hub, `modelscope` pins ModelScope.
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
from ..model.checkpoint import CACHE_NAME, PACKED_INT4_SIZE, missing_files
from ..model.disk import free_bytes, has_room
from . import modelscope

log = logging.getLogger(__name__)

# (generation_config.json: ChatGLM3's says it stops on <|user|>, how model/family.py knows it best)
METADATA_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
WEIGHT_LAYOUTS = (  # preferred first: (index file, shard prefix, shard suffix, single file)
    ("model.safetensors.index.json", "model-", ".safetensors", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model-", ".bin", "pytorch_model.bin"),
)
# --mirror auto: tried in order; the first that accepts a connection within PROBE_SECONDS and lists the model
AUTO_SOURCES = ("https://huggingface.co", "https://hf-mirror.com", modelscope.NAME)
PROBE_SECONDS = 5.0
RETRIES = 5
BACKOFF_SECONDS = 2.0  # doubled after each failed try
MANUAL = ("请手动下载 / Download by hand: https://huggingface.co/{repo}/tree/main "
          "(中国大陆可用镜像 / mainland China mirror: https://hf-mirror.com/{repo}/tree/main, or ModelScope) → {folder}")

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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"无法创建模型文件夹 / Cannot create {folder}: {exc.strerror or exc}. "
                            "Choose a folder you can write to with --model-dir.") from exc
    settings, files, commit = list_from_first_source(settings)
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
    # (the folder has no config.json yet to say a repository is packed: chatglm2-6b-int4 converts to float16)
    conversion = sum(f.size for f in files) / (PACKED_INT4_SIZE if "int4" in settings.repo.lower() else 1)
    check_download_space(folder, sum(f.size for f in todo), 0 if converted else int(conversion))
    fetch_all(settings, commit, todo, report)


def list_from_first_source(settings: Settings) -> tuple[Settings, list[RemoteFile], str]:
    """The settings with the source chosen, its file list and commit. A pinned source is used as it is (with
    retries); with auto, a source that does not accept a connection quickly, or refuses to list the model, gives
    way to the next one, and the console says which one is used."""
    if (settings.mirror or "auto").lower() != "auto":
        pinned = settings.mirror if modelscope.is_modelscope(settings.mirror) else settings.mirror.rstrip("/")
        settings = settings.replace(mirror=pinned)
        return (settings, *remote_files(settings))
    for i, source in enumerate(AUTO_SOURCES):
        last = i == len(AUTO_SOURCES) - 1
        if not last and not reachable(source_url(source)):
            log.warning("%s 连不上 / %s cannot be reached; trying %s", source, source, AUTO_SOURCES[i + 1])
            continue
        chosen = settings.replace(mirror=source)
        try:
            files, commit = remote_files(chosen, retries=RETRIES if last else 1)
        except DownloadError as exc:
            if last:
                raise
            log.warning("%s 不可用 / %s did not list %s (%s); trying %s", source, source, settings.repo,
                        str(exc)[:160], AUTO_SOURCES[i + 1])
            continue
        if i:
            log.warning("改用 %s 下载 / downloading from %s instead (pin a source with mirror = … in "
                        "settings.ini)", source, source)
        return chosen, files, commit
    raise AssertionError("the last source either lists the files or raises")


def source_url(source: str) -> str:
    return modelscope.ENDPOINT if modelscope.is_modelscope(source) else source


def reachable(endpoint: str) -> bool:
    """Whether the endpoint's host accepts a TCP connection quickly (a blocked host times out or refuses)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def remote_files(settings: Settings, retries: int = RETRIES) -> tuple[list[RemoteFile], str]:
    """The files to fetch and the commit (or revision) they belong to."""
    if modelscope.is_modelscope(settings.mirror):
        listed = with_retries(settings, "read the file list", lambda: modelscope.list_files(
            settings.repo, settings.revision), retries)
        available = {f["Path"]: RemoteFile(f["Path"], int(f.get("Size") or 0), f.get("Sha256") or None, None)
                     for f in listed}
        return wanted_files(settings, available), modelscope.revision(settings.revision)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.mirror)
    info = with_retries(settings, "read the file list", lambda: api.model_info(
        settings.repo, revision=settings.revision, files_metadata=True), retries)
    available = {s.rfilename: RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
                 for s in info.siblings or []}
    return wanted_files(settings, available), info.sha or settings.revision


def wanted_files(settings: Settings, available: dict[str, RemoteFile]) -> list[RemoteFile]:
    """What the loader uses: the metadata files and one weight layout (no code, no other formats)."""
    names, weights = [n for n in METADATA_FILES if n in available], []
    for index, prefix, suffix, single in WEIGHT_LAYOUTS:
        if index in available:
            weights = [index] + sorted(n for n in available if n.startswith(prefix) and n.endswith(suffix))
            break
        if single in available:
            weights = [single]
            break
    names += weights
    if "config.json" not in names or "tokenizer.model" not in names or not weights:
        raise DownloadError(f"仓库内容不完整 / {settings.repo}@{settings.revision} does not look like a ChatGLM "
                            f"checkpoint (it lacks config.json, tokenizer.model or weights). Check --repo.")
    return [available[n] for n in names]


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


def with_retries(settings: Settings, what: str, call, retries: int = RETRIES):
    """Run a hub call; retry transient failures with exponential backoff, then give one clear message."""
    delay = BACKOFF_SECONDS
    for attempt in range(1, retries + 1):
        try:
            return hub_call(settings, what, call)
        except TransientError as exc:
            if attempt == retries:
                raise DownloadError(str(exc)) from exc
            log.warning("%s failed: %s; trying again in %.0f s (%d/%d)", what, exc.__cause__ or exc, delay, attempt,
                        retries)
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
            if modelscope.is_modelscope(settings.mirror):  # (HF_TOKEN is not sent there)
                url, headers = modelscope.file_url(settings.repo, commit, f.name), {"User-Agent": "my-chatglm2"}
            else:  # build_hf_headers passes HF_TOKEN on when it is set
                url, headers = hf_hub_url(settings.repo, f.name, revision=commit, endpoint=settings.mirror), \
                    build_hf_headers()
            http_get(url, out, resume_size=resume, headers=headers, expected_size=f.size,
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

    where = "ModelScope" if modelscope.is_modelscope(settings.mirror) else settings.mirror or "https://huggingface.co"
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
