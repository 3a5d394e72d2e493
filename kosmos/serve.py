"""An OpenAI-compatible server for a trained checkpoint, with a web page to try it.

    kosmos-serve demo_out/run [--host 127.0.0.1 --port 8000]       # = python -m kosmos.serve ...

`/` is the page (kosmos/serve.html: pick or drop images, type a prompt, watch the answer stream);
`/v1/chat/completions` and `/v1/completions` take OpenAI's requests (the official `openai` client works as
is, `base_url="http://127.0.0.1:8000/v1"`); `/v1/models` names the one model, `/health` says how many rows
are decoding and waiting. Needs FastAPI and uvicorn: `pip install 'kosmos-pretrain[serve]'` (or
`-r requirements-serve.txt`); the library imports without them.

Requests. Images are `image_url` parts of a chat message (`data:image/...;base64,` URLs; local paths or
`file://` URLs only under the folder given by `--allow-local-images DIR`: the server fetches nothing from
the network). A chat's messages are one document: their parts in order, consecutive messages joined by a
newline, no role markers (a pretrained KOSMOS-1 has no chat template), so one user message is the same
prompt as `python -m kosmos.generate --prompt`. `/v1/completions` takes `prompt` (a string or a list) and,
as an extension, `images` (URLs) placed at the prompt's `{image}` markers (first without markers), as
`kosmos.generate --image` does. Decoding: `max_tokens` (capped at what the context leaves, finish_reason
"length"), `temperature` (0: greedy; OpenAI's default 1 samples), `top_p`, `stop`, `n`, `seed`, `stream`
(server-sent events in OpenAI's chunk shape, ending `data: [DONE]`), and the extensions `num_beams` (beam
search; a stream then gets the answer in one chunk), `top_k` and `length_penalty`.

Batching. Decoding runs in one worker thread. It waits `--batch-wait-ms` after a request arrives, then runs
one `kosmos.generate` call (one forward per step, with the KV cache) over the waiting requests that decode
alike (same sampling settings, stop strings and seed; up to `--max-batch` rows, the `n` choices of a
request being rows too). Each row keeps its own token budget (`on_token` ends it), streams as it decodes
and is answered as soon as it ends (its eos, a stop string or its budget), not when the batch does; a
client that leaves mid-stream ends its row at the next step, and a request still waiting is dropped.
Prompts of different lengths are left-padded into one batch (`decoder.attention=sdpa`, the default); with
`decoder.attention=torchscale` generate batches each prompt length alone, one after another.

Errors are 4xx JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: not an image
(`invalid_image`), an image over `--max-image-mb` (413, `image_too_large`), more than `--max-images`
(`too_many_images`), a prompt that fills the context (`context_length_exceeded`), a parameter this server
does not know (`unknown_parameter`), a setting out of range (`invalid_value`). The server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kosmos.errors import KosmosError
from kosmos.generate import GenerationConfig, Prompt, SettingError, cut_at_stop, generate
from kosmos.sequence import SequenceEncoder
from kosmos.untrusted import ImageError, image_errors, open_image

INSTALL = "pip install 'kosmos-pretrain[serve]' (or: pip install -r requirements-serve.txt)"
PAGE = "serve.html"
"""The web page, package data of kosmos (one file: inline CSS and JS, nothing fetched from the network)."""

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
          "user", "num_beams", "top_k", "length_penalty"}
PARAMETERS = {"chat": COMMON | {"messages", "max_completion_tokens"},
              "completions": COMMON | {"prompt", "images"}}
"""The request fields each endpoint reads; any other is refused (`unknown_parameter`), not ignored."""
SETTING_PARAM = {"max_new_tokens": "max_tokens", "num_beams": "num_beams", "temperature": "temperature",
                 "top_p": "top_p", "top_k": "top_k", "length_penalty": "length_penalty"}


class RequestError(KosmosError):
    """A request the server refuses: answered as OpenAI's error JSON with `status`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for, and how requests are batched (the command's options)."""

    max_images: int = 8
    max_image_bytes: int = 10 * 2**20
    max_n: int = 8
    max_batch: int = 16
    """Rows (prompts x n) in one batched generate."""
    batch_wait_ms: float = 5.0
    """How long the worker waits after a request arrives for others to batch with it."""
    local_images: Path | None = None
    """Image paths (and file:// URLs) are read only under this folder; None: not at all."""


# ----------------------------------------------------------------------------- requests


def _check_type(body: dict, name: str, types, what: str) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise RequestError(f"{name} must be {what}, got {value!r}", name, "invalid_type")
    return value


def read_image(url: Any, enc: SequenceEncoder, limits: Limits, param: str) -> torch.Tensor:
    """An `image_url` (a data URL, or a local path under `limits.local_images`) -> uint8 (3, S, S) pixels."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param} must be a URL string", param, "invalid_image_url")
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        mime = header.split(";")[0]
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{param}: a data URL must be base64 (data:image/png;base64,...)", param,
                               "invalid_image_url")
        if mime and not mime.startswith("image/"):
            raise RequestError(f"{param}: not an image (the data URL holds {mime})", param, "invalid_image")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(f"{param}: the image is over the server's limit of {limits.max_image_bytes} "
                               "bytes (--max-image-mb)", param, "image_too_large", 413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{param}: the data URL is not valid base64", param, "invalid_image") from None
    elif "://" in url and not url.startswith("file://"):
        raise RequestError(f"{param}: only data: URLs are read (and local paths with --allow-local-images): "
                           "the server fetches nothing from the network", param, "invalid_image_url")
    else:
        if limits.local_images is None:
            raise RequestError(f"{param}: local image paths are off; send a data URL, or start the server "
                               "with --allow-local-images DIR", param, "invalid_image_url")
        path = Path(url.removeprefix("file://")).expanduser()
        path = (limits.local_images / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(limits.local_images):
            raise RequestError(f"{param}: {url} is outside the folder of --allow-local-images "
                               f"({limits.local_images})", param, "invalid_image_url")
        if path.is_file() and path.stat().st_size > limits.max_image_bytes:
            raise RequestError(f"{param}: {url} is over the server's limit of {limits.max_image_bytes} bytes "
                               "(--max-image-mb)", param, "image_too_large", 413)
        data = path
    try:
        with open_image(data) as im, image_errors():
            return enc.image(im)
    except ImageError as e:
        bomb = e.reason == "decompression_bomb"
        code, status = ("image_too_large", 413) if bomb else ("invalid_image", 400)
        raise RequestError(f"{param}: not an image the server can read ({e})", param, code, status) from None


def _count_images(n: int, limits: Limits, param: str) -> None:
    if n > limits.max_images:
        raise RequestError(f"{n} images in one request: the server takes at most {limits.max_images} "
                           "(--max-images)", param, "too_many_images")


def chat_segments(messages: Any, enc: SequenceEncoder, limits: Limits) -> list:
    """A chat's messages -> one document's segments (text and uint8 images): their parts in order,
    consecutive messages joined by a newline, no role markers."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages", "invalid_type")
    parts: list[tuple[str, Any, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"{where} must be an object with a role (system, user or assistant)", where,
                               "invalid_type")
        content = m.get("content")
        if i:
            parts.append(("text", "\n", where))
        if isinstance(content, str):
            parts.append(("text", content, f"{where}.content"))
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", f"{where}.content",
                               "invalid_type")
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"], pw))
            elif kind == "image_url":
                parts.append(("image", part.get("image_url"), f"{pw}.image_url"))
            else:
                raise RequestError(f"{pw}: a part is {{'type': 'text', 'text': ...}} or "
                                   "{'type': 'image_url', 'image_url': {'url': ...}}", pw, "invalid_type")
    _count_images(sum(kind == "image" for kind, _, _ in parts), limits, "messages")
    segments: list = []
    for kind, value, where in parts:
        if kind == "image":
            segments.append(read_image(value, enc, limits, where))
        elif segments and isinstance(segments[-1], str):
            segments[-1] += value  # one text segment, tokenised whole
        elif value:
            segments.append(value)
    return segments


