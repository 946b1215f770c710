"""The dashboard in headless Chromium shows what the REST API reports."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_api import CLIENTS, Seeded, redis, seeded  # noqa: F401  (fixtures used below)

from coordinator.api import ApiServer
from coordinator.settings import CoordinatorSettings
from tests.conftest import _unavailable

SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "dashboard.png"
CHROMIUM_TIMEOUT_S = 90.0
# The page polls every 2 s; virtual time lets several polls pass without waiting for them.
VIRTUAL_TIME_MS = 8000


@pytest.fixture
def chromium() -> str:
    """Path of the Chromium binary; missing fails in CI and skips elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        _unavailable("chromium on PATH (apt-get install -y chromium)")
    return found


@pytest.fixture
async def server(seeded: Seeded) -> AsyncIterator[ApiServer]:  # noqa: F811
    api = ApiServer(
        host="127.0.0.1",
        port=0,
        store=seeded.store,
        ledger=seeded.ledger,
        queue=seeded.queue,
        settings=CoordinatorSettings(),
    )
    await api.start()
    yield api
    await api.stop()


async def test_dashboard_shows_the_round_accuracy_and_queue_the_api_reports(
    chromium: str, server: ApiServer, tmp_path: Path
) -> None:
    dom = await _run_chromium(
        chromium, f"{server.url}/", profile=tmp_path / "profile", extra=["--dump-dom"]
    )

    page = _DomIndex.parse(dom)
    federation = await _api(server, "/v1/federation")
    rounds = (await _api(server, "/v1/rounds"))["rounds"]
    queue = await _api(server, "/v1/queue")
    latest = [r for r in rounds if r["test_accuracy"] is not None][-1]
    assert int(page.value("current-round")) == federation["current_round"] == 3
    assert float(page.value("latest-accuracy")) == latest["test_accuracy"]
    assert float(page.value("latest-loss")) == latest["test_loss"]
    assert int(page.value("queue-ready")) == queue["ready"]
    assert int(page.value("queue-consumers")) == queue["consumers"]
    assert float(page.value("queue-backlog")) == queue["backlog_per_worker"]
    assert int(page.value("dead-letters")) == queue["dead"]
    assert page.rounds == [r["round"] for r in reversed(rounds)]
    assert sorted(page.clients) == list(CLIENTS)


async def test_dashboard_screenshot_is_saved(
    chromium: str, server: ApiServer, tmp_path: Path
) -> None:
    shot = tmp_path / "dashboard.png"

    await _run_chromium(
        chromium,
        f"{server.url}/",
        profile=tmp_path / "profile",
        extra=[f"--screenshot={shot}", "--window-size=1280,900"],
    )

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


async def _run_chromium(binary: str, url: str, *, profile: Path, extra: list[str]) -> str:
    """Run headless Chromium on ``url`` while this loop keeps serving; returns its stdout."""
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *extra,
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S:.0f}s")

    if process.returncode != 0:
        pytest.fail(f"chromium exited {process.returncode}: {stderr.decode()[-2000:]}")
    return stdout.decode()


async def _api(server: ApiServer, path: str) -> dict:
    def get() -> dict:
        with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as response:
            return json.loads(response.read())

    return await asyncio.to_thread(get)


class _DomIndex(HTMLParser):
    """The ``data-value`` of every element with an id, and the rows the page drew."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.rounds: list[int] = []
        self.clients: list[str] = []

    @classmethod
    def parse(cls, html: str) -> _DomIndex:
        index = cls()
        index.feed(html)
        index.close()
        return index

    def value(self, element_id: str) -> str:
        value = self.values.get(element_id)
        assert value, f"#{element_id} has no data-value; the page did not render it"
        return value

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "id" in found and "data-value" in found:
            self.values[found["id"] or ""] = found["data-value"] or ""
        if tag == "tr" and found.get("data-round"):
            self.rounds.append(int(found["data-round"]))
        if found.get("data-client"):
            self.clients.append(found["data-client"])
