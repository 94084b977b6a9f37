"""The prefix cache's second tier on disk: the keys and values of finished conversations survive a restart.

Each entry is one safetensors file (`ids` and per layer `k.N`, `v.N`) in a folder named after a fingerprint of
everything its numbers depend on (the model's files, the cache format, the compute dtype, at 8-bit the int8
kernel, and this format's version): another model or precision never reads them, and folders of other
fingerprints are removed at start. A file is written after the reply, on a thread of its own, to a temporary
name and renamed, so a kill leaves either the whole file or a `.tmp` that the next start deletes. Within the byte budget the
least recently used files go first; an entry that a newer one extends (the previous turn of the same chat) is
deleted when the newer one is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .prefix_cache import Tensors, common_prefix

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FOLDER = "prompt-cache"  # beside the converted caches, in the model folder


@dataclass
class DiskEntry:
    path: Path
    ids: list[int]
    nbytes: int


class DiskPrefixCache:
    def __init__(self, root: Path, fingerprint: dict, max_bytes: int):
        self.max_bytes = max_bytes
        key = hashlib.sha256(json.dumps({**fingerprint, "version": FORMAT_VERSION}, sort_keys=True).encode())
        self.folder = root / FOLDER / key.hexdigest()[:16]
        for other in (root / FOLDER).glob("*") if (root / FOLDER).is_dir() else []:
            if other != self.folder:  # another model, precision or format: its entries can never be used
                shutil.rmtree(other, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, DiskEntry] = {}  # file name -> entry, oldest use first
        self._lock = threading.Lock()
        self._writes: queue.Queue = queue.Queue()
        self._index()
        threading.Thread(target=self._writer, name="prompt-cache-writer", daemon=True).start()

    def _index(self) -> None:
        from safetensors import safe_open

        for path in sorted(self.folder.iterdir(), key=lambda p: p.stat().st_mtime):
            if path.suffix != ".safetensors":  # a temporary file of a write that a kill interrupted
                path.unlink(missing_ok=True)
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    ids = f.get_tensor("ids").tolist()
            except Exception:  # damaged or not ours: it goes
                log.warning("removing unreadable prompt cache file %s", path.name)
                path.unlink(missing_ok=True)
                continue
            self.entries[path.name] = DiskEntry(path, ids, path.stat().st_size)

    @property
    def bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def best(self, ids: list[int], limit: int) -> tuple[int, DiskEntry | None]:
        """The entry sharing the longest prefix with `ids` (at most `limit` tokens)."""
        with self._lock:
            found = max(((common_prefix(e.ids, ids, limit), e) for e in self.entries.values()),
                        key=lambda pair: pair[0], default=(0, None))
        return found

    def load(self, entry: DiskEntry, positions: int) -> Tensors | None:
        """The keys and values of the entry's first `positions` positions; only those are read (a new chat shares
        a long conversation's system prompt, say, not all of it)."""
        from safetensors import safe_open

        try:
            with safe_open(str(entry.path), framework="pt") as file:
                layers = len([name for name in file.keys() if name.startswith("k.")])
                tensors = [(file.get_slice(f"k.{i}")[:, :, :positions], file.get_slice(f"v.{i}")[:, :, :positions])
                           for i in range(layers)]
        except Exception:  # deleted or damaged since: a miss, not an error
            with self._lock:
                self.entries.pop(entry.path.name, None)
            return None
        with self._lock:  # used now: the last to go
            self.entries[entry.path.name] = self.entries.pop(entry.path.name, entry)
        return tensors

    def put(self, ids: list[int], tensors: Tensors) -> None:
        """Write this entry in the background (the worker never waits for the disk)."""
        self._writes.put((list(ids), tensors))

    def flush(self) -> None:
        """Wait until every entry handed over so far is on disk (tests, shutdown)."""
        self._writes.join()

    def _writer(self) -> None:
        while True:
            ids, tensors = self._writes.get()
            try:
                self._write(ids, tensors)
            except OSError as exc:  # a full or read-only disk: the memory tier still works
                log.warning("could not write the prompt cache: %s", exc)
            except Exception:
                log.exception("could not write the prompt cache")
            finally:
                self._writes.task_done()

    def _write(self, ids: list[int], tensors: Tensors) -> None:
        from safetensors.torch import save_file

        name = hashlib.sha256(torch.tensor(ids, dtype=torch.int32).numpy().tobytes()).hexdigest()[:32]
        path = self.folder / f"{name}.safetensors"
        state = {"ids": torch.tensor(ids, dtype=torch.int32)}
        for i, (keys, values) in enumerate(tensors):
            state[f"k.{i}"], state[f"v.{i}"] = keys.contiguous(), values.contiguous()
        size = sum(t.nbytes for t in state.values())
        if size > self.max_bytes:
            return
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        with self._lock:
            extended = [e for e in self.entries.values() if common_prefix(e.ids, ids) == len(e.ids)]
            for old in extended:  # the previous turns of this conversation: this entry holds them all
                self.entries.pop(old.path.name, None)
                if old.path != path:
                    old.path.unlink(missing_ok=True)
            self.entries[path.name] = DiskEntry(path, ids, path.stat().st_size)
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                oldest = next(iter(self.entries.values()))
                del self.entries[oldest.path.name]
                oldest.path.unlink(missing_ok=True)

    def usage(self) -> dict:
        with self._lock:
            return {"entries": len(self.entries), "mb": round(self.bytes / 1024**2, 1),
                    "max_mb": round(self.max_bytes / 1024**2)}
