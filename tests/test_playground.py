"""The playground at GET / (handler/playground.py): the route over the fake engine, and
the page itself in headless Debian chromium against the real server and model.

The browser tests compare what the page shows with what the openai SDK gets from the
same server for the same conversation at temperature 0, so they pass only if the
page sent the whole conversation and streamed the model's actual reply. They need
/usr/bin/chromium and /usr/bin/chromedriver (`make services`); nothing is downloaded.
"""

import os
import re
import threading
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from tests.fake_model import FakeLLM, assert_error
from tests.server_process import KEY, MODEL, REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 120  # the first reply may wait for the server to compile
SYSTEM = "You are a concise assistant."
MAX_TOKENS = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the route, over the fake engine ---------------------------------------------


def test_get_root_is_the_page(serve):
    response = serve().get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.mimetype_params["charset"] == "utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = response.get_data(as_text=True)
    for id_ in ("model", "api-key", "system", "temperature", "max-tokens", "prompt", "send"):
        assert f'id="{id_}"' in page
    # Self-contained: no URL to another host, no external script, style or font.
    assert not re.search(r"https?://|\bsrc=|@import|url\(", page)
    assert all(href.startswith("data:") for href in re.findall(r'href="([^"]*)"', page))


def test_page_needs_no_key_on_a_keyed_server(serve):
    client = serve(api_keys=["secret"])
    assert client.get("/").status_code == 200
    assert_error(client.get("/v1/models"), 401, "authentication_error", code="invalid_api_key")


def test_playground_off_leaves_root_unknown(serve):
    assert_error(serve(playground=False).get("/"), 404, "not_found_error", code="unknown_url")


def test_post_root_is_405(serve):
    response = serve().post("/", json={})
    assert_error(response, 405, "invalid_request_error", code="method_not_allowed")
    assert response.headers["Allow"] == "GET"


# --- the page, in a browser, against the real server -----------------------------


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `make services` to install them")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    # A path in Service skips Selenium Manager, which would download a driver.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, base_url: str, key: str) -> None:
    """Load the playground and set its API key (which reloads the models)."""
    driver.get(base_url + "/")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.TAB)


def set_field(driver, id_: str, value: str) -> None:
    field = driver.find_element(By.ID, id_)
    field.clear()
    field.send_keys(value)


def send(driver, text: str) -> None:
    set_field(driver, "prompt", text)
    driver.find_element(By.ID, "send").click()


def replies(driver) -> list[str]:
    """The assistant bubbles' text, exactly (`.text` would trim and fold whitespace)."""
    return texts(driver, "#messages .assistant")


def model_options(driver) -> list[str]:
    return texts(driver, "#model option")


