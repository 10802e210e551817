"""The Streamlit app in a real browser: `streamlit run dashboards/app.py` driven by Debian's headless Chromium,
one PNG per page (into UI_SCREENSHOT_DIR, default a tmp dir), each page checked for its title and for no
exception box.

By default the app reads a seeded in-process plane (tests/unit/ui/plane.py). Set UI_API_URL to point it at
a real plane instead (UI_API_TOKEN, if set, is handed to the app for its buttons); then only titles and the
absence of exceptions are checked, since the data is whatever that plane holds.
Without chromium / chromedriver the test is skipped, except when CI=true.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from controlplane.ui.launch import streamlit_argv
from controlplane.ui.nav import PAGES, PageSpec
from tests.conftest import REPO, free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 90.0


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str | None]]:
    """(API URL, token): the real plane named by UI_API_URL, or the seeded in-process one."""
    real = os.environ.get("UI_API_URL")
    if real:
        yield real.rstrip("/"), os.environ.get("UI_API_TOKEN") or None
        return
    from tests.unit.ui.plane import TOKEN, seed, serve

    seeded = seed(tmp_path_factory.mktemp("ui-plane") / "store.db", gpu=True)
    with serve(seeded) as url:
        yield url, TOKEN


@pytest.fixture(scope="module")
def app_url(api: tuple[str, str | None], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`streamlit run dashboards/app.py` as `controlplane ui` starts it, on a free loopback port; ready when
    Streamlit's health endpoint answers."""
    port = free_port()
    # The URL goes in as the app's own --api-url (what `controlplane ui` does), not through the environment.
    env = {k: v for k, v in os.environ.items() if k not in ("CONTROLPLANE_API_TOKEN", "CONTROLPLANE_API_URL")}
    env.update({"PYTHONPATH": str(REPO), **({"CONTROLPLANE_API_TOKEN": api[1]} if api[1] else {})})
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    argv = streamlit_argv(api[0], port=port)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer within {WAIT_S:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    """Headless Chromium from the Debian packages (nothing is downloaded: binary and driver are given)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.exists() and os.access(p, os.X_OK))]
    if missing:
        reason = f"headless Chromium needs {' and '.join(missing)} (Debian packages chromium, chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800",
                 "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("UI_SCREENSHOT_DIR") or tmp_path_factory.mktemp("ui-screens"))
    out.mkdir(parents=True, exist_ok=True)
    return out


# Streamlit is done when its status widget no longer says it is running, no element is marked stale
# from the previous run, and the page's DOM has stopped changing (charts render after the script ends).
_SETTLED_JS = """
const running = document.querySelector('[data-testid="stStatusWidget"]');
const busy = running && /running/i.test(running.innerText || '');
const stale = document.querySelectorAll('[data-stale="true"]').length;
const main = document.querySelector('[data-testid="stMain"]') || document.body;
return [busy, stale, document.getElementsByTagName('*').length, main.scrollHeight];
"""


def _settle(drv: WebDriver, title: str) -> int:
    """Wait until the page shows `title` and Streamlit has finished; returns the content height in pixels."""
    deadline = time.monotonic() + WAIT_S
    last: tuple[int, int] | None = None
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        titles = [h.text for h in drv.find_elements(By.CSS_SELECTOR, "h1")]
        busy, stale, count, height = drv.execute_script(_SETTLED_JS)
        now = (count, height)
        if now != last:
            last, stable_since = now, time.monotonic()
        if title in titles and not busy and not stale and time.monotonic() - stable_since > 1.5:
            return int(height)
        time.sleep(0.25)
    pytest.fail(f"page {title!r} did not settle in {WAIT_S:.0f} s (titles seen: {titles})")


@pytest.mark.parametrize("page", PAGES, ids=[p.url_path for p in PAGES])
def test_each_page_renders_in_chromium_with_its_title_and_no_exception(api: tuple[str, str | None], app_url: str,
                                                                       driver: WebDriver, shots: Path,
                                                                       page: PageSpec) -> None:
    driver.set_window_size(1400, 1800)
    driver.get(f"{app_url}/" + ("" if page is PAGES[0] else page.url_path))  # the default page lives at /
    height = _settle(driver, page.title)
    if height > 1700:  # grow the window so the shot holds the whole page, then let the charts lay out again
        driver.set_window_size(1400, min(height + 200, 8000))
        _settle(driver, page.title)
    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    dialogs = [d.text for d in driver.find_elements(By.CSS_SELECTOR, '[role="dialog"]')]
    path = shots / f"{PAGES.index(page) + 1:02d}-{page.url_path}.png"
    driver.save_screenshot(str(path))
    assert not errors, f"{page.url_path}: exception on the page: {errors[0].text[:500]}"
    assert not dialogs, f"{page.url_path}: a dialog covers the page: {dialogs}"  # e.g. "Page not found"
    sidebar = driver.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text
    assert f"Plane: {api[0]}" in sidebar  # the app reads the plane it was started with (--api-url)
    assert path.stat().st_size > 10_000
