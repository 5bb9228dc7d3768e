"""The live page in a real browser: Debian's Chromium, driven by Playwright, against the
real gateway (``DEMO_PAGE=true``), Kafka, PostgreSQL and auth stand-in.

Chromium comes from ``scripts/browser.sh`` (``make test`` runs it); Playwright is pointed
at it with ``executable_path`` and never downloads a browser. The test saves a screenshot
to ``.cache/demo-page.png``, and to the path in ``DEMO_SCREENSHOT`` when that is set
(``DEMO_SCREENSHOT=docs/demo-page.png`` refreshes the README's picture).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from dev.auth_server import AuthStandIn

from .clients import console_produce
from .conftest import GatewayFactory

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 30_000


def line(user_id: str, subject: str, content: str) -> str:
    record = {
        "message_id": str(uuid.uuid4()),
        "delivery_method": "push",
        "user_id": user_id,
        "subject": subject,
        "content": content,
    }
    return json.dumps(record, ensure_ascii=False)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/browser.sh (make test does)")
    async with async_playwright() as playwright:
        # --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        yield launched
        await launched.close()


async def titles(page: Page) -> list[str]:
    return await page.locator("#list li .title").all_inner_texts()


async def test_live_page_shows_notifications_and_survives_a_gateway_restart(
    browser: Browser,
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    kafka_bootstrap: str,
) -> None:
    """The page shows a produced notification, says "reconnecting" while the gateway is
    down, and shows the notifications produced meanwhile once it is back, each once."""
    gateway = await asyncio.to_thread(gateway_factory, DEMO_PAGE="true", LOG_LEVEL="INFO")
    user = str(uuid.uuid4())
    token = auth_server.issue(user)
    page = await browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{gateway.base}/demo/#token={token}")
    state = page.locator("#state")
    await expect(state).to_have_attribute("data-state", "open")
    await expect(page.locator("#protocol")).to_have_text("protocol v2")
    assert token not in page.url, "the page takes the token out of the address bar"

    await console_produce(
        kafka_bootstrap,
        topics[0],
        line(user, "Новый фильм", "Фильм 'Как закалялась сталь' теперь доступен для просмотра"),
    )
    await expect(page.locator("#list li")).to_have_count(1)
    await expect(page.locator("#list li .title")).to_have_text("Новый фильм")
    await expect(page.locator("#unread")).to_have_text("1")

    await asyncio.to_thread(gateway.stop)  # SIGTERM: the page's connection is closed with 1001
    await expect(state).to_have_attribute("data-state", "reconnecting")
    # The page's event list says why: the gateway went away (1001); the attempts that
    # follow fail while it is down (1006), and the last close code shows that.
    await expect(page.locator("#events")).to_contain_text("going away (deploy or scale-in) (1001)")
    await console_produce(
        kafka_bootstrap,
        topics[0],
        line(user, "Скидка 50%", "Только сегодня: подписка за полцены")
        + "\n"
        + line(user, "New episode", "Season 2, episode 5 is out"),
    )

    await asyncio.to_thread(gateway.start)
    await expect(state).to_have_attribute("data-state", "open")
    # A restart is not a downgrade: acknowledged delivery again.
    await expect(page.locator("#protocol")).to_have_text("protocol v2")
    await expect(page.locator("#list li")).to_have_count(3)
    await asyncio.sleep(1.5)  # room for a duplicate to show up
    assert sorted(await titles(page)) == sorted(["Новый фильм", "Скидка 50%", "New episode"])
    await expect(page.locator("#unread")).to_have_text("3")
    assert token not in gateway.logs()

    await page.locator("#list li").last.click()  # read the oldest: the count follows
    await expect(page.locator("#unread")).to_have_text("2")

    shot = ROOT / ".cache" / "demo-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(shot))
    if target := os.environ.get("DEMO_SCREENSHOT"):
        await page.screenshot(path=str(ROOT / target))


async def test_live_page_from_a_forbidden_origin_stops(
    browser: Browser, gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """A page whose origin is not in ALLOWED_ORIGINS is closed with 4403 and stops: the
    browser sets Origin itself, so this is the real path of a page on another site."""
    gateway = await asyncio.to_thread(
        gateway_factory, DEMO_PAGE="true", ALLOWED_ORIGINS="https://app.example"
    )
    token = auth_server.issue(str(uuid.uuid4()))
    page = await browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{gateway.base}/demo/#token={token}")
    await expect(page.locator("#state")).to_have_attribute("data-state", "stopped")
    await expect(page.locator("#close-code")).to_have_text("4403")
    await asyncio.sleep(2)
    await expect(page.locator("#state")).to_have_attribute("data-state", "stopped")
