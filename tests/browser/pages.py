"""Helpers for the Chromium tests: log in through the form, and screenshots at desktop and phone widths."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings

PASSWORD = "correct horse battery"
WIDTHS = {"desktop": 1280, "phone": 390}


def screenshot_dir() -> Path:
    """Where the journeys leave their screenshots: AGORA_SCREENSHOTS, else <AGORA_VAR_DIR>/screenshots."""
    folder = Path(os.environ.get("AGORA_SCREENSHOTS", str(Path(settings.VAR_DIR) / "screenshots")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_page(browser, base_url: str, *, width: int = WIDTHS["desktop"]):
    page = browser.new_context(base_url=base_url, viewport={"width": width, "height": 900}).new_page()
    page.set_default_timeout(15_000)
    return page


def log_in(browser, base_url: str, username: str, *, width: int = WIDTHS["desktop"]):
    page = new_page(browser, base_url, width=width)
    page.goto("/accounts/login/")
    page.fill("input[name=login]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("form button[type=submit], form input[type=submit]")
    page.wait_for_load_state()
    return page


def shoot(page, name: str) -> list[Path]:
    """Full-page screenshots of the current page at 1280 and 390 pixels wide; returns the files."""
    files = []
    original = page.viewport_size
    for width in WIDTHS.values():
        page.set_viewport_size({"width": width, "height": 900})
        path = screenshot_dir() / f"{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        files.append(path)
    page.set_viewport_size(original)
    return files