@dataclass
class Job:
    """One request for the worker: its prompts (n rows each), decoding settings, and where events go."""

    prompts: list[Prompt]
    gen: GenerationConfig
    budget: list[int]
    """Each row's own max_new_tokens (what the context leaves after its prompt, at most max_tokens)."""
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys decode alike and may share a batch."""
        g = self.gen
        return (g.do_sample, g.temperature, g.top_p, g.top_k, g.num_beams, g.length_penalty, tuple(g.stop),
                self.seed, max(self.budget) if g.num_beams > 1 else None)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def decoding(body: dict, enc: SequenceEncoder, prompts: list[Prompt], max_len: int, default_max: int | None,
             limits: Limits, prompt_param: str = "messages"
             ) -> tuple[GenerationConfig, list[int], int | None]:
    """The request's GenerationConfig, each prompt's token budget, and its seed; a prompt that fills the
    context is `context_length_exceeded`."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    _check_type({"max_tokens": max_tokens}, "max_tokens", (int,), "a whole number")
    temperature = _check_type(body, "temperature", (int, float), "a number")
    top_p = _check_type(body, "top_p", (int, float), "a number")
    n = _check_type(body, "n", (int,), "a whole number")
    seed = _check_type(body, "seed", (int,), "a whole number")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a string or a list of at most 4 non-empty strings", "stop",
                           "invalid_value")
    if n is not None and not 1 <= n <= limits.max_n:
        raise RequestError(f"n must be in [1, {limits.max_n}], got {n}", "n", "invalid_value")
    for p in prompts:
        if len(p.ids) >= max_len:
            raise RequestError(f"the prompt is {len(p.ids)} tokens (each image takes {enc.span}): it fills "
                               f"the model's context of {max_len} tokens, no room to generate", prompt_param,
                               "context_length_exceeded")
    temperature = 1.0 if temperature is None else temperature
    settings = dict(max_new_tokens=max_tokens if max_tokens is not None else default_max or max_len,
                    do_sample=temperature > 0 if isinstance(temperature, int | float) else True,
                    temperature=temperature, top_p=1.0 if top_p is None else top_p,
                    top_k=body.get("top_k", 0), num_beams=body.get("num_beams", 1),
                    length_penalty=body.get("length_penalty", 1.0))
    try:
        gen = GenerationConfig.for_tokenizer(enc.tokenizer, stop=stop, **settings)
    except SettingError as e:
        raise RequestError(f"{SETTING_PARAM[e.field]} must be {e.problem}, got {e.value!r}",
                           SETTING_PARAM[e.field], "invalid_value") from None
    budget = [min(gen.max_new_tokens, max_len - len(p.ids)) for p in prompts]
    return gen, budget, seed


