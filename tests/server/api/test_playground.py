"""The playground (`GET /`, issue #16) and `epispec generate --html`, in a real headless
Chromium against a live server (real uvicorn on loopback, the reference engine on the tiny
models): the tokens the page shows carry exactly the values the API returns, Stop aborts the
request in the engine, errors read as sentences, and the page needs nothing from outside.

The browser tests skip, saying why, where Chromium, chromedriver or selenium is missing.
The screenshot goes to $EPISPEC_PLAYGROUND_SCREENSHOT when set (else the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.playground import static_page
from tests.server.api.browser import (
    assert_darker_with_more_eu,
    assert_tokens_match,
    chromium_or_skip,
    dom_tokens,
    severe_console_messages,
    summary_fields,
    wait_for,
)
from tests.server.api.live import LiveServer, wait_until
from tests.server.api.paced import Paced
from tests.server.api.test_errors import request_count

KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Question: Tom has 3 apples"


@pytest.fixture(scope="module")
def paced(engine) -> Paced:
    return Paced(engine)


@pytest.fixture(scope="module")
def guarded(paced):
    with LiveServer(create_app(Settings(api_key=KEY, default_max_tokens=8), paced)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    driver = chromium_or_skip()
    yield driver
    driver.quit()


def open_page(browser, server) -> None:
    browser.get(f"{server.url}/")
    wait_for(lambda: browser.find_element("id", "model").text != "connecting…", 30, "the /ready check")


def fill(browser, **fields) -> None:
    for name, value in fields.items():
        box = browser.find_element("id", name)
        box.clear()
        if value != "":
            box.send_keys(str(value))


def status(browser) -> str:
    return browser.find_element("id", "status").text


def screenshot_path(tmp_path: Path) -> Path:
    return Path(os.environ.get("EPISPEC_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")


# --- without a browser


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served_without_the_key_and_needs_nothing_from_outside(guarded, path):
    r = httpx.get(guarded.url + path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = r.text
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert set(re.findall(r"https?://[^\s\"'`)]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert httpx.post(f"{guarded.url}/generate", json={"prompt": "hi"}).status_code == 401


def test_static_page_keeps_model_text_out_of_the_markup():
    evil = "</script><img src=x onerror=alert(1)>{{data}}{{style}}"
    tok = {
        "token_id": 1,
        "text": evil,
        "logprob": -1.0,
        "bias": 0.1,
        "variance": 0.2,
        "eu": 0.3,
        "flagged": False,
    }
    final = {
        "summary": {"mean_eu": 0.3, "max_eu": 0.3, "num_tokens": 1, "num_flagged": 0, "flagged": False},
        "finish_reason": "length",
    }
    page = static_page({"model": "m<b>", "prompt": evil, "events": [tok, final]})
    assert "<img" not in page and "m<b>" not in page and page.count(":root {") == 1
    data = re.search(r'<script type="application/json" id="epispec-data">(.*?)</script>', page, re.S)
    assert json.loads(data.group(1))["events"][0]["text"] == evil


# --- in Chromium


def test_live_page_shows_the_values_the_api_returns(guarded, browser, tmp_path):
    open_page(browser, guarded)
    assert "API key" in browser.find_element("id", "model").text
    fill(browser, prompt=PROMPT, max_tokens=12, temperature=0, th_eu=1.0)
    browser.find_element("id", "send").click()
    error = wait_for(lambda: browser.find_element("id", "error").text, 30, "the 401 message")
    assert "401" in error and "API key" in error

    fill(browser, api_key=KEY, max_tokens=1000)
    browser.find_element("id", "send").click()
    error = wait_for(
        lambda: (
            "max_tokens" in browser.find_element("id", "error").text
            and browser.find_element("id", "error").text
        ),
        30,
        "the 400 message",
    )
    assert "Field: max_tokens" in error and "can generate at most" in error

    fill(browser, max_tokens=12)
    browser.find_element("id", "send").click()
    wait_for(lambda: status(browser).startswith("Done"), 120, "the generation to finish")
    assert not browser.find_element("id", "error").is_displayed()
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "thresholds": {"eu": 1.0}}
    api = httpx.post(f"{guarded.url}/generate", json=body, headers=AUTH, timeout=120).json()
    dom = dom_tokens(browser)
    assert_tokens_match(dom, api["tokens"])
    assert [d["token_id"] for d in dom] == [str(t["token_id"]) for t in api["tokens"]]
    assert_darker_with_more_eu(dom)
    shown = summary_fields(browser)
    s = api["summary"]
    assert shown["num_tokens"] == str(s["num_tokens"]) and shown["num_flagged"] == str(s["num_flagged"])
    assert shown["mean_eu"] == f"{s['mean_eu']:.3f}" and shown["max_eu"] == f"{s['max_eu']:.3f}"
    assert shown["finish_reason"] == api["finish_reason"]
    bars = browser.find_elements("css selector", "#chart svg g.bar")
    assert len(bars) == len(dom)

    # keyboard: one tab stop, arrows move, the tooltip follows the focus
    assert [d["tabindex"] for d in dom].count("0") == 1
    tokens = browser.find_elements("css selector", "#transcript .tok")
    browser.execute_script("arguments[0].focus()", tokens[0])
    from selenium.webdriver.common.keys import Keys

    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element == tokens[1]
    tip = browser.find_element("id", "tooltip")
    assert tip.is_displayed()
    second = api["tokens"][1]
    assert f"{second['eu']:.3f} nats" in tip.text and f"{second['logprob']:.3f}" in tip.text
    path = screenshot_path(tmp_path)
    browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert severe_console_messages(browser) == []


def test_stop_aborts_the_request_in_the_engine(guarded, browser, paced, engine):
    open_page(browser, guarded)
    fill(browser, api_key=KEY, prompt=PROMPT, max_tokens=80, temperature=1, seed=3)
    aborted = request_count(httpx.get(f"{guarded.url}/metrics", headers=AUTH).text, "/generate", "abort")
    paced.delay = 0.25
    try:
        browser.find_element("id", "send").click()
        wait_for(lambda: len(dom_tokens(browser)) >= 2, 60, "two tokens")
        assert engine.num_running() == 1
        browser.find_element("id", "stop").click()
        wait_for(lambda: status(browser).startswith("Stopped"), 30, "the stopped status")
        assert wait_until(lambda: httpx.get(f"{guarded.url}/ready", headers=AUTH).json()["running"] == 0)
    finally:
        paced.delay = 0.0
    shown = len(dom_tokens(browser))
    assert shown < 40
    metrics = httpx.get(f"{guarded.url}/metrics", headers=AUTH).text
    assert request_count(metrics, "/generate", "abort") == aborted + 1
    assert summary_fields(browser)["finish_reason"] == "stopped"
    assert len(dom_tokens(browser)) == shown
    assert browser.find_element("id", "send").is_enabled()
    assert not browser.find_element("id", "stop").is_enabled()


def test_chat_mode_keeps_the_conversation(guarded, browser):
    open_page(browser, guarded)
    browser.find_element("css selector", "input[name=mode][value=chat]").click()
    fill(browser, api_key=KEY, prompt="How many apples?", max_tokens=6, temperature=0)
    browser.find_element("id", "send").click()
    wait_for(lambda: status(browser).startswith("Done"), 120, "the first reply")
    body = {
        "messages": [{"role": "user", "content": "How many apples?"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
    }
    api = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120).json()
    choice = api["choices"][0]
    expected = [
        {"text": c["token"], "logprob": c["logprob"], **c["uncertainty"]}
        for c in choice["logprobs"]["content"]
    ]
    assert_tokens_match(dom_tokens(browser), expected)
    assert summary_fields(browser)["num_tokens"] == str(choice["uncertainty"]["summary"]["num_tokens"])
    # no threshold typed: the server's default (from /ready) is named and marked on the scale
    assert "flags eu > 0.500 nats" in browser.find_element("id", "model").text
    assert "threshold 0.500 nats" in browser.find_element("id", "legend").text

    fill(browser, prompt="And pears?")
    browser.find_element("id", "send").click()
    wait_for(lambda: status(browser).startswith("Done"), 120, "the second reply")
    turns = browser.find_elements("css selector", "#transcript .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"] * 2
    assert len(turns[1].find_elements("css selector", ".tok")) == len(expected)
    assert severe_console_messages(browser) == []


def test_generate_html_writes_the_same_view(tiny_models, browser, tmp_path):
    out = tmp_path / "gen.html"
    drafts = [a for d in tiny_models["drafts"] for a in ("--draft", d)]
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "generate",
        "--engine",
        "reference",
        "--target",
        tiny_models["target"],
        *drafts,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "10",
        "--eu-threshold",
        "1.0",
        "--jsonl",
        "--html",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    tokens = lines[:-1]
    browser.get(out.as_uri())
    wait_for(lambda: dom_tokens(browser), 30, "the rendered tokens")
    assert_tokens_match(dom_tokens(browser), tokens)
    assert browser.find_element("css selector", "#completion .prompt-text").text == PROMPT
    assert summary_fields(browser)["num_tokens"] == str(len(tokens))
    assert browser.find_elements("css selector", ".legend-threshold")  # 1.0 nats, marked
    assert severe_console_messages(browser) == []

    missing = subprocess.run(
        [*cmd[:-1], str(tmp_path / "no" / "such.html")], capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
