"""A real Prometheus (Debian's `prometheus`) scrapes a live epispec server, and every PromQL
expression of the Grafana dashboard, with its variables filled in, returns data from it.

The server is the real app with the reference engine over the tiny models. Prometheus runs on
a free loopback port with a temporary storage folder and `deploy/prometheus/prometheus.yml`,
its targets replaced by the live server and its interval set to 1 s; rates need two scrapes,
so traffic is sent, then sent again after a scrape.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from measure.load.probe import free_port
from tests.server.test_metrics import live_app, parse, value  # noqa: F401  (live_app: fixture)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "epispec.json"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is absent (Debian package `prometheus`; .ci/run installs it)",
)


def dashboard_queries() -> tuple[list[tuple[str, str]], list[dict]]:
    """[(panel title, expr)] of every panel target, and the template variables."""
    d = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in d["panels"] for t in p["targets"]]
    return exprs, d["templating"]["list"]


def fill(expr: str, instance: str, model: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$instance", instance).replace("$model", model)


@pytest.fixture(scope="module")
def prometheus(live_app, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    job = config["scrape_configs"][0]
    target = f"127.0.0.1:{live_app.port}"
    job["static_configs"] = [{"targets": [target]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(folder / "prometheus.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(folder / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield {"url": url, "target": target, "job": job["job_name"]}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def send_traffic(base: str) -> None:
    """Generations of every kind the dashboard shows: flagged (eu threshold 0), streamed,
    OpenAI-shaped, and one rejected request."""
    with httpx.Client(base_url=base, timeout=120) as c:
        for body in [
            {"prompt": "Tom has 3 apples", "max_tokens": 6, "thresholds": {"eu": 0.0}},
            {"prompt": "A farmer sells", "max_tokens": 5, "stream": True},
        ]:
            assert c.post("/generate", json=body).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "Sam", "max_tokens": 4}).status_code == 200
        assert c.post("/generate", json={"prompt": "hi", "max_tokens": 0}).status_code == 400


def wait_for_scrapes(url: str, job: str, n: int) -> None:
    """Until Prometheus has scraped the server `n` more times."""

    def scrapes() -> float:
        res = query(url, f'count_over_time(up{{job="{job}"}}[10m])')
        return float(res[0]["value"][1]) if res else 0.0

    start = scrapes()
    deadline = time.monotonic() + 30
    while scrapes() < start + n:
        assert time.monotonic() < deadline, "prometheus stopped scraping"
        time.sleep(0.3)


def test_every_dashboard_query_returns_data(live_app, prometheus):  # noqa: F811
    url, job = prometheus["url"], prometheus["job"]
    send_traffic(live_app.url)
    wait_for_scrapes(url, job, 2)
    send_traffic(live_app.url)
    wait_for_scrapes(url, job, 2)
    assert query(url, f'up{{job="{job}"}}')[0]["value"][1] == "1"

    exprs, variables = dashboard_queries()
    assert len(exprs) >= 20
    # the variables: label_values(selector, label) through the label-values API
    found = {}
    for var in variables:
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"]).groups()
        selector = selector.replace("$instance", prometheus["target"])
        r = httpx.get(f"{url}/api/v1/label/{label}/values", params={"match[]": selector}).json()
        found[var["name"]] = r["data"]
    assert found == {"instance": [prometheus["target"]], "model": ["tiny"]}

    empty, nan_only = [], []
    for title, expr in exprs:
        result = query(url, fill(expr, prometheus["target"], "tiny"))
        if not result:
            empty.append(f"{title}: {expr}")
        elif all(r["value"][1] == "NaN" for r in result):
            nan_only.append(f"{title}: {expr}")
    assert not empty, "no data for:\n" + "\n".join(empty)
    assert not nan_only, "only NaN for:\n" + "\n".join(nan_only)


def test_prometheus_holds_the_servers_values(live_app, prometheus):  # noqa: F811
    """After a last scrape, Prometheus' counters equal the server's own exposition."""
    send_traffic(live_app.url)
    own = parse(httpx.get(f"{live_app.url}/metrics").content)
    wait_for_scrapes(prometheus["url"], prometheus["job"], 2)
    for name in (
        "epispec_generation_tokens_total",
        "epispec_flagged_tokens_total",
        "epispec_token_eu_nats_count",
        "epispec_spec_accepted_tokens_total",
    ):
        stored = query(prometheus["url"], f"sum({name})")
        assert float(stored[0]["value"][1]) == value(own, name) > 0, name


def test_shipped_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent (it ships with Debian's `prometheus`)")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
