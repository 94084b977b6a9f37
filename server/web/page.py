"""The built-in browser client at /ui/: static files, Markdown rendering on the server, the app manifest and icons.

Markdown is rendered here with markdown-it-py (raw HTML disabled, so model output can never inject markup) and
Pygments, so the page needs no JavaScript build step and no third-party code.
"""

from __future__ import annotations

import struct
import threading
import zlib
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, jsonify, redirect, request, send_from_directory
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from .validation import ApiError, json_body, text

STATIC = Path(__file__).resolve().parent / "webui"
MAX_RENDER_CHARS = 64_000  # a whole 8,192-token reply is ~30,000 characters; a 180 KB table took 16 s of CPU
RENDERS = threading.BoundedSemaphore(2)  # rendering never takes more than two of the threads that serve the API

bp = Blueprint("web", __name__, url_prefix="/ui")
# The page's types, named here rather than guessed: on Windows Python's mimetypes reads the registry, where .js
# and .css are often text/plain, and a browser ignores a stylesheet (and refuses a module script) of that type.
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".webmanifest": "application/manifest+json", ".png": "image/png",
         ".svg": "image/svg+xml", ".json": "application/json"}


def static(name: str) -> Response:
    return send_from_directory(STATIC, name, max_age=0, mimetype=TYPES.get(Path(name).suffix.lower()))


def highlight_code(code: str, lang: str, _attrs) -> str:
    try:
        lexer = get_lexer_by_name(lang) if lang else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes and wraps it
    return highlight(code, lexer, HtmlFormatter(nowrap=True, classprefix="hl-"))


def link_open(renderer, tokens, idx, options, env) -> str:
    """Links open in a new window, telling the target nothing about this page."""
    tokens[idx].attrSet("target", "_blank")
    tokens[idx].attrSet("rel", "noopener noreferrer")
    return renderer.renderToken(tokens, idx, options, env)


def image(renderer, tokens, idx, options, env) -> str:
    """An image is a button that loads it when clicked: a reply must not fetch a remote address (a tracking
    pixel) just by being shown."""
    token = tokens[idx]
    alt = renderer.renderInlineAsText(token.children or [], options, env)
    src = token.attrGet("src") or ""
    return (f'<button type="button" class="remote-image" data-src="{escapeHtml(src)}" title="{escapeHtml(src)}">'
            f'🖼 {escapeHtml(alt or src)}</button>')


MARKDOWN = MarkdownIt("commonmark", {"html": False, "highlight": highlight_code}).enable(["table", "strikethrough"])
MARKDOWN.add_render_rule("link_open", link_open)
MARKDOWN.add_render_rule("image", image)


def render_markdown(source: str) -> str:
    return MARKDOWN.render(source)


@bp.get("/")
def page():
    return static("index.html")


@bp.get("")
def page_without_slash():
    return redirect("/ui/", code=308)


@bp.get("/<path:name>")
def static_file(name: str):
    return static(name)


@bp.post("/render")
def render():
    source = text(json_body(request), "text", required=True)
    if len(source) > MAX_RENDER_CHARS:
        raise ApiError(413, f"'text' has {len(source)} characters; at most {MAX_RENDER_CHARS} are rendered",
                       param="text")
    if not RENDERS.acquire(blocking=False):
        raise ApiError(429, "the server is rendering other replies; try again in a moment", headers={"Retry-After": "1"})
    try:
        return jsonify({"html": render_markdown(source)})
    finally:
        RENDERS.release()


@bp.get("/pygments.css")
def pygments_css():
    light = HtmlFormatter(style="friendly", classprefix="hl-").get_style_defs(".md pre")
    # dark with the system's dark mode unless the page is switched to light, and whenever switched to dark
    dark = HtmlFormatter(style="monokai", classprefix="hl-")
    css = (f"{light}\n@media (prefers-color-scheme: dark) {{\n"
           f"{dark.get_style_defs(':root:not([data-theme=light]) .md pre')}\n}}\n"
           f"{dark.get_style_defs('[data-theme=dark] .md pre')}\n")
    return Response(css, content_type="text/css; charset=utf-8")


@bp.get("/icon-<int:size>.png")
@bp.get("/icon-maskable-<int:size>.png", defaults={"maskable": True})
def icon(size: int, maskable: bool = False):
    if size not in (192, 512):
        return jsonify({"success": False, "message": "icons come in 192 and 512 pixels"}), 404
    return Response(icon_png(size, maskable), content_type="image/png", headers={"Cache-Control": "max-age=86400"})


@bp.get("/sw.js")
def service_worker():
    # served without caching, so that a changed worker replaces the old one at the next visit
    return static("sw.js")


@lru_cache(maxsize=4)
def icon_png(size: int, maskable: bool = False) -> bytes:
    """The app icon, drawn here: a white speech bubble on a blue rounded square. The maskable variant fills the
    whole square (the launcher cuts its own shape) and keeps the bubble inside the central safe zone."""
    rows = []
    r = 0 if maskable else size * 0.22  # corner radius of the square
    for y in range(size):
        row = bytearray([0])  # PNG filter byte
        for x in range(size):
            cx, cy = min(max(x, r), size - r), min(max(y, r), size - r)
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
            bx, by = (x - size * 0.5) / (size * 0.3), (y - size * 0.45) / (size * 0.22)
            bubble = bx * bx + by * by <= 1 or (size * 0.3 < x < size * 0.45 and size * 0.55 < y < size * 0.75
                                                 and (x - size * 0.3) > (y - size * 0.55) * 0.75)
            if not inside:
                row += b"\x00\x00\x00\x00"
            elif bubble:
                row += b"\xff\xff\xff\xff"
            else:
                shade = int(200 - 60 * y / size)
                row += bytes([37, 99, shade, 255])
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) \
        + chunk(b"IEND", b"")