def unknown_parameters(body: Any, endpoint: str) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - PARAMETERS[endpoint])
    if unknown:
        raise RequestError(f"unknown parameter: {unknown[0]!r} (this server reads "
                           f"{', '.join(sorted(PARAMETERS[endpoint]))})", unknown[0], "unknown_parameter")


# ----------------------------------------------------------------------------- the batching worker


class Engine:
    """The worker thread that batches waiting jobs into `kosmos.generate` calls."""

    def __init__(self, model, enc: SequenceEncoder, limits: Limits):
        self.model, self.enc, self.limits = model, enc, limits
        self.max_len = model.cfg.decoder.max_len
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.active = 0
        self.batches = 0
        self.rows = 0
        self.largest = 0
        self.tokens = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="kosmos-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.cond:
            self.pending.append(job)
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            queued = sum(len(j.prompts) for j in self.pending if not j.cancelled.is_set())
        return {"active": self.active, "queued": queued, "batches": self.batches, "rows": self.rows,
                "largest_batch": self.largest, "tokens": self.tokens}

    def _take(self) -> list[Job]:
        """The first waiting job and those after it that can share its batch (under the lock)."""
        self.pending = deque(j for j in self.pending if not j.cancelled.is_set())
        if not self.pending:
            return []
        first = self.pending.popleft()
        batch, rows = [first], len(first.prompts)
        longest, budget = max(len(p.ids) for p in first.prompts), max(first.budget)
        for job in list(self.pending):
            jl, jb = max(len(p.ids) for p in job.prompts), max(job.budget)
            if (job.key == first.key and rows + len(job.prompts) <= self.limits.max_batch
                    and max(longest, jl) + max(budget, jb) <= self.max_len):  # no row's budget is cut
                batch.append(job)
                rows, longest, budget = rows + len(job.prompts), max(longest, jl), max(budget, jb)
                self.pending.remove(job)
        return batch

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
            time.sleep(self.limits.batch_wait_ms / 1000)  # let the requests arriving together come in
            with self.cond:
                batch = self._take()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        owners = [(job, c) for job in batch for c in range(len(job.prompts))]
        prompts = [p for job in batch for p in job.prompts]
        budget = [b for job in batch for b in job.budget]
        ids: list[list[int]] = [[] for _ in owners]
        ended = [False] * len(owners)
        gen = dataclasses.replace(batch[0].gen, max_new_tokens=max(budget))
        seed = batch[0].seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        def end(row: int) -> None:  # the row's answer is complete: its client need not wait for the batch
            job, c = owners[row]
            ended[row] = True
            job.emit("done", c, list(ids[row]))

        def on_token(row: int, token: int | None) -> bool:
            job, c = owners[row]
            if token is None:  # its eos or a stop string
                end(row)
                return True
            if job.cancelled.is_set():
                ended[row] = True
                return False
            ids[row].append(token)
            self.tokens += 1
            job.emit("token", c, token)
            if len(ids[row]) >= budget[row]:
                end(row)
                return False
            return True

        self.active, self.batches = len(prompts), self.batches + 1
        self.rows, self.largest = self.rows + len(prompts), max(self.largest, len(prompts))
        try:
            outs = generate(self.model, prompts, gen, generator, on_token)
        except Exception as e:  # noqa: BLE001 - a failed batch answers its requests; the server goes on
            for job in batch:
                job.emit("error", f"{type(e).__name__}: {e}")
            return
        finally:
            self.active = 0
        for row, out in enumerate(outs):
            if not ended[row]:  # beam search, and rows that ran to the batch's end
                job, c = owners[row]
                job.emit("done", c, out[: budget[row]])


