"""The live demo page's routes (DEMO_PAGE=true): four fixed files, nothing else."""

from __future__ import annotations

from typing import Any

from sanic import Sanic

from service.config import DEMO_ROOT
from service.demo import add_demo_routes


def app_with_page() -> Sanic[Any, Any]:
    app: Sanic[Any, Any] = Sanic(f"demo_{id(object())}", configure_logging=False)
    add_demo_routes(app)
    return app


async def test_the_page_and_the_client_module_are_served() -> None:
    """/demo/ is the page; its script, style and the client module sit beside it."""
    client = app_with_page().asgi_client
    _, page = await client.get("/demo/")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.body == (DEMO_ROOT / "demo" / "index.html").read_bytes()
    _, module = await client.get("/demo/notify-client.js")
    assert module.status == 200
    assert module.headers["content-type"].startswith("text/javascript")
    assert module.body == (DEMO_ROOT / "notify-client.js").read_bytes()
    for name in ("demo.js", "demo.css"):
        _, answer = await client.get(f"/demo/{name}")
        assert answer.status == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]


async def test_demo_without_slash_redirects_so_relative_links_work() -> None:
    """/demo redirects to /demo/: the page's relative links would otherwise miss."""
    _, answer = await app_with_page().asgi_client.get("/demo", follow_redirects=False)
    assert answer.status in (301, 302)
    assert answer.headers["location"] == "/demo/"


async def test_nothing_else_is_served() -> None:
    """Other names, and paths that climb out of the folder, are 404."""
    client = app_with_page().asgi_client
    for path in ("/demo/package.json", "/demo/..%2Fpackage.json", "/demo/README.md", "/demo/x/y"):
        _, answer = await client.get(path)
        assert answer.status == 404, path
