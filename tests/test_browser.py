"""The playground in real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium): type a prefix, generate, watch the samples arrive, see them in the recent list. The
screenshot lands in artifacts/playground.png."""

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest
from botkit.adapters.web_adapter import WebAdapter

from botkit.config import Config, LimitsConfig, WebConfig
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "Chromium is absent: apt-get install chromium chromium-driver (as .ci/run does)", allow_module_level=True
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def open_chromium(profile_dir: str):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser():
    with tempfile.TemporaryDirectory() as profile:
        driver = open_chromium(profile)
        try:
            yield driver
        finally:
            driver.quit()


def use_playground(browser, url: str, api_key: str | None = None) -> dict:
    """What a person does: open the page, (give the key it asks for,) type a prefix, pick 3 samples,
    press Generate."""
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    if api_key:
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "apikey"))).send_keys(api_key)
    else:
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "model"), "random-gpt2"))
    browser.find_element(By.ID, "prefix").send_keys("Once upon a time")
    for field, value in (("nsamples", "3"), ("length", "16"), ("truncate", "")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '.sample[data-state="done"]')) == 3)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#recent li:not(.empty)")) == 3)
    if not api_key:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    return {
        "samples": [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".sample .text")],
        "recent": [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "#recent li .r")],
        "error": browser.find_element(By.ID, "error").text,
        "stats": browser.find_element(By.ID, "stats").text,
    }


@contextlib.asynccontextmanager
async def serving(tmp_path, lm, api_key=None):
    config = Config(limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, max_batch_size=4) as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, WebConfig(port=0), api_key) as web,
    ):
        yield core, web


async def check_playground(browser, core, url, api_key=None):
    # the loop keeps serving
    seen = await asyncio.wait_for(asyncio.to_thread(use_playground, browser, url, api_key), 90)
    replies = [r["reply"] for r in await core.recent()]
    assert seen["error"] == ""
    assert len(seen["samples"]) == 3 and all(s.startswith("Once upon a time") for s in seen["samples"])
    generated = sorted(s[len("Once upon a time") :] for s in seen["samples"])
    assert generated == sorted(replies) and all(generated)  # what the page shows is what the store holds
    assert sorted(seen["recent"]) == sorted(replies)
    assert "3 done" in seen["stats"]


async def test_playground_generates_in_a_real_browser(tmp_path, tiny_lm, browser):
    async with serving(tmp_path, tiny_lm) as (core, web):
        await check_playground(browser, core, web.url)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


async def test_playground_asks_for_the_api_key_when_the_server_needs_one(tmp_path, tiny_lm, browser):
    async with serving(tmp_path, tiny_lm, api_key="browser-key-1") as (core, web):
        await check_playground(browser, core, web.url, api_key="browser-key-1")