# ----------------------------------------------------------------------------- responses


class Choice:
    """One choice's text as it streams: the decoded ids, cut at a stop string, less what may still turn out
    to be the start of one (or a character whose bytes are not all there yet)."""

    def __init__(self, tokenizer, stop: list[str], budget: int):
        self.tokenizer, self.stop, self.budget = tokenizer, stop, budget
        self.ids: list[int] = []
        self.sent = 0
        self.finish: str | None = None

    def text(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.ids), self.stop)

    def delta(self) -> str:
        """The text not sent yet that can be sent now (everything once `finish` is set)."""
        text = self.text()
        if self.finish is None:
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold].rstrip("\ufffd")
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new

    def done(self, ids: list[int]) -> None:
        self.ids = ids
        hit = bool(self.stop) and any(s in self.tokenizer.decode(ids) for s in self.stop)
        self.finish = "length" if len(ids) >= self.budget and not hit else "stop"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model, enc: SequenceEncoder, name: str = "kosmos", limits: Limits | None = None):
    """The FastAPI app serving `model` (eval mode) as `name`; its lifespan starts and stops the worker."""
    import contextlib
    from importlib import resources

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    engine = Engine(model, enc, limits)
    created = int(time.time())
    page = resources.files("kosmos").joinpath(PAGE).read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kosmos-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(RequestError(str(e.detail), None, None, e.status_code, kind).body(),
                            status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page.replace("{{MODEL}}", name))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **engine.stats()}

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "kosmos",
                "context_length": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str):
        if model_id != name:
            raise RequestError(f"the model {model_id!r} does not exist: this server serves {name!r}", "model",
                               "model_not_found", 404)
        return model_card()

    async def read_body(request: Request, endpoint: str) -> dict:
        size = int(request.headers.get("content-length") or 0)
        cap = limits.max_images * limits.max_image_bytes * 4 // 3 + 2**20
        if size > cap:
            raise RequestError(f"the request is {size} bytes, over the server's limit of {cap} "
                               "(--max-images x --max-image-mb)", None, "request_too_large", 413)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not JSON ({e})", None, "invalid_json") from None
        unknown_parameters(body, endpoint)
        if body.get("model") not in (None, name):
            raise RequestError(f"the model {body['model']!r} does not exist: this server serves {name!r}",
                               "model", "model_not_found", 404)
        _check_type(body, "stream", (bool,), "true or false")
        return body

    def chat_job(body: dict, loop) -> Job:
        segments = chat_segments(body.get("messages"), enc, limits)
        seq = enc.encode(segments, bos=True, eos=False)
        images = [s for s in segments if not isinstance(s, str)]
        prompt = Prompt(ids=seq.ids, image_mask=seq.image_mask,
                        images=torch.stack(images) if images else None)
        return make_job(body, [prompt], None, loop)

    def completion_job(body: dict, loop) -> Job:
        texts = body.get("prompt")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("prompt must be a string or a non-empty list of strings", "prompt",
                               "invalid_type")
        urls = body.get("images") or []
        if not isinstance(urls, list):
            raise RequestError("images must be a list of image URLs", "images", "invalid_type")
        _count_images(len(urls), limits, "images")
        images = [read_image(u, enc, limits, f"images[{i}]") for i, u in enumerate(urls)]
        prompts = []
        for t in texts:
            try:
                seq = enc.prompt(t, images)
            except ValueError as e:
                raise RequestError(str(e), "prompt", "invalid_value") from None
            prompts.append(Prompt(ids=seq.ids, image_mask=seq.image_mask,
                                  images=torch.stack(images) if images else None))
        return make_job(body, prompts, 16, loop)

    def make_job(body: dict, prompts: list[Prompt], default_max: int | None, loop) -> Job:
        param = "messages" if default_max is None else "prompt"
        gen, budget, seed = decoding(body, enc, prompts, engine.max_len, default_max, limits, param)
        n = body.get("n") or 1
        rows = [p for p in prompts for _ in range(n)]
        if len(rows) > limits.max_batch:
            raise RequestError(f"{len(prompts)} prompt(s) x n={n} make {len(rows)} rows: the server decodes "
                               f"at most {limits.max_batch} together (--max-batch)", "n", "invalid_value")
        return Job(rows, gen, [b for b in budget for _ in range(n)], seed, loop, asyncio.Queue())

    async def answer(request: Request, endpoint: str):
        body = await read_body(request, endpoint)
        loop = asyncio.get_running_loop()
        build = chat_job if endpoint == "chat" else completion_job
        job = await asyncio.to_thread(build, body, loop)  # image decoding off the event loop
        chat = endpoint == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        choices = [Choice(enc.tokenizer, job.gen.stop, b) for b in job.budget]
        prompt_tokens = sum(len(p.ids) for p in job.prompts[:: body.get("n") or 1])
        engine.submit(job)

        def usage() -> dict:
            done = sum(len(c.ids) for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                    "total_tokens": prompt_tokens + done}

        async def events():
            """(choice index, new text, finish reason or None) as the worker sends tokens."""
            left = len(choices)
            while left:
                kind, *rest = await job.events.get()
                if kind == "error":
                    raise RuntimeError(rest[0])
                c, value = rest
                if kind == "token":
                    choices[c].ids.append(value)
                    text = choices[c].delta()
                    if text:
                        yield c, text, None
                else:
                    choices[c].done(value)
                    left -= 1
                    yield c, choices[c].delta(), choices[c].finish

        def chunk(c: int, text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text else {})
                choice = {"index": c, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": c, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj + (".chunk" if chat else ""), "created": int(time.time()),
                    "model": name, "choices": [choice]}

        if body.get("stream"):
            async def stream():
                try:
                    if chat:
                        for c in range(len(choices)):
                            yield _sse(chunk(c, None, None, first=True))
                    async for c, text, finish in events():
                        if text:
                            yield _sse(chunk(c, text, None))
                        if finish:
                            yield _sse(chunk(c, None, finish))
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield _sse({**chunk(0, None, None), "choices": [], "usage": usage()})
                    yield _sse("[DONE]")
                except RuntimeError as e:
                    yield _sse(RequestError(str(e), None, "server_error", 500, "server_error").body())
                    yield _sse("[DONE]")
                finally:
                    job.cancelled.set()  # the client left (or all is sent): its rows end at the next step

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in events():
                pass
        except RuntimeError as e:
            raise RequestError(str(e), None, "server_error", 500, "server_error") from None
        finally:
            job.cancelled.set()
        out = []
        for i, c in enumerate(choices):
            body_ = ({"message": {"role": "assistant", "content": c.text()}} if chat else {"text": c.text()})
            out.append({"index": i, **body_, "logprobs": None, "finish_reason": c.finish})
        return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": out,
                "usage": usage()}

    async def respond(request: Request, endpoint: str):
        out = await answer(request, endpoint)
        return out if isinstance(out, StreamingResponse) else JSONResponse(out)

    # Starlette routes: the handler gets the Request as it is (FastAPI would read a parameter annotated with
    # a name it cannot resolve, this module's annotations being strings, as a query field).
    async def chat_completions(request):
        return await respond(request, "chat")

    async def completions(request):
        return await respond(request, "completions")

    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    return app


