"""The playground page in headless Chromium (Debian's chromium + chromium-driver, via selenium) against a
real blt-serve with the shipped model: type, generate, see streamed text and patches, stop mid-stream.
A screenshot is saved to tests/artifacts/playground.png (a CI artefact)."""

from __future__ import annotations

import shutil

import pytest
from serverkit import ROOT, Process, metric_value, metrics_text, wait_until

SHIPPED = ROOT / "weights" / "blt-shakespeare"
KEY = "browser-key"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them "
                                       "where it runs as root with apt-get)")


@pytest.fixture(scope="module")
def server():
    proc = Process(SHIPPED, "--api-key", KEY)
    yield proc
    proc.stop()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def metrics(server) -> str:
    return metrics_text(server.url, KEY)


def open_page(server, browser) -> None:
    """The playground, with the API key typed in and the model's card shown."""
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    wait_until(lambda: "bytes of context" in browser.find_element(By.ID, "model").text, what="the model card")


def test_generate_see_patches_and_stop(server, browser):
    from selenium.webdriver.common.by import By

    open_page(server, browser)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("KING HENRY:\nWhat say you, ")
    browser.execute_script("const s = document.getElementById('max_tokens'); s.value = 4096;"
                           "s.dispatchEvent(new Event('input'));")
    button = browser.find_element(By.ID, "go")
    assert button.text == "Generate"
    button.click()

    def completion():
        return browser.execute_script(
            "return [...document.querySelectorAll('#out .patch:not(.prompt)')].map(s => s.textContent)")

    spans = wait_until(lambda: (lambda s: s if len(s) >= 3 and len("".join(s)) >= 40 else None)(completion()),
                       what="streamed text in at least two patches")
    assert len(set(browser.execute_script(
        "return [...document.querySelectorAll('#out .patch:not(.prompt)')].map(s => s.className)"))) == 2
    assert browser.find_element(By.ID, "status").text == "generating" and button.text == "Stop"
    assert float(browser.find_element(By.ID, "bpp").text) > 0
    assert browser.find_element(By.ID, "ttfb").text.endswith("ms")
    assert metric_value(metrics(server), "blt_num_requests_running") == 1
    button.click()  # Stop, mid-stream
    wait_until(lambda: browser.find_element(By.ID, "status").text == "stopped", what="the stopped status")
    assert button.text == "Generate" and len("".join(spans)) > 0
    wait_until(lambda: metric_value(metrics(server), "blt_client_disconnects_total") == 1
               and metric_value(metrics(server), "blt_num_requests_running") == 0, what="the server to abort")
    painted = wait_until(lambda: browser.execute_script(
        "return [...document.querySelectorAll('#out .ch')].filter(c => c.style.borderBottomColor).length"),
        what="entropy strips")
    assert painted >= len("KING HENRY:")
    (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    browser.save_screenshot(str(ROOT / "tests" / "artifacts" / "playground.png"))


def test_a_guided_generation_and_a_guide_refused(server, browser):
    """With a regex in the guide field the completion matches it and ends there; a regex the server cannot
    take shows the server's reason."""
    import re

    from selenium.webdriver.common.by import By

    open_page(server, browser)
    guide = browser.find_element(By.ID, "guide")
    pattern = r"(KING|QUEEN) [A-Z][a-z]+: [a-z ,]{5,40}\."
    guide.send_keys(pattern)
    browser.find_element(By.ID, "go").click()
    wait_until(lambda: browser.find_element(By.ID, "status").text == "done (stop)", what="the guided text's end")
    text = browser.execute_script(
        "return [...document.querySelectorAll('#out .patch:not(.prompt)')].map(s => s.textContent).join('')")
    assert re.fullmatch(pattern, text), text
    guide.clear()
    guide.send_keys("(?=look)ahead")
    browser.find_element(By.ID, "go").click()
    wait_until(lambda: "look-around" in browser.find_element(By.ID, "status").text, what="the server's reason")


def test_readable_in_a_narrow_window(server, browser):
    from selenium.webdriver.common.by import By

    browser.set_window_size(400, 800)
    browser.get(server.url + "/")
    assert browser.find_element(By.ID, "go").is_displayed()
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 400px window"
