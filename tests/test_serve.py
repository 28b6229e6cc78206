"""python -m dalle_fast.serve: the JSON API in-process (images, determinism, refusals, the event stream),
the queue under concurrent clients and clients that go away (a real uvicorn server in a thread), and the
page in a real browser (headless Chromium from the system, driven by Playwright).

Skipped without the `serve` extra (pip install -e ".[serve]"); the browser test also skips, saying why,
without playwright or a Chromium.
"""

import base64
import io
import json
import os
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx (Starlette's TestClient)")
from starlette.testclient import TestClient  # noqa: E402

from dalle_fast.serve import MAX_IMAGES, MAX_RERANK, DrawRequest, ServeConfig, build_app  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_micro_runs):
    """A dVAE, a transformer trained with caption dropout (so guidance is offered) and a CLIP run, each
    trained for two updates (micro sizes; 32 px images, an 8x8 token grid)."""
    return train_micro_runs(tmp_path_factory.mktemp("serve_runs"), caption_dropout=0.2)


@pytest.fixture(scope="module")
def app(runs):
    app = build_app(ServeConfig(run=str(runs / "dalle"), batch_size=4, device="cpu"))
    yield app
    app.state.drawer.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def pngs(answer: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in answer["images"]]


def test_generate_answers_pngs_of_the_run_size_with_their_settings(client):
    r = client.post("/api/generate", json={"caption": "a large red circle", "images": 3, "seed": 5, "top_k": 8})
    assert r.status_code == 200, r.text
    answer = r.json()
    images = pngs(answer)
    assert [im.size for im in images] == [(32, 32)] * 3 and all(im.format == "PNG" for im in images)
    assert answer["settings"]["seed"] == 5 and answer["settings"]["top_k"] == 8 and answer["settings"]["images"] == 3
    assert answer["settings"]["batch_size"] == 4  # part of what decides the images
    saved = json.loads(images[1].text["dalle_fast"])  # each PNG carries the settings that made it
    assert saved["index"] == 2 and saved["caption"] == "a large red circle" and saved["seed"] == 5


def test_the_same_seed_answers_the_same_bytes(client):
    """Across chunks too: 6 images at batch_size 4 are sent as chunks of 4 and 2, drawn as one generate call."""
    from dalle_fast.runs.load import load_transformer
    from dalle_fast.sampling.sample import generate

    ask = {"caption": "a small blue square", "images": 6, "seed": 3}
    a, b = (client.post("/api/generate", json=ask).json() for _ in range(2))
    assert a["images"] == b["images"]
    c = client.post("/api/generate", json={**ask, "seed": 4}).json()
    assert a["images"] != c["images"]
    model, tok, dvae = load_transformer(client.app.state.drawer.cfg.run)
    one_call = generate(
        model, tok.encode([ask["caption"]]), dvae, draws=6, batch_size=4, generator=torch.Generator().manual_seed(3)
    )
    want = (one_call["images"][0].clamp(0, 1) * 255).round().byte()
    got = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))) for im in pngs(a)])
    assert torch.equal(got.permute(0, 3, 1, 2), want)


def test_rerank_and_guidance_and_prime(client):
    reranked = client.post(
        "/api/generate", json={"caption": "a green triangle", "images": 2, "rerank": 6, "guidance": 2.0}
    ).json()
    scores = reranked["scores"]
    assert len(reranked["images"]) == 2 and scores == sorted(scores, reverse=True)
    assert reranked["settings"]["clip"].endswith("clip") and reranked["settings"]["guidance"] == 2.0
    prime = "data:image/png;base64," + reranked["images"][0]
    completed = client.post("/api/generate", json={"caption": "a green triangle", "prime": prime, "prime_rows": 3})
    assert completed.status_code == 200, completed.text
    assert completed.json()["settings"]["prime"].startswith("sha256:")
    assert completed.json()["settings"]["prime_rows"] == 3


