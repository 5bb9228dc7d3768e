"""The live demo page (``DEMO_PAGE=true``): a notification list that uses the JS client.

Three fixed files under ``/demo/`` plus the client module beside them, read once when
the application is built. Nothing else is served: the names are a fixed table, so no
request path reaches the file system. The page reads its token from the URL's
fragment (``#token=``), which browsers never send to a server; a ``?token=`` query is
accepted by the page too, and the access log never writes a query string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import NotFound
from sanic.response import HTTPResponse, raw, redirect

from .config import DEMO_ROOT

DEMO_PATH = "/demo"

# name under /demo/ -> (file under clients/js, content type)
_FILES = {
    "": ("demo/index.html", "text/html; charset=utf-8"),
    "demo.css": ("demo/demo.css", "text/css; charset=utf-8"),
    "demo.js": ("demo/demo.js", "text/javascript; charset=utf-8"),
    "notify-client.js": ("notify-client.js", "text/javascript; charset=utf-8"),
}

# Scripts and styles from this origin only; the WebSocket to any gateway the page is
# pointed at.
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "frame-ancestors 'none'"
    ),
}


def load_files(root: Path = DEMO_ROOT) -> dict[str, tuple[bytes, str]]:
    """The page's files, by name under ``/demo/``. Raises ``OSError`` if one is missing."""
    return {name: ((root / path).read_bytes(), kind) for name, (path, kind) in _FILES.items()}


def add_demo_routes(app: Sanic[Any, Any], root: Path = DEMO_ROOT) -> None:
    """Serve the demo page at ``/demo/`` on ``app``. Raises ``OSError`` if a file is missing."""
    files = load_files(root)

    # Strict: /demo must redirect, or the page's relative links would resolve to /.
    @app.get(DEMO_PATH, strict_slashes=True)
    async def demo_redirect(request: Request) -> HTTPResponse:
        return redirect(f"{DEMO_PATH}/")

    @app.get(f"{DEMO_PATH}/", strict_slashes=True)
    async def demo_page(request: Request) -> HTTPResponse:
        return _file(files, "")

    @app.get(f"{DEMO_PATH}/<name:str>")
    async def demo_file(request: Request, name: str) -> HTTPResponse:
        return _file(files, name)


def _file(files: dict[str, tuple[bytes, str]], name: str) -> HTTPResponse:
    found = files.get(name)
    if found is None:
        raise NotFound("not found")
    body, kind = found
    return raw(body, content_type=kind, headers=_HEADERS)
