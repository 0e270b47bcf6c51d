from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("AGORA_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("AGORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"Chromium is required but missing at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
        )
        yield browser
        browser.close()
