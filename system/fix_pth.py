"""Run by the launchers before `python -m server`: the embedded Python's ._pth names the bundle (standard
library only; it runs before anything of the bundle can be imported).

The bundle's Python lives in system\\python\\ (as the original lazy pack had it) or, in earlier bundles of this project,
directly in system\\. Its python3XX._pth decides sys.path: the standard library zip, its own folder, the bundle's
root (for `-m server`), Lib\\site-packages, and `import site`. A Python that a user unzipped there by hand, as the
original instructions said, still has python.org's ._pth, which leaves out the bundle and its packages: this
writes the bundle's lines into it (the same lines tools/build_pack.py writes; tests/test_windows_pack.py checks).
"""

from __future__ import annotations

import sys
from pathlib import Path


def pth_lines(stem: str, depth: int) -> list[str]:
    """The ._pth of python3XX (`stem`) `depth` folders below the bundle's root."""
    return [f"{stem}.zip", ".", "\\".join([".."] * depth), "Lib\\site-packages", "import site"]


def fix(python_dir: Path, root: Path) -> list[str]:
    """Rewrite every python3XX._pth in `python_dir` that differs from the bundle's lines; the names rewritten."""
    depth = len(python_dir.resolve().relative_to(root.resolve()).parts)
    fixed = []
    for pth in sorted(python_dir.glob("python3*._pth")):
        lines = pth_lines(pth.stem, depth)
        if pth.read_text(encoding="utf-8", errors="replace").splitlines() != lines:
            pth.write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))
            fixed.append(pth.name)
    return fixed


if __name__ == "__main__":
    bundle = Path(__file__).resolve().parent.parent
    for name in fix(Path(sys.executable).resolve().parent, bundle):
        print(f"[my-chatglm2] {name}: set up for the bundle (a Python unzipped by hand) / 已为懒人包配置", flush=True)
