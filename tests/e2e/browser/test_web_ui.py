"""The gateway's web chat UI in headless Chromium: it loads with no outside resources, asks for
the API key the server wants, streams a reply token by token, keeps a multi-turn history with
the sampling settings, stops a generation, renders markdown safely, and shows the server's
error message when a request fails (a bad parameter, then a worker that is gone).

Tests run in file order and share one browser and one cluster; the last one stops the worker.
"""

import json
import re
import time

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import http

# Records every change of the last assistant message (text and state) with a timestamp.
OBSERVE = """
window.__kt = {snaps: [], requests: []};
const log = document.getElementById('messages');
new MutationObserver(() => {
  const all = log.querySelectorAll('.msg.assistant');
  const m = all[all.length - 1];
  if (!m) return;
  const body = m.querySelector('.body').textContent;
  const last = window.__kt.snaps[window.__kt.snaps.length - 1];
  if (!last || last.text !== body || last.state !== m.dataset.state)
    window.__kt.snaps.push({t: performance.now(), text: body, state: m.dataset.state,
                            chunks: Number(m.dataset.chunks || 0)});
}).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
const realFetch = window.fetch;
window.fetch = function (url, init) {
  if (init && init.body) window.__kt.requests.push({url: String(url), body: JSON.parse(init.body)});
  return realFetch.apply(this, arguments);
};
"""


def el(d, id_):
    return d.find_element(By.ID, id_)


def wait(d, cond, timeout=30, what="condition"):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond())
    except TimeoutException:
        m = last_assistant(d)
        seen = {
            "state": m.get_attribute("data-state") if m else None,
            "reply": m.text[-300:] if m else None,
            "error": d.find_element(By.ID, "error-text").text,
            "status": d.find_element(By.ID, "status").text,
        }
        raise AssertionError(f"{what}: not within {timeout} s; page: {seen}") from None


def last_assistant(d):
    msgs = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
    return msgs[-1] if msgs else None


def state(d):
    m = last_assistant(d)
    return m.get_attribute("data-state") if m else None


def set_field(d, id_, value):
    f = el(d, id_)
    f.clear()
    if value != "":
        f.send_keys(str(value))
    d.execute_script("arguments[0].dispatchEvent(new Event('change'))", f)


def send(d, text):
    box = el(d, "prompt")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def open_page(d, cluster, key):
    d.get(cluster.url + "/")
    d.execute_script("localStorage.clear(); sessionStorage.clear();")
    d.get(cluster.url + "/")
    wait(d, lambda: d.execute_script("return !!window.KT"), 10, "app.js loaded")
    if key is not None:
        set_field(d, "api-key", key)
    d.execute_script(OBSERVE)


@pytest.fixture(scope="module")
def page(driver, cluster):
    open_page(driver, cluster, cluster.key)
    wait(driver, lambda: len(el(driver, "model").find_elements(By.TAG_NAME, "option")) > 0, 30,
         "the model picker filled from /v1/models")
    # Short prompts and answers: the tiny model has a 128-token context, its byte-level
    # vocabulary spends about a token per character, and its chat template about 40 tokens.
    set_field(driver, "max-tokens", 4)
    set_field(driver, "temperature", 0.8)
    set_field(driver, "seed", 11)
    return driver


def test_page_is_self_contained(driver, cluster):
    for path in ("/", "/web/"):
        status, body = http(cluster.url + path)
        assert status == 200 and 'id="prompt"' in body, (path, status)
    for path in ("/web/app.js", "/web/style.css"):
        status, body = http(cluster.url + path)
        assert status == 200 and len(body) > 1000, (path, status)
        # No CDN, no outside fetches: the only absolute URLs are the markdown link allowlist.
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", body), path
        assert "@import" not in body and "url(http" not in body, path
    driver.get(cluster.url + "/web/")
    wait(driver, lambda: driver.execute_script("return !!window.KT"), 10, "app.js loaded at /web/")
    origins = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {cluster.url}, origins


def test_api_key_is_asked_for_then_models_are_listed(driver, cluster):
    if not cluster.key:
        pytest.skip("the gateway under test has no API key")
    open_page(driver, cluster, None)
    wait(driver, lambda: el(driver, "error").is_displayed(), 15, "an error without the key")
    assert "401" in el(driver, "error-text").text, el(driver, "error-text").text
    set_field(driver, "api-key", cluster.key)
    wait(driver, lambda: not el(driver, "error").is_displayed(), 15, "error cleared with the key")
    _, body = http(cluster.url + "/v1/models", cluster.key)
    ids = [m["id"] for m in json.loads(body)["data"]]
    options = [o.get_attribute("value") for o in el(driver, "model").find_elements(By.TAG_NAME, "option")]
    assert options == ids


def slow_network(d):
    """About 1.5 kB/s (some 8 SSE chunks a second) in the browser, as a large model would stream
    (the tiny model answers its few tokens in milliseconds)."""
    d.set_network_conditions(offline=False, latency=5, download_throughput=1500,
                             upload_throughput=1_000_000)


def test_streams_a_reply(page):
    set_field(page, "max-tokens", 40)
    slow_network(page)
    try:
        page.execute_script("window.__kt.snaps = []")
        send(page, "Hi")
        wait(page, lambda: state(page) == "done", 60, "the reply finished")
    finally:
        page.delete_network_conditions()
        set_field(page, "max-tokens", 4)
    snaps = page.execute_script("return window.__kt.snaps")
    partial = [s for s in snaps if s["state"] == "streaming" and s["text"]]
    final = last_assistant(page).find_element(By.CLASS_NAME, "body").text
    assert final.strip(), snaps
    # Tokens arrived while the answer was still streaming: the text was shown and grew before
    # the end (the throttled browser hands data over in bursts of a few chunks).
    assert len({s["text"] for s in partial}) >= 2, snaps
    lengths = [len(s["text"]) for s in partial]
    assert lengths == sorted(lengths), lengths
    assert snaps[-1]["chunks"] >= 10, snaps[-1]
    assert el(page, "send").is_enabled() and not el(page, "stop").is_enabled()
    assert "Done" in el(page, "status").text


