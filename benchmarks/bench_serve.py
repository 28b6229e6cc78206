"""The server under a browser and under a crowd: python -m benchmarks.bench_serve --run RUN.

Serves RUN (uvicorn in a thread, as python -m dalle_fast.serve does) and measures
- the time from clicking Generate to the first image on the page, for one image without reranking, as the
  page itself reports it (performance.now() from the click to the image's load event), in headless
  Chromium driven by Playwright;
- sixteen requests sent at once from several clients (event streams): each must come back complete and
  equal to the same request made alone (no request lost, none given another's images); the largest queue
  place a request was told, and the time until the last one finished.
Writes a Markdown table (--out) and, with --screenshot, the page after a reranked generation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dalle_fast.serve import ServeConfig, build_app

HERE = Path(__file__).parent


def serve_in_thread(cfg: ServeConfig):
    """(base URL, app, stop()) for the app served by uvicorn on a free port."""
    import uvicorn

    app = build_app(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", app, stop


def chromium() -> str:
    for path in [os.environ.get("DALLE_FAST_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")]:
        if path and Path(path).is_file():
            return path
    raise SystemExit("no Chromium found: apt-get install chromium, or set DALLE_FAST_CHROMIUM")


def first_image_ms(page, caption: str, seed: int, images: int = 1, rerank: int = 0) -> tuple[float, float]:
    """(ms to the first image, ms to the last) as the page shows them, for one click of Generate."""
    page.fill("#caption", caption)
    page.fill("#images", str(images))
    page.fill("#seed", str(seed))
    if page.is_visible("#rerank"):
        page.fill("#rerank", str(rerank))
    page.click("#go")
    page.wait_for_function("document.querySelector('#all').dataset.ms !== undefined", timeout=600_000)
    page.wait_for_function(
        f"[...document.querySelectorAll('#gallery img')].filter(i => i.naturalWidth > 0).length === {images}"
    )
    return float(page.get_attribute("#first", "data-ms")), float(page.get_attribute("#all", "data-ms"))


def stream(client, body: dict) -> dict:
    """One request as server-sent events: its images, settings and the largest queue place it was told."""
    out = {"images": [], "position": 0}
    with client.stream("POST", "/api/generate", json=body, headers={"Accept": "text/event-stream"}) as r:
        r.raise_for_status()
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "queued":
                    out["position"] = max(out["position"], data["position"])
                elif kind == "image":
                    out["images"].append(data["png"])
                elif kind == "done":
                    out["settings"] = data["settings"]
                elif kind == "error":
                    raise RuntimeError(data["error"])
    return out


def crowd(url: str, n: int, clients: int, captions: list[str]) -> dict:
    import httpx

    asks = [{"caption": captions[i % len(captions)], "images": 2, "seed": 100 + i} for i in range(n)]
    with httpx.Client(base_url=url, timeout=600) as c:
        alone = [c.post("/api/generate", json=a).json()["images"] for a in asks]
    pool_clients = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(n) as pool:
            together = list(pool.map(lambda i: stream(pool_clients[i % clients], asks[i]), range(n)))
    finally:
        for c in pool_clients:
            c.close()
    seconds = time.perf_counter() - start
    same = sum(t["images"] == a for t, a in zip(together, alone, strict=True))
    own = sum(t["settings"]["seed"] == a["seed"] for t, a in zip(together, asks, strict=True))
    return {
        "requests": n, "clients": clients, "complete": sum(len(t["images"]) == 2 for t in together),
        "equal_to_alone": same, "own_settings": own, "max_position": max(t["position"] for t in together),
        "seconds": seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a stage-2 run (its ../clip is the reranker)")
    ap.add_argument("--caption", default="a large red diamond below a large yellow square")
    ap.add_argument("--repeats", type=int, default=5, help="clicks timed for the one-image figure")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "RESULTS_serve.md"))
    ap.add_argument("--screenshot", default="", help="PNG of the page after a reranked generation of 8 images")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    cfg = ServeConfig(run=args.run, threads=args.threads, device="cpu")
    url, app, stop = serve_in_thread(cfg)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "/")
            page.wait_for_selector("#runinfo:not(:empty)")
            clicks = [first_image_ms(page, args.caption, seed) for seed in range(args.repeats)]
            if args.screenshot:
                rerank = 32 if app.state.drawer.scorer is not None else 0
                first_image_ms(page, args.caption, seed=0, images=8, rerank=rerank)
                page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
        captions = [args.caption, "a small blue circle above a large green square"]
        crowded = crowd(url, args.requests, args.clients, captions)
    finally:
        stop()
    first = [c[0] for c in clicks]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    d = app.state.drawer
    lines = [
        "# The server: time to the first image, and a crowd of requests",
        "",
        f"`python -m benchmarks.bench_serve {command}` on {platform.machine()}, {torch.get_num_threads()} "
        f"torch thread(s), torch {torch.__version__}, device {d.device}, batch size {d.cfg.batch_size}. The run: "
        f"{d.model.cfg.image_size}x{d.model.cfg.image_size} image tokens, {d.model.cfg.n_layers} layers, d_model "
        f"{d.model.cfg.d_model}, {sum(p.numel() for p in d.model.parameters()) / 1e6:.1f}M parameters "
        f"({d.dvae.cfg.image_size} px images). Load average (1 min) at the start: {load:.2f}.",
        "",
        "## Click to first image (one image, no reranking; the page's own timing, headless Chromium)",
        "",
        "| click | first image (ms) |",
        "|---:|---:|",
        *[f"| {i + 1} | {ms:.0f} |" for i, ms in enumerate(first)],
        "",
        f"Median {statistics.median(first):.0f} ms, best {min(first):.0f} ms, first click {first[0]:.0f} ms.",
        "",
        f"## {crowded['requests']} requests at once from {crowded['clients']} clients (2 images each, event streams)",
        "",
        "| complete | equal to the same request alone | answered with their own settings | largest queue place told "
        "| until the last finished (s) |",
        "|---:|---:|---:|---:|---:|",
        f"| {crowded['complete']}/{crowded['requests']} | {crowded['equal_to_alone']}/{crowded['requests']} | "
        f"{crowded['own_settings']}/{crowded['requests']} | {crowded['max_position']} | {crowded['seconds']:.2f} |",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if crowded["equal_to_alone"] == crowded["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