def not_an_image() -> str:
    return base64.b64encode(b"GIF89a but not really").decode()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"caption": ""}, "caption"),
        ({"caption": "   "}, "caption"),
        ({"images": 2}, "caption"),
        ({"caption": "circle " * 30}, "caption"),  # more tokens than text_len (24)
        ({"caption": "c" * 1001}, "caption"),
        ({"caption": "a circle", "images": 0}, "images"),
        ({"caption": "a circle", "images": MAX_IMAGES + 1}, "images"),
        ({"caption": "a circle", "images": "two"}, "images"),
        ({"caption": "a circle", "images": True}, "images"),
        ({"caption": "a circle", "images": 4, "rerank": 2}, "rerank"),
        ({"caption": "a circle", "rerank": MAX_RERANK + 1}, "rerank"),
        ({"caption": "a circle", "temperature": 0}, "temperature"),
        ({"caption": "a circle", "top_p": 0}, "top_p"),
        ({"caption": "a circle", "top_k": -1}, "top_k"),
        ({"caption": "a circle", "guidance": 0.5}, "guidance"),
        ({"caption": "a circle", "seed": -1}, "seed"),
        ({"caption": "a circle", "steps": 3}, "steps"),
        ({"caption": "a circle", "prime": not_an_image()}, "prime"),
        ({"caption": "a circle", "prime": "%%% not base64"}, "prime"),
        ({"caption": "a circle", "prime_rows": 2}, "prime_rows"),
        (["a circle"], "body"),
    ],
)
def test_bad_requests_answer_400_naming_the_field(client, body, field):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert r.json()["error"].startswith(f"{field}: ")


def test_refusals_that_depend_on_the_run(client, app):
    r = client.post("/api/generate", content=b"{not json")
    assert r.status_code == 400 and r.json()["field"] == "body"
    drawer = app.state.drawer
    scorer, drawer.scorer = drawer.scorer, None
    try:
        r = client.post("/api/generate", json={"caption": "a circle", "rerank": 4})
        assert r.status_code == 400 and "no reranker" in r.json()["error"]
        assert client.get("/api/info").json()["rerank"] is False
    finally:
        drawer.scorer = scorer
    drawer.guidance = False
    try:
        r = client.post("/api/generate", json={"caption": "a circle", "guidance": 3})
        assert r.status_code == 400 and "caption dropout" in r.json()["error"]
    finally:
        drawer.guidance = True


def test_draw_request_from_json_converts_ints_for_floats():
    assert DrawRequest.from_json({"caption": "x", "temperature": 1}).temperature == 1.0
    assert isinstance(DrawRequest.from_json({"caption": "x", "top_p": 1}).top_p, float)


def sse(lines) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream's lines."""
    out, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


