"""Free disk space, asked in one place: before a download, before a conversion, and for the prompt cache's
default."""

from __future__ import annotations

import shutil
from pathlib import Path


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would: its nearest existing parent); 0 when unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def has_room(folder: Path, needed: int) -> bool:
    """Whether `needed` bytes fit, with 5 % to spare (file systems round up, temporary files come and go)."""
    return free_bytes(folder) >= needed * 1.05