# ----------------------------------------------------------------------------- running


def listen(host: str, port: int):
    """(a socket bound to host:port, its URL): port 0 takes a free port, and the URL names the real one."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KosmosError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                          "pick another --port (0: any free one)") from None
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


class Background:
    """A server running `app` in a thread on `host` (port 0: a free one), for tests, benchmarks and
    notebooks: `with Background(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock, self.url = listen(host, port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def require_server_packages() -> None:
    """FastAPI and uvicorn, or one line that says what to install."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        missing = e.name or "a package"
        raise KosmosError(f"kosmos-serve needs FastAPI and uvicorn ({missing} is missing): "
                          f"{INSTALL}") from None


def main(argv: list[str] | None = None) -> int:
    from kosmos.errors import command_name
    from kosmos.generate import load_for_inference

    ap = argparse.ArgumentParser(prog=command_name("kosmos.serve"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory, or a run's output dir (its newest checkpoint)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL printed names it)")
    ap.add_argument("--model-name", help="the model's id in the API (default: the run's folder name)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-batch", type=int, default=16, help="rows decoded together in one batch")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long to wait for requests to batch with one that arrived")
    ap.add_argument("--max-images", type=int, default=8, help="images in one request")
    ap.add_argument("--max-image-mb", type=float, default=10.0, help="bytes of one image, in MiB")
    ap.add_argument("--allow-local-images", metavar="DIR",
                    help="also read images given as paths (or file:// URLs) under DIR")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    require_server_packages()
    import uvicorn

    local = Path(args.allow_local_images).resolve() if args.allow_local_images else None
    if local is not None and not local.is_dir():
        raise KosmosError(f"--allow-local-images {args.allow_local_images}: not a folder")
    limits = Limits(max_images=args.max_images, max_image_bytes=int(args.max_image_mb * 2**20),
                    max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, local_images=local)
    model, enc = load_for_inference(args.checkpoint, overrides=args.overrides, device=args.device)
    path = Path(args.checkpoint).resolve()
    name = args.model_name or (path.parent.parent.name if path.parent.name == "checkpoints" else path.name)
    app = create_app(model, enc, name, limits)
    sock, url = listen(args.host, args.port)
    print(f"serving {name}: the page at {url}/, the OpenAI API at {url}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    from kosmos.errors import run_cli

    raise SystemExit(run_cli(main))
