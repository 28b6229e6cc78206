"""A web page and a JSON API that draw images from a trained run: python -m dalle_fast.serve --run RUN.

One model sits in memory and one worker thread samples with it; requests wait their turn in a queue (each
is told its place), and a request whose client goes away is dropped from the queue or stopped at its next
image token. `POST /api/generate` takes the settings as JSON and answers the PNGs as base64 (all at once,
or as server-sent events when asked with `Accept: text/event-stream`: the queue place, the image tokens
done, each image as it is finished); the page at / is a client of that same API. docs/serve.md has the
API, its limits and its events.

The web framework (Starlette, served by uvicorn) is the optional extra `serve` and is imported only when a
server is built, so the rest of the package works without it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from dalle_fast.cli import build_parser, parse_config, run_or_exit
from dalle_fast.errors import FieldError, check_finite, field_errors
from dalle_fast.runs.checkpoint import load_config
from dalle_fast.runs.images import to_uint8
from dalle_fast.runs.load import load_transformer
from dalle_fast.sampling.rerank import find_scorer
from dalle_fast.sampling.sample import MIN_TEMPERATURE, generate, load_prime, sampling_device

MAX_IMAGES = 64  # images one request may keep
MAX_RERANK = 512  # draws one request may rerank (the paper's N)
MAX_CAPTION_CHARS = 1000  # refused before tokenizing; the token limit (text_len) is checked after
MAX_BODY_BYTES = 8 << 20  # a request body, a base64 prime image included
PAGE = "serve_page.html"


@dataclass
class ServeConfig:
    """Serves a page and a JSON API that draw images for captions from a trained stage-2 run."""

    run: str = field(
        default="", metadata={"help": "the stage-2 run directory (python -m dalle_fast.train dalle --out)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    clip: str = field(
        default="", metadata={"help": "CLIP run or open_clip:ARCH:WEIGHTS_FILE for reranking; empty: RUN/../clip"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "images sampled at once (part of the settings: a seed draws the same images)"}
    )
    queue: int = field(default=64, metadata={"help": "requests that may wait; more are refused (503)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default"})
    device: str = field(
        default="auto", metadata={"help": "auto (the GPU when the model's attention runs there) | cpu | cuda | cuda:N"}
    )

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required: the stage-2 run directory")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.batch_size < 1 or self.queue < 1 or self.threads < 0:
            raise ValueError("batch_size and queue must be >= 1, threads >= 0")


@dataclass
class DrawRequest:
    """One request's settings: the JSON body of POST /api/generate (every field but caption optional)."""

    caption: str = ""  # what to draw
    images: int = 1  # images answered
    rerank: int = 0  # draw this many and answer the best `images` by the reranker; 0: none
    seed: int = 0  # seed of the sampling: the same settings and seed answer the same images
    temperature: float = 1.0  # softmax temperature of the image tokens
    top_k: int = 0  # sample among the k likeliest tokens; 0: all
    top_p: float = 1.0  # sample among the likeliest tokens holding this probability mass
    guidance: float = 1.0  # classifier-free guidance scale (runs trained with caption dropout); 1: none
    prime: str = ""  # an image to complete, base64 (a data: URL too); its top prime_rows token rows are kept
    prime_rows: int = 0  # token rows of prime kept; 0: half the grid

    def __post_init__(self):
        check_finite(self)
        if not self.caption.strip():
            raise FieldError("caption", "is empty")
        if len(self.caption) > MAX_CAPTION_CHARS:
            raise FieldError("caption", f"has {len(self.caption)} characters, at most {MAX_CAPTION_CHARS}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise FieldError("images", f"must be in [1, {MAX_IMAGES}], got {self.images}")
        if self.rerank and not self.images <= self.rerank <= MAX_RERANK:
            raise FieldError("rerank", f"must be 0 or in [images ({self.images}), {MAX_RERANK}], got {self.rerank}")
        if self.rerank < 0:
            raise FieldError("rerank", f"must be >= 0, got {self.rerank}")
        if not 0 <= self.seed < 2**63:
            raise FieldError("seed", f"must be in [0, 2**63), got {self.seed}")
        if not self.temperature >= MIN_TEMPERATURE:
            raise FieldError("temperature", f"must be >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k < 0:
            raise FieldError("top_k", f"must be >= 0 (0: all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not self.guidance >= 1:
            raise FieldError("guidance", f"must be >= 1 (1: none), got {self.guidance}")
        if self.prime_rows < 0:
            raise FieldError("prime_rows", f"must be >= 0 (0: half the grid), got {self.prime_rows}")
        if self.prime_rows and not self.prime:
            raise FieldError("prime_rows", "needs a prime image")

    @classmethod
    def from_json(cls, body: object) -> DrawRequest:
        """The settings of a decoded JSON body; FieldError naming the first unknown or mistyped field."""
        if not isinstance(body, dict):
            raise FieldError("body", f"must be a JSON object of settings, got {type(body).__name__}")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in body.items():
            if name not in kinds:
                raise FieldError(name, f"is not a setting (the settings: {', '.join(kinds)})")
            want = {"str": str, "int": int, "float": (int, float)}[kinds[name]]
            if isinstance(value, bool) or not isinstance(value, want):
                raise FieldError(name, f"must be a JSON {kinds[name].replace('str', 'string')}, got {value!r}"[:200])
        if "caption" not in body:
            raise FieldError("caption", "is required")
        return cls(**{k: float(v) if kinds[k] == "float" else v for k, v in body.items()})


class Cancelled(Exception):
    """Raised inside the sampling when a request's client has gone away."""


class Job:
    """A queued request: its settings, its prepared inputs, and the events it answers with.

    `events` receives (kind, data) pairs from the worker thread through the event loop that made the job:
    ("queued", {"position": requests ahead}), ("progress", {"done", "total"}: image tokens),
    ("image", {"index", "png", "score", "settings"}), then ("done", {...}) or ("error", {"error"}); a
    cancelled job sends nothing more."""

    def __init__(self, request: DrawRequest, text: torch.Tensor, prime: bytes | None, warnings: list[str]):
        self.request, self.text, self.prime, self.warnings = request, text, prime, warnings
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.outcome = "waiting"  # -> running -> done | failed | cancelled
        self.position = -1  # the queue place last told to the client

    def place(self, position: int) -> None:
        if position != self.position:
            self.position = position
            self.send("queued", {"position": position})

    def send(self, kind: str, data: dict) -> None:
        if self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is closed: the server is stopping
            self.cancelled.set()


class Drawer:
    """The model in memory and the one worker thread that samples with it, a request at a time in the
    order they came (a FIFO queue)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with field_errors("run"):
            self.model, self.tok, self.dvae = load_transformer(cfg.run)
            train = load_config(cfg.run).get("train", {})
        self.device = sampling_device(cfg.device, self.model)
        self.model.to(self.device)
        self.guidance = bool(train.get("caption_dropout", 0))  # guidance needs a model that saw the empty caption
        self.scorer, self.clip = find_scorer(cfg.run, cfg.clip)
        self.grid = self.model.cfg.image_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.counts = collections.Counter()  # outcomes of finished jobs (tests and /api/info read them)
        self.changed = threading.Condition()  # guards waiting/running/counts; notified on every change
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="dalle_fast-sampler", daemon=True)
        self.worker.start()

    def info(self) -> dict:
        """What the page needs to show the right settings, and the server's state."""
        with self.changed:
            waiting, busy = len(self.waiting), self.running is not None
        return {
            "run": self.cfg.run, "image_size": self.dvae.cfg.image_size, "grid": self.grid,
            "text_len": self.tok.text_len, "device": str(self.device), "batch_size": self.cfg.batch_size,
            "rerank": self.scorer is not None, "clip": self.clip if self.scorer else "", "guidance": self.guidance,
            "limits": {"images": MAX_IMAGES, "rerank": MAX_RERANK, "caption_chars": MAX_CAPTION_CHARS,
                       "caption_tokens": self.tok.text_len, "body_bytes": MAX_BODY_BYTES, "queue": self.cfg.queue},
            "defaults": {f.name: f.default for f in dataclasses.fields(DrawRequest)},
            "queue": {"waiting": waiting, "running": busy, "finished": dict(self.counts)},
        }  # fmt: skip

    def prepare(self, req: DrawRequest) -> Job:
        """The checks that need the run (caption tokens, reranker, guidance, prime), then a Job; FieldError
        for a request this run cannot serve. Called on the event loop: nothing here runs the model."""
        n = self.tok.length(req.caption.strip())
        if n > self.tok.text_len:
            raise FieldError("caption", f"is {n} tokens long; this model reads at most {self.tok.text_len}")
        if req.rerank and self.scorer is None:
            raise FieldError("rerank", "this server has no reranker (start it with --clip CLIP_RUN)")
        if req.guidance != 1 and not self.guidance:
            raise FieldError("guidance", "this run was trained without caption dropout, so it cannot be guided")
        prime = None
        if req.prime:
            if req.prime_rows > self.grid:
                raise FieldError("prime_rows", f"must be in [0, {self.grid}] (the token grid's rows)")
            prime = _image_bytes(req.prime)
        unseen = self.tok.unseen_words(req.caption)
        warnings = [f"words no training caption had: {', '.join(unseen)}"] if unseen else []
        return Job(req, self.tok.encode(req.caption.strip())[None], prime, warnings)

    def submit(self, job: Job) -> None:
        with self.changed:
            if len(self.waiting) >= self.cfg.queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already; try again later")
            self.waiting.append(job)
            self._positions()
            self.changed.notify_all()

    def cancel(self, job: Job) -> None:
        """Drops a waiting job, or stops a running one at its next image token."""
        job.cancelled.set()
        with self.changed:
            if job in self.waiting:
                self.waiting.remove(job)
                self._finish(job, "cancelled")
                self._positions()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            for job in self.waiting:
                job.cancelled.set()
            self.changed.notify_all()
        if self.running is not None:
            self.running.cancelled.set()
        self.worker.join(timeout=30)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Blocks until predicate(self) holds (checked at every change of the queue), or timeout seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def _positions(self) -> None:
        for k, job in enumerate(self.waiting):
            job.place(k + 1 if self.running else k)

    def _finish(self, job: Job, outcome: str) -> None:
        job.outcome = outcome
        self.counts[outcome] += 1
        self.changed.notify_all()

    def _work(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.closed)
                if self.closed:
                    return
                job = self.running = self.waiting.popleft()
                job.outcome = "running"
                self._positions()
                self.changed.notify_all()
            job.place(0)
            try:
                self._draw(job)
                outcome = "done"
            except Cancelled:
                outcome = "cancelled"
            except Exception as e:  # a request must not take the worker down with it
                outcome = "failed"
                job.send("error", {"error": f"{type(e).__name__}: {e}"})
                print(f"serve: a request failed: {type(e).__name__}: {e}", file=sys.stderr)
            with self.changed:
                self.running = None
                self._finish(job, outcome)

    def _draw(self, job: Job) -> None:
        """Samples one job: without reranking in chunks of batch_size (each chunk's images sent when they
        are done; the seeded generator runs through the chunks as generate would through its batches, so
        the images are those of one call), with reranking in one call, the kept images sent at its end."""
        req, start = job.request, time.perf_counter()
        prime = None
        if job.prime is not None:
            rows = req.prime_rows or self.grid // 2
            prime, _ = load_prime(io.BytesIO(job.prime), self.dvae, rows)
        settings = self.settings(req, job.prime)
        per_draw = self.grid**2 - (0 if prime is None else prime.numel())
        total = (req.rerank or req.images) * per_draw
        generator = torch.Generator(self.device).manual_seed(req.seed)

        def chunk_progress(offset: int):
            last = [-1.0]

            def step(done: int, _total: int) -> None:
                if job.cancelled.is_set():
                    raise Cancelled
                now = time.perf_counter()
                if now - last[0] > 0.05 or done == _total:  # at most ~20 events a second reach the page
                    last[0] = now
                    job.send("progress", {"done": offset + done, "total": total})

            return step

        chunks = [(0, req.rerank)] if req.rerank else [
            (i, min(self.cfg.batch_size, req.images - i)) for i in range(0, req.images, self.cfg.batch_size)
        ]  # fmt: skip
        index, scores = 0, []
        for first, draws in chunks:
            result = generate(
                self.model, job.text, self.dvae, draws=draws, keep=req.images if req.rerank else draws,
                scorer=self.scorer if req.rerank else None, captions=[req.caption.strip()], prime=prime,
                batch_size=self.cfg.batch_size, generator=generator, progress=chunk_progress(first * per_draw),
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, guidance=req.guidance,
            )  # fmt: skip
            for image, score in zip(result["images"][0], result["scores"][0].tolist(), strict=True):
                if job.cancelled.is_set():
                    raise Cancelled
                score = None if math.isnan(score) else round(score, 4)
                meta = {**settings, "index": index + 1, **({"score": score} if score is not None else {})}
                job.send("image", {"index": index, "png": png_base64(image, meta), "score": score, "settings": meta})
                scores.append(score)
                index += 1
        seconds = round(time.perf_counter() - start, 3)
        job.send("done", {"settings": settings, "scores": scores, "warnings": job.warnings, "seconds": seconds})

    def settings(self, req: DrawRequest, prime: bytes | None) -> dict:
        """Everything that decides the images (the same settings, the same images), the prime by its hash."""
        out = dataclasses.asdict(req)
        out["caption"] = req.caption.strip()
        if prime is not None:
            out["prime"] = "sha256:" + hashlib.sha256(prime).hexdigest()[:16]
            out["prime_rows"] = req.prime_rows or self.grid // 2
        out.update(run=self.cfg.run, batch_size=self.cfg.batch_size, device=str(self.device))
        if req.rerank:
            out["clip"] = self.clip
        return out


class QueueFull(Exception):
    pass


def png_base64(image: torch.Tensor, settings: dict) -> str:
    """An image (3, H, W) in [0, 1] as base64 PNG bytes, its settings in a text chunk ("dalle_fast")."""
    info = PngImagePlugin.PngInfo()
    info.add_text("dalle_fast", json.dumps(settings))
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image).numpy()).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def _image_bytes(data: str) -> bytes:
    """The bytes of a base64 image (a data: URL too), checked to be an image PIL can read."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError("prime", "is not base64 data") from e
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise FieldError("prime", f"is not an image this server can read ({type(e).__name__})") from e
    return raw


def _framework():
    """(starlette's pieces, uvicorn), or a ValueError naming the extra that installs them."""
    try:
        import uvicorn
        from starlette import applications, requests, responses, routing
    except ImportError as e:
        raise ValueError(
            f"the server needs the optional extra 'serve' ({e.name} is missing): pip install -e \".[serve]\" "
            "(or pip install starlette uvicorn)"
        ) from e
    return applications, requests, responses, routing, uvicorn


def build_app(cfg: ServeConfig, drawer: Drawer | None = None):
    """The Starlette app: the page at /, GET /api/info, POST /api/generate. app.state.drawer holds the
    model and the queue (closed when the app shuts down)."""
    applications, requests, responses, routing, _ = _framework()
    drawer = drawer or Drawer(cfg)
    page = resources.files("dalle_fast").joinpath(PAGE).read_text()

    def refuse(error: FieldError | str, status: int = 400):
        if isinstance(error, FieldError):
            return responses.JSONResponse({"error": str(error), "field": error.field}, status_code=status)
        return responses.JSONResponse({"error": error}, status_code=status)

    async def index(request):
        return responses.HTMLResponse(page)

    async def info(request):
        return responses.JSONResponse(drawer.info())

    async def generate_route(request):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return refuse(FieldError("body", f"is larger than {MAX_BODY_BYTES >> 20} MiB"), 413)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return refuse(FieldError("body", f"is not JSON: {e}"))
        try:
            job = drawer.prepare(DrawRequest.from_json(body))
        except FieldError as e:
            return refuse(e)
        try:
            drawer.submit(job)
        except QueueFull as e:
            return refuse(f"queue: {e}", 503)
        if "text/event-stream" in request.headers.get("accept", ""):
            return responses.StreamingResponse(
                _event_stream(drawer, job), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
            )
        return await _json_answer(drawer, job, request, responses)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(drawer.close)  # stops the running job at its next token

    app = applications.Starlette(
        routes=[
            routing.Route("/", index),
            routing.Route("/api/info", info),
            routing.Route("/api/generate", generate_route, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.drawer = drawer
    return app


async def _event_stream(drawer: Drawer, job: Job):
    """Server-sent events of a job. Starlette cancels this generator when the client disconnects, and the
    finally clause then cancels the job."""
    try:
        while True:
            kind, data = await job.events.get()
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            if kind in ("done", "error"):
                return
    finally:
        drawer.cancel(job)


async def _json_answer(drawer: Drawer, job: Job, request, responses):
    """Waits for a job's end and answers every image in one JSON object; a client that disconnects first
    cancels the job (the watch reads the ASGI messages after the body, of which the next is the
    disconnect)."""
    images: list[str] = []

    async def finish():
        while True:
            kind, data = await job.events.get()
            if kind == "image":
                images.append(data["png"])
            elif kind in ("done", "error"):
                return kind, data

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    finished, watcher = asyncio.ensure_future(finish()), asyncio.ensure_future(watch())
    try:
        await asyncio.wait([finished, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not finished.done():
            finished.cancel()
            drawer.cancel(job)
    if not finished.done() or finished.cancelled():
        return responses.Response(status_code=499)  # nobody is listening
    kind, data = finished.result()
    if kind == "error":
        return responses.JSONResponse(data, status_code=500)
    return responses.JSONResponse({"images": images, **data})


def run_serve(cfg: ServeConfig) -> None:
    """The CLI's job: loads the run, then serves until interrupted."""
    *_, uvicorn = _framework()
    app = build_app(cfg)
    drawer = app.state.drawer
    print(
        f"serving {cfg.run} ({drawer.info()['image_size']} px, device {drawer.device}, reranker "
        f"{drawer.clip if drawer.scorer else 'none'}) at http://{cfg.host}:{cfg.port}/",
        file=sys.stderr,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    """`python -m dalle_fast.serve --run RUN [--host 127.0.0.1] [--port 8000] [--clip CLIP_RUN] ...`"""
    ap = build_parser(ServeConfig, "python -m dalle_fast.serve")
    cfg = parse_config(ap, ServeConfig, vars(ap.parse_args(argv)))
    run_or_exit(ap, ServeConfig, run_serve, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
