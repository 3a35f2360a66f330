"""The chat page at "/" in a real headless Chromium (selenium): a new chat, a reply streamed
token by token, the session and its messages back after a reload. The run leaves a screenshot
at docs/web_chat.png."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentmem.chat import engine
from agentmem.persistence import Store
from agentmem.server.app import create_app
from agentmem.testing import free_port, run_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The screenshot committed under docs/ is written when asked for (a run's ids and paths differ):
# AGENTMEM_WEB_SCREENSHOT=docs/web_chat.png
SCREENSHOT = os.environ.get("AGENTMEM_WEB_SCREENSHOT")


# Records the newest answer's text length at every change the page makes (the reply streams
# faster than round trips from here could sample it).
SAMPLER = """
window.__lengths = [];
const box = document.getElementById("messages");
new MutationObserver(() => {
  const answers = box.querySelectorAll('[data-testid="answer"]');
  const last = answers[answers.length - 1];
  if (last && last.classList.contains("streaming")) window.__lengths.push(last.textContent.length);
}).observe(box, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture
def web_server(tiny_model, tmp_path) -> Iterator[str]:
    """A live server without API keys (create_app serves the page at /); yields its URL."""
    engine._threads.clear()
    store = Store(root=tmp_path / "store")
    app = create_app(tiny_model, store)
    port = free_port()
    server, thread = run_server(app, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()
        engine._threads.clear()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the chat page's test drives Debian's chromium and chromedriver: apt-get install "
        "chromium chromium-driver (.ci/run does)"
    )

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what, timeout: float = 30.0, every: float = 0.05):
    """`what()`'s first truthy value within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {getattr(what, '__name__', what)}")
        time.sleep(every)


def by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def send(driver, text: str) -> tuple[str, list[int]]:
    """Type `text`, send it, wait for the reply; the reply's final text and the lengths its
    text had while it streamed (sampled in the page and from here)."""
    driver.execute_script(SAMPLER)
    prompt = by_testid(driver, "prompt")[0]
    prompt.send_keys(text)
    before = len(by_testid(driver, "answer"))
    by_testid(driver, "send")[0].click()
    answer = wait_for(lambda: (a := by_testid(driver, "answer")) and len(a) > before and a[-1])
    polled = []
    while driver.execute_script("return document.body.dataset.state") != "idle":
        polled.append(len(answer.get_property("textContent")))
        time.sleep(0.005)
    lengths = driver.execute_script("return window.__lengths") + polled
    return answer.get_property("textContent"), lengths


def test_a_chat_streams_and_comes_back_after_a_reload(web_server, browser, tmp_path):
    driver = browser
    driver.get(web_server + "/?max_tokens=24")
    wait_for(lambda: "model:" in by_testid(driver, "model")[0].text)
    assert not by_testid(driver, "api-key")[0].is_displayed()  # this server needs no key
    piece = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi <b><|im_end|>\n"
    assert driver.execute_script("return clean('user', arguments[0])", piece) == [
        {"role": "user", "text": "hi <b>", "open": False}
    ]  # the page's template stripping: system blocks dropped, markup gone

    by_testid(driver, "new-chat")[0].click()
    session_id = wait_for(lambda: driver.execute_script("return location.hash.slice(1)"))
    assert session_id.startswith("chat-")
    assert by_testid(driver, "session-title")[0].text == session_id

    answer, lengths = send(driver, "hello agentmem")
    assert answer and "(no reply)" not in answer, by_testid(driver, "error")[0].text
    assert not by_testid(driver, "error")[0].is_displayed()
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) > 1, f"the answer did not stream: its lengths were {lengths}"
    assert grown[-1] == len(answer)  # the last sample is the whole answer
    assert by_testid(driver, "recalled")  # the provenance list under the answer

    def listed():
        ids = [e.get_attribute("data-session-id") for e in by_testid(driver, "session")]
        return session_id in ids

    wait_for(listed)

    driver.refresh()
    wait_for(listed)
    assert driver.execute_script("return location.hash.slice(1)") == session_id

    def user_texts():
        return [
            m.text.splitlines()[-1]
            for m in by_testid(driver, "message")
            if m.get_attribute("data-role") == "user"
        ]

    assert wait_for(user_texts) == ["hello agentmem"]
    shown = by_testid(driver, "messages")[0].text
    assert "<|im_start|>" not in shown and "<|im_end|>" not in shown
    assert "You are a helpful assistant" not in shown  # the system piece is not shown
    current = driver.find_element("css selector", ".session.current")
    assert current.get_attribute("data-session-id") == session_id

    # a second turn after the reload goes to the same session; its provenance shown open
    answer, _ = send(driver, "what did I say first?")
    assert answer
    assert user_texts() == ["hello agentmem", "what did I say first?"]
    driver.execute_script(
        "document.querySelectorAll('details.recalled').forEach(d => d.open = true)"
    )
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "web_chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_the_page_asks_for_a_key_and_shows_the_servers_error(tiny_model, tmp_path, browser):
    engine._threads.clear()
    store = Store(root=tmp_path / "store")
    app = create_app(tiny_model, store, api_keys={"key-alice": "alice"})
    server, thread = run_server(app, port := free_port())
    try:
        driver = browser
        driver.get(f"http://127.0.0.1:{port}/")
        key = by_testid(driver, "api-key")[0]
        assert key.is_displayed()
        error = wait_for(lambda: (e := by_testid(driver, "error")[0]).is_displayed() and e)
        assert "API key" in error.text  # the server's error.message
        key.send_keys("key-alice\n")
        key.send_keys("\t")  # a change event
        wait_for(lambda: "model:" in by_testid(driver, "model")[0].text)
        stored = driver.execute_script("return localStorage.getItem('agentmem.apiKey')")
        assert stored == "key-alice"
        assert not by_testid(driver, "error")[0].is_displayed()
        assert "/" not in app.openapi()["paths"]  # the page is not an API endpoint
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()
        engine._threads.clear()