def test_multi_turn_history_and_sampling_settings(page):
    el(page, "new-chat").click()
    send(page, "Hi")
    wait(page, lambda: state(page) == "done", 60, "the first reply finished")
    set_field(page, "temperature", 0.5)
    set_field(page, "top-p", 0.9)
    set_field(page, "max-tokens", 6)
    set_field(page, "seed", 7)
    first = page.execute_script("return KT.state.history[1].content")
    send(page, "More")
    wait(page, lambda: state(page) == "done", 60, "the second reply finished")
    req = page.execute_script("return window.__kt.requests")[-1]
    assert req["url"].endswith("/v1/chat/completions")
    body = req["body"]
    assert body["stream"] is True
    assert body["model"] == el(page, "model").get_attribute("value")
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.5, 0.9, 6, 7)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"], roles
    assert body["messages"][0]["content"] == "Hi"
    assert body["messages"][2]["content"] == "More"
    assert body["messages"][1]["content"] == first and first
    assert len(page.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 4
    set_field(page, "max-tokens", 4)


def test_same_seed_same_answer_in_a_new_chat(page):
    answers = []
    for _ in range(2):
        el(page, "new-chat").click()
        send(page, "Seed")
        wait(page, lambda: state(page) == "done", 60, "reply finished")
        answers.append(page.execute_script("return KT.state.history[1].content"))
    assert answers[0] == answers[1] and answers[0], answers


def test_stop_ends_a_generation(page):
    el(page, "new-chat").click()
    set_field(page, "max-tokens", 64)
    set_field(page, "seed", "")
    slow_network(page)  # so that there is time to stop
    try:
        page.execute_script("window.__kt.snaps = []")
        send(page, "Go")
        wait(page, lambda: int(last_assistant(page).get_attribute("data-chunks") or 0) >= 2, 30,
             "the first chunks")
        assert el(page, "stop").is_enabled()
        el(page, "stop").click()
        wait(page, lambda: state(page) == "stopped", 5, "stopped state")
        text = last_assistant(page).find_element(By.CLASS_NAME, "body").text
        time.sleep(1.0)
        assert last_assistant(page).find_element(By.CLASS_NAME, "body").text == text
        assert "Stopped" in last_assistant(page).text
        assert el(page, "send").is_enabled() and not el(page, "stop").is_enabled()
        assert el(page, "status").text == "Stopped"
        # The stopped answer stays in the conversation.
        history = page.execute_script("return KT.state.history")
        assert [m["role"] for m in history] == ["user", "assistant"]
    finally:
        page.delete_network_conditions()


def test_markdown_is_rendered_safely(page):
    src = "\n".join([
        "# Title <script>alert(1)</script>",
        "Some **bold**, *italic* and `a<b>` code; [ok](https://example.org/x) and "
        "[bad](javascript:alert(1)) <img src=x onerror=alert(1)>",
        "",
        "- one",
        "- two",
        "1. first",
        "2. second",
        "",
        "```rust",
        "fn main() { println!(\"<b>\"); }",
        "```",
    ])
    html = page.execute_script("return KT.renderMarkdown(arguments[0])", src)
    assert "<h1>Title &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>italic</em>" in html
    assert "<code>a&lt;b&gt;</code>" in html
    assert '<a href="https://example.org/x" target="_blank" rel="noopener noreferrer">ok</a>' in html
    assert 'href="javascript' not in html and "<img" not in html and "<script" not in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert '<code class="language-rust">fn main() { println!(&quot;&lt;b&gt;&quot;); }</code>' in html
    # Rendered into the page, nothing executes and the code block has its copy button.
    page.execute_script(
        "window.__xss = 0; const d = document.createElement('div'); d.id = 'md-probe';"
        "d.innerHTML = KT.renderMarkdown(arguments[0]); document.body.appendChild(d);",
        src.replace("alert(1)", "window.__xss=1"))
    time.sleep(0.2)
    assert page.execute_script("return window.__xss") == 0
    assert page.find_elements(By.CSS_SELECTOR, "#md-probe .code button.copy")
    page.execute_script("document.getElementById('md-probe').remove()")


def test_a_bad_parameter_shows_the_servers_message(page):
    el(page, "new-chat").click()
    set_field(page, "temperature", 5)
    try:
        send(page, "Bad")
        wait(page, lambda: state(page) == "error", 30, "the error state")
        shown = el(page, "error-text").text
        assert el(page, "error").is_displayed()
        assert "400" in shown and "temperature" in shown.lower(), shown
        # The failed turn is not kept; its text is back in the box for a retry.
        assert page.execute_script("return KT.state.history.length") == 0
        assert el(page, "prompt").get_attribute("value") == "Bad"
        assert el(page, "send").is_enabled()
    finally:
        set_field(page, "temperature", 0.8)
        el(page, "error-close").click()


def test_a_failed_server_shows_an_error(page, cluster):
    if cluster.external:
        pytest.skip("cannot stop the worker of an external gateway")
    el(page, "new-chat").click()
    cluster.stop("worker")
    send(page, "Hello?")
    wait(page, lambda: state(page) == "error", 60, "an error once the worker is gone")
    shown = el(page, "error-text").text
    assert el(page, "error").is_displayed()
    assert re.search(r"HTTP 5\d\d|worker|unavailable", shown, re.I), shown
    assert el(page, "send").is_enabled() and not el(page, "stop").is_enabled()
