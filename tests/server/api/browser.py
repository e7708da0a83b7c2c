"""A real headless Chromium driven by selenium, for the playground tests.

`chromium_or_skip()` starts one (Debian packages `chromium` and `chromium-driver`, which
`.ci/run` installs when missing) or skips the test saying what is missing. Nothing is
downloaded: the driver is the one on PATH.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

INSTALL = "apt-get install chromium chromium-driver (as .ci/run does)"


def chromium_or_skip() -> Any:
    """A started headless Chromium WebDriver (the caller quits it)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = [n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None]
        pytest.skip(f"needs a real Chromium: {', '.join(missing)} not on PATH; {INSTALL}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (in the dev extra: pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,860",
        "--force-device-scale-factor=1",
        "--no-first-run",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Polls until `predicate()` is truthy and returns its value; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# Every token span of the page, as the DOM holds it.
TOKENS_JS = """
return [...document.querySelectorAll('#transcript .tok')].map((s) => {
  const cs = getComputedStyle(s);
  return {text: s.textContent, eu: s.dataset.eu, bias: s.dataset.bias,
          variance: s.dataset.variance, logprob: s.dataset.logprob,
          flagged: s.dataset.flagged, token_id: s.dataset.tokenId,
          aria: s.getAttribute('aria-label'), background: cs.backgroundColor,
          outline: cs.outlineStyle, tabindex: s.getAttribute('tabindex')};
});
"""


def dom_tokens(driver: Any) -> list[dict]:
    return driver.execute_script(TOKENS_JS)


def summary_fields(driver: Any) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#summary dd')]"
        ".map((d) => [d.dataset.field, d.textContent]));"
    )


def luminance(css_rgb: str) -> float:
    """WCAG relative luminance of an `rgb(r, g, b)` string."""
    parts = [int(x) for x in css_rgb[css_rgb.index("(") + 1 : css_rgb.index(")")].split(",")[:3]]
    lin = [(v / 255) / 12.92 if v / 255 <= 0.03928 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in parts]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def severe_console_messages(driver: Any) -> list[str]:
    """Errors the page logged (a Content-Security-Policy violation or a script error), but
    not the HTTP errors a test provoked on purpose."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "Failed to load resource: the server responded with a status of" not in e["message"]
    ]


def assert_tokens_match(dom: list[dict], api: list[dict]) -> None:
    """The DOM's tokens carry the API's values: exact in the data attributes, and printed
    (3 decimals) in the accessible label that the tooltip also shows."""
    assert len(dom) == len(api) > 0
    for i, (d, a) in enumerate(zip(dom, api, strict=True)):
        assert d["text"] == a["text"], i
        for key in ("eu", "bias", "variance", "logprob"):
            assert float(d[key]) == a[key], (i, key, d[key], a[key])
        for key, label in (("eu", "eu"), ("bias", "bias"), ("variance", "variance"), ("logprob", "logprob")):
            assert f"{label} {a[key]:.3f}" in d["aria"], (i, d["aria"])
        assert d["flagged"] == ("true" if a["flagged"] else "false")
        assert d["outline"] == ("solid" if a["flagged"] else "none"), (i, d["outline"])
        assert d["background"].startswith("rgb(") and d["background"] != "rgba(0, 0, 0, 0)"


def assert_darker_with_more_eu(dom: list[dict]) -> None:
    """The colour scale is monotonic: more eu, darker background (up to rounding to 8-bit
    channels, worth < 0.001 in luminance where the blue channel rises as green falls)."""
    pairs = sorted((float(d["eu"]), luminance(d["background"])) for d in dom)
    for (eu1, l1), (eu2, l2) in zip(pairs, pairs[1:], strict=False):
        assert eu1 == eu2 or l1 >= l2 - 0.002, (eu1, l1, eu2, l2)
    if pairs[-1][0] - pairs[0][0] > 1.0:  # nats apart: visibly different on a scale up to 10
        assert pairs[0][1] > pairs[-1][1] + 0.03