def texts(driver, selector: str) -> list[str]:
    """The textContent of every element matching `selector`, read in one script (the
    page may replace the elements between two WebDriver calls)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)"
    return driver.execute_script(script, selector)


def wait_for_reply(driver, count: int) -> dict[str, int]:
    """Wait until the `count`th reply has ended; its usage as the page shows it."""

    def ended(_):
        done = len(replies(driver)) == count and replies(driver)[-1]
        return done and driver.find_element(By.ID, "send").is_enabled()

    WebDriverWait(driver, WAIT_S).until(ended)
    # Every reply has its stats line; the latest one is #stats.
    lines = driver.find_elements(By.CSS_SELECTOR, "#messages .meta")
    assert len(lines) == count and lines[-1].get_attribute("id") == "stats"
    stats = lines[-1]
    names = ("prompt", "completion", "total")
    return {n: int(stats.get_attribute(f"data-{n}-tokens") or -1) for n in names}


def model_reply(client, messages: list[dict]):
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS
    )


def test_chat_streams_the_models_reply(browser, base_url, client, tmp_path):
    open_page(browser, base_url, KEY)
    WebDriverWait(browser, WAIT_S).until(lambda d: MODEL in model_options(d))
    assert set(model_options(browser)) == {MODEL, "default", "fast"}  # the id and its aliases
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.execute_script("return localStorage.getItem('jaxchat.apiKey')") == KEY
    set_field(browser, "system", SYSTEM)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))

    conversation = [{"role": "system", "content": SYSTEM}]
    usages = []
    for turn, question in enumerate(["What is the capital of France?", "And of Italy?"], 1):
        send(browser, question)
        usage = wait_for_reply(browser, turn)
        usages.append(usage)
        conversation.append({"role": "user", "content": question})
        expected = model_reply(client, conversation)
        assert replies(browser)[-1] == expected.choices[0].message.content
        assert usage == {
            "prompt": expected.usage.prompt_tokens,
            "completion": expected.usage.completion_tokens,
            "total": expected.usage.total_tokens,
        }
        stats = browser.find_element(By.ID, "stats").text
        assert f"{usage['total']} tokens" in stats and "tok/s" in stats, stats
        assert "first token" in stats
        conversation.append({"role": "assistant", "content": replies(browser)[-1]})
    # The second request carried the first exchange.
    assert usages[1]["prompt"] > usages[0]["total"]

    screenshot = REPO / "docs" if os.environ.get("JAXCHAT_UPDATE_SCREENSHOT") == "1" else tmp_path
    screenshot.mkdir(exist_ok=True)
    path = screenshot / "playground.png"
    assert browser.save_screenshot(str(path))
    image = path.read_bytes()
    assert image.startswith(PNG_MAGIC) and len(image) > 10_000


def test_stop_keeps_the_partial_reply_and_new_chat_clears(browser, base_url):
    open_page(browser, base_url, KEY)
    # A greedy reply that runs to all 460 tokens (about 3.5 s; the test server's context
    # is 512), so Stop comes before its end; the first text is looked for every 0.1 s
    # (at 0.5 s, with 400 tokens, a browser slowed by the other test worker once clicked
    # after the end).
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "460")
    send(browser, "Write a very long story about a lighthouse keeper.")
    stop = browser.find_element(By.ID, "stop")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(lambda d: replies(d) and replies(d)[0])
    stop.click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "send").is_enabled())
    assert not stop.is_enabled()
    assert replies(browser)[0]  # what streamed before Stop stays
    # Cut before the final usage chunk: no usage to show.
    stats = browser.find_element(By.ID, "stats")
    assert stats.get_attribute("data-total-tokens") == ""
    assert "stopped" in stats.text and "tok/s" not in stats.text
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages > *") == []


def test_wrong_key_shows_the_servers_error(browser, base_url):
    open_page(browser, base_url, KEY)
    WebDriverWait(browser, WAIT_S).until(lambda d: MODEL in model_options(d))
    # A key typed but not yet committed (no change event): only the chat request uses it.
    browser.execute_script("document.getElementById('api-key').value = 'wrong-key'")
    question = "Hello?"
    send(browser, question)
    error = browser.find_element(By.ID, "error")
    prompt = browser.find_element(By.ID, "prompt")
    # A failed turn is taken back: the question returns to the prompt, to send again.
    WebDriverWait(browser, WAIT_S).until(
        lambda d: error.is_displayed() and prompt.get_attribute("value") == question
    )
    assert "Incorrect API key provided." in error.text
    assert "401" in error.text and "authentication_error" in error.text
    assert "invalid_api_key" in error.text
    assert browser.find_elements(By.CSS_SELECTOR, "#messages > *") == []


def test_an_error_event_in_the_stream_shows(browser, serve):
    """The fake engine fails after its first delta ("LATE BOOM"): the server sends an
    error event after a 200, which the page shows under the text that came before it."""
    app = serve(llm=FakeLLM(max_seq_len=4096)).application
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        open_page(browser, f"http://127.0.0.1:{server.server_port}", "")
        send(browser, "LATE BOOM")
        error = browser.find_element(By.ID, "error")
        WebDriverWait(browser, WAIT_S).until(lambda d: error.is_displayed())
        assert "The server had an error while processing your request." in error.text
        assert "server_error" in error.text and "200" not in error.text
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert replies(browser) == ["Hello"]  # the fake's first delta, before it failed
    finally:
        server.shutdown()
