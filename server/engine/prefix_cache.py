"""The prefix cache: keys and values of recent sequences, so a prompt that starts like one of them (the next turn
of a chat repeats the whole conversation so far) only runs its new tokens through the model.

Entries live in host memory (RAM, never VRAM, so they cannot push a job into out-of-memory on a GPU) within a
byte budget; the least recently used go first. Behind it an optional disk tier (prefix_disk.py) keeps them
across restarts. A lookup takes the entry with the longest common token prefix,
cut to that prefix. Entries are never written to: caches only ever concatenate into new tensors, so a job can
start from an entry's tensors without copying them on a CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

Tensors = list[tuple[torch.Tensor, torch.Tensor]]  # keys and values per layer, [1, heads, length, dim]


@dataclass
class Entry:
    ids: list[int]
    tensors: Tensors

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self.tensors)


class PrefixCache:
    def __init__(self, max_bytes: int, disk=None):
        self.max_bytes = max_bytes
        self.disk = disk  # a DiskPrefixCache (prefix_disk.py) behind this one, or None
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self._lock = threading.Lock()  # the worker stores and looks up; /health reads the totals
        self._next_key = 0

    def lookup(self, ids: list[int], device) -> tuple[int, Tensors | None]:
        """(n, the first n positions' keys and values on `device`) for the longest cached prefix of `ids`, at
        most len(ids) - 1 long: the last prompt token always runs, since its logits are what comes next."""
        limit = len(ids) - 1
        with self._lock:
            best, best_key = 0, None
            for key, entry in self.entries.items():
                n = common_prefix(entry.ids, ids, limit=limit)
                if n > best:
                    best, best_key = n, key
            tensors = None
            if best_key is not None:
                self.entries.move_to_end(best_key)
                tensors = self.entries[best_key].tensors
        if self.disk is not None:  # a longer prefix on disk (a conversation from before a restart)?
            on_disk, entry = self.disk.best(ids, limit)
            loaded = self.disk.load(entry, on_disk) if entry is not None and on_disk > best else None
            if loaded is not None:  # (only the positions in common: the rest of that conversation stays on disk)
                best, tensors = on_disk, loaded
                self._insert(Entry(entry.ids[:on_disk], loaded))
        if tensors is None:
            return 0, None
        return best, [(keys[:, :, :best].to(device), values[:, :, :best].to(device)) for keys, values in tensors]

    def store(self, ids: list[int], tensors: Tensors, on_disk: bool = True) -> None:
        """Keep the keys and values of `ids` (host tensors the cache now owns), also in the disk tier unless
        `on_disk` is False (what every conversation starts with: the first conversation stored extends it and
        takes its place); drop what this entry makes redundant (entries that are prefixes of it) and the least
        recently used beyond the budget."""
        entry = Entry(list(ids), tensors)
        if not ids:
            return
        if self.disk is not None and on_disk:
            self.disk.put(entry.ids, tensors)
        if entry.nbytes <= self.max_bytes:
            self._insert(entry)

    def _insert(self, entry: Entry) -> None:
        ids = entry.ids
        with self._lock:
            for key in [k for k, e in self.entries.items() if common_prefix(e.ids, ids) == len(e.ids)]:
                self.bytes -= self.entries.pop(key).nbytes
            self.entries[self._next_key] = entry
            self._next_key += 1
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1].nbytes

    def usage(self) -> dict:
        """What /health shows."""
        with self._lock:
            shown = {"entries": len(self.entries), "mb": round(self.bytes / 1024**2, 1),
                     "max_mb": round(self.max_bytes / 1024**2)}
        if self.disk is not None:
            shown["disk"] = self.disk.usage()
        return shown

    def __len__(self) -> int:
        return len(self.entries)


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many ids a and b share from the start (at most `limit`)."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    if n <= 0:
        return 0
    differ = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(differ[0]) if len(differ) else n
