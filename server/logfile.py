"""Log files that rotate and stay quiet when the disk is full: one console line a minute, not a traceback a
record (a full disk printed ~25 lines for every lost chat-log record)."""

from __future__ import annotations

import sys
import time
from logging.handlers import RotatingFileHandler

COMPLAIN_EVERY = 60.0  # seconds


class LogFile(RotatingFileHandler):
    def __init__(self, path, max_bytes: int, backups: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.lost = 0
        self.complained_at = -COMPLAIN_EVERY

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last flush found the disk full: those records were counted as lost already
            pass

    def handleError(self, record) -> None:  # noqa: N802 (logging's name)
        self.lost += 1
        now = time.monotonic()
        if now - self.complained_at < COMPLAIN_EVERY:
            return
        self.complained_at = now
        error = sys.exc_info()[1]
        try:
            sys.stderr.write(f"无法写入 / cannot write {self.baseFilename}: {error} ({self.lost} records lost so far; "
                             f"is the disk full?)\n")
        except Exception:  # no console either: nothing more to do
            pass