def test_the_event_stream_reports_progress_then_each_image(client):
    with client.stream(
        "POST", "/api/generate", json={"caption": "a red circle", "images": 5}, headers={"Accept": "text/event-stream"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("image") == 5
    done = [d["done"] for k, d in events if k == "progress"]
    assert done == sorted(done) and done[-1] == 5 * 64 and {d["total"] for k, d in events if k == "progress"} == {320}
    first_image = kinds.index("image")  # the first chunk (4 images) is sent before the last one is drawn
    assert any(k == "progress" for k in kinds[first_image:])
    assert [d["index"] for k, d in events if k == "image"] == list(range(5))


# ---- a real server: concurrent clients and clients that go away -------------------------------------


@pytest.fixture(scope="module")
def server(runs):
    """uvicorn serving the micro run in a thread on a free port (batch_size 1: a long job is 64 chunks,
    easy to catch running). Yields (base URL, the app)."""
    import uvicorn

    app = build_app(ServeConfig(run=str(runs / "dalle"), batch_size=1, device="cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # listening before uvicorn starts: early connections wait in the backlog, no race
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


def test_concurrent_requests_each_get_their_own_images(server):
    url, app = server
    asks = [{"caption": ["a red circle", "a blue square"][i % 2], "images": 2, "seed": i} for i in range(8)]
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post("/api/generate", json=a).json()["images"] for a in asks]
    before = app.state.drawer.counts["done"]

    def ask(a):  # one client each, all at once
        with httpx.Client(base_url=url, timeout=120) as c:
            return c.post("/api/generate", json=a).json()

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, asks))
    assert [t["images"] for t in together] == alone
    assert [t["settings"]["seed"] for t in together] == list(range(8))
    # The worker records a job's outcome just after sending its last event, so the answers may come first.
    assert app.state.drawer.wait_until(lambda d: d.counts["done"] == before + 8, 30)


def running_job(drawer, timeout=60):
    assert drawer.wait_until(lambda d: d.running is not None, timeout), "no job started"
    return drawer.running


@pytest.mark.parametrize("mode", ["json", "events"])
def test_a_client_that_goes_away_cancels_its_request(server, mode):
    """A running request is stopped, a waiting one leaves the queue, and the next request is served."""
    url, app = server
    drawer = app.state.drawer
    before = drawer.counts["cancelled"]
    long_job = json.dumps({"caption": "a red circle", "images": MAX_IMAGES}).encode()
    accept = "text/event-stream" if mode == "events" else "application/json"
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
        f"Content-Length: {len(long_job)}\r\n\r\n"
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    running, waiting = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
    running.sendall(head + long_job)
    job = running_job(drawer)
    waiting.sendall(head + long_job)
    assert drawer.wait_until(lambda d: len(d.waiting) == 1, 30)
    if mode == "events":  # the stream has told the waiting client its place
        waiting.settimeout(30)
        seen = b""
        while b"event: queued" not in seen:
            seen += waiting.recv(4096)
        assert b'"position": 1' in seen
    waiting.close()
    assert drawer.wait_until(lambda d: not d.waiting and d.counts["cancelled"] == before + 1, 30)
    assert job.outcome == "running"
    running.close()
    assert drawer.wait_until(lambda d: d.running is None and d.counts["cancelled"] == before + 2, 30)
    assert job.outcome == "cancelled"
    with httpx.Client(base_url=url, timeout=60) as c:  # the queue moves on
        assert c.post("/api/generate", json={"caption": "a blue square"}).status_code == 200


# ---- the page in a real browser ---------------------------------------------------------------------


def find_chromium() -> str | None:
    """A Chromium of the system: $DALLE_FAST_CHROMIUM, else the usual names and Debian's binary."""
    for candidate in [os.environ.get("DALLE_FAST_CHROMIUM"), "/usr/lib/chromium/chromium"]:
        if candidate and Path(candidate).is_file():
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def skip_or_fail(reason: str):
    """Skips, unless DALLE_FAST_REQUIRE_BROWSER is set (CI sets it once it has installed a Chromium)."""
    if os.environ.get("DALLE_FAST_REQUIRE_BROWSER"):
        pytest.fail(f"DALLE_FAST_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


def test_the_page_draws_in_a_real_browser(server, tmp_path):
    try:
        from playwright import sync_api as playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright; it drives the system's Chromium)")
    chromium = find_chromium()
    if chromium is None:
        skip_or_fail("no Chromium on this machine (apt-get install chromium, or set DALLE_FAST_CHROMIUM)")
    url, app = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#guidance-box:not([hidden])")  # /api/info read: this run offers guidance
            assert page.is_visible("#rerank-box")  # and has a reranker (RUN/../clip)
            page.fill("#caption", "a small red circle")
            page.fill("#images", "3")
            page.fill("#seed", "7")
            page.click("#go")
            try:
                page.wait_for_function("document.querySelector('#all').dataset.ms !== undefined", timeout=60_000)
            except playwright.TimeoutError:
                pytest.fail(f"the page did not finish: status {page.inner_text('#status')!r}, script errors {errors}")
            progress = page.eval_on_selector("#progress", "p => [p.value, p.max]")
            assert progress == [3 * 64, 3 * 64]
            page.wait_for_function(
                "[...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length === 3",
                timeout=30_000,
            )
            assert page.eval_on_selector_all("#gallery img", "xs => xs.map(i => i.naturalWidth)") == [32] * 3
            assert float(page.get_attribute("#first", "data-ms")) > 0
            assert "done: 3 images" in page.inner_text("#status")
            links = page.eval_on_selector_all("#gallery a[download]", "xs => xs.map(a => a.download)")
            assert links[0] == "a-small-red-circle_seed7_01.png"
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            # A refusal is shown on the page, not thrown away.
            page.fill("#caption", "")
            page.click("#go")
            page.wait_for_selector("#status.error")
            assert "caption: is empty" in page.inner_text("#status")
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 0 and not errors
