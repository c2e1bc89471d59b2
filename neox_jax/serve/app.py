"""The HTTP layer: a Starlette app in front of one `Engine`, OpenAI's completions API, metrics and a page.

Handlers run on the event loop and never wait on the model: each prompt becomes an engine `Request` whose
`Choice` sink is called on the engine's thread and forwards every event to the loop
(`call_soon_threadsafe`). Text is built there too (`streaming.TextStream`: whole characters, stop strings
cut exactly), so a completed stop string frees the slot at the step it appears. A client that disconnects,
streaming or not, cancels its requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..decode import GenerationError
from ..sampling import Sampling, SamplingError
from ..streaming import TextStream
from .engine import Engine, EngineStopped, QueueFull, Request, TokenLogprobs
from .protocol import APIError, CompletionParams, logprobs_json, parse_completion, usage_json

logger = logging.getLogger("neox_jax.serve")

MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_SECONDS = 1


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("neox_requests", "Completion requests answered, by HTTP status", ["status"],
                                registry=registry)
        self.finished = Counter("neox_completions_finished", "Completions ended, by reason", ["reason"],
                                registry=registry)
        self.prompt_tokens = Counter("neox_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generated_tokens = Counter("neox_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("neox_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.step = Histogram("neox_decode_step_seconds", "One decode step of every slot, its tokens handed out",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=registry)
        Gauge("neox_queue_depth", "Requests waiting for a decode slot", registry=registry
              ).set_function(lambda: engine.queue_depth)
        Gauge("neox_batch_occupancy", "Decode slots in use", registry=registry).set_function(lambda: engine.occupied)
        Gauge("neox_batch_slots", "Decode slots in all", registry=registry).set_function(lambda: engine.batch)
        pool = engine.prefix_cache
        for name, doc, value in (
                ("hits", "Prompt blocks copied from the prefix cache instead of prefilled", lambda: pool.hits),
                ("misses", "Prompt blocks looked up in the prefix cache and not found", lambda: pool.misses),
                ("evictions", "Blocks evicted from the prefix cache to stay within its budget", lambda: pool.evictions),
                ("bytes", "Bytes of keys and values the prefix cache holds", lambda: pool.bytes_held)):
            Gauge(f"neox_prefix_cache_{name}", doc, registry=registry).set_function(value if pool is not None else lambda: 0)
        if engine.draft is not None:
            self._speculation(engine.k)

    def _speculation(self, k: int) -> None:
        """Speculative decoding's counters, and the two ratios since the server started."""
        registry, totals = self.registry, {"passes": 0, "accepted": 0, "tokens": 0}
        passes = Counter("neox_target_passes", "Target passes of speculative decoding, once per request each serves",
                         registry=registry)
        proposed = Counter("neox_draft_tokens_proposed", f"Draft tokens proposed ({k} per request per pass)",
                           registry=registry)
        accepted = Counter("neox_draft_tokens_accepted", "Draft tokens the target kept", registry=registry)
        tokens = Counter("neox_speculative_tokens", "Tokens the target passes handed out", registry=registry)
        Gauge("neox_draft_acceptance_rate", "Draft tokens accepted / proposed since the start", registry=registry
              ).set_function(lambda: totals["accepted"] / (k * totals["passes"]) if totals["passes"] else 0)
        Gauge("neox_target_passes_per_token", "Target passes per token handed out since the start (plain decoding: 1)",
              registry=registry).set_function(lambda: totals["passes"] / totals["tokens"] if totals["tokens"] else 0)

        def on_pass(rows: int, kept: int, handed_out: int) -> None:
            totals["passes"] += rows
            totals["accepted"] += kept
            totals["tokens"] += handed_out
            passes.inc(rows)
            proposed.inc(k * rows)
            accepted.inc(kept)
            tokens.inc(handed_out)

        self.on_pass = on_pass


class Choice:
    """One prompt's completion: the engine's sink, and what the handler reads back on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer, index: int, stop: list[str], metrics: Metrics):
        self.loop, self.tokenizer, self.index, self.metrics = loop, tokenizer, index, metrics
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(tokenizer, stop)
        self.token_logprobs: list[TokenLogprobs | None] = []
        self.prompt_scores: list[TokenLogprobs | None] | None = None

    def _send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    # Sink, on the engine's thread:
    def prompt_logprobs(self, scores):
        self.prompt_scores = scores
        self._send("prompt")

    def token(self, token: int, logprobs: TokenLogprobs | None) -> bool:
        self.metrics.generated_tokens.inc()
        self.token_logprobs.append(logprobs)
        self._send("text", self.text.push([token]), len(self.token_logprobs))
        return not self.text.finished

    def finish(self, reason: str, error: str | None = None) -> None:
        self.metrics.finished.labels(reason).inc()
        self._send("finish", self.text.push([], final=True), reason, error)

    # On the event loop:
    @property
    def tokens(self) -> list[int]:
        return self.text.tokens  # cut after the token that completed a stop string


def create_app(engine: Engine, tokenizer, model_name: str, stop_token: int | None) -> Starlette:
    """The app; `stop_token` ends every completion (the tokenizer's <|endoftext|>; None: never)."""
    metrics = Metrics(engine)
    engine.on_first_token, engine.on_step = metrics.ttft.observe, metrics.step.observe
    engine.on_pass = getattr(metrics, "on_pass", None)
    state = {"created": int(time.time()), "draining": False}
    page_html = resources.files(__package__).joinpath("static/index.html").read_text()
    # No token is longer than this, so a longer text cannot fit in the context: refused before it is tokenized.
    max_chars = engine.context * max(len(tokenizer.decode([i], skip_special_tokens=False))
                                     for i in range(tokenizer.vocab_size))

    async def index(request):
        return HTMLResponse(page_html)

    async def health(request):
        if state["draining"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name, "slots": engine.batch, "busy": engine.occupied,
                             "queued": engine.queue_depth})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": state["created"], "owned_by": "neox-jax",
             "max_model_len": engine.context}]})

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(request: HTTPRequest):
        try:
            response = await _completions(request)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug: this request fails, the server goes on
            logger.exception("a completions request failed")
            response = JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                                    status_code=500)
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _completions(request: HTTPRequest):
        params = parse_completion(await _json_body(request))
        if params.model is not None and params.model != model_name:
            raise APIError(404, f"model {params.model!r} does not exist: this server has {model_name!r}", "model",
                           "model_not_found")
        if len(params.prompts) > engine.max_queue:
            raise APIError(400, f"prompt: {len(params.prompts)} prompts in one request; at most {engine.max_queue} "
                                f"(--max-queue)", "prompt")
        prompt_ids = [await _encode(tokenizer, p, max_chars, engine.context) for p in params.prompts]
        loop = asyncio.get_running_loop()
        choices = [Choice(loop, tokenizer, i, params.stop, metrics) for i in range(len(prompt_ids))]
        try:
            sampling = Sampling.create(params.temperature, params.top_k, params.top_p, params.seed)
        except SamplingError as e:
            raise APIError(400, str(e)) from None
        requests = [Request(ids, params.max_tokens, choice, sampling=sampling, stop_token=stop_token,
                            logprobs=params.logprobs, prompt_logprobs=params.echo and params.logprobs is not None)
                    for ids, choice in zip(prompt_ids, choices)]
        try:
            engine.submit(requests)
        except GenerationError as e:
            raise APIError(400, str(e), "prompt") from None
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry after {RETRY_AFTER_SECONDS}s", type="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error") from None
        metrics.prompt_tokens.inc(sum(map(len, prompt_ids)))
        reply = Reply(request, params, prompt_ids, choices, tokenizer, model_name)
        if params.stream:
            return StreamingResponse(reply.stream(requests), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.whole(requests))

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models), Route("/metrics", prometheus),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.serve = state
    return app


async def _not_found(request, exc):
    return JSONResponse(APIError(404, f"no such endpoint: {request.url.path}", code="not_found").body(), 404)


async def _not_allowed(request, exc):
    return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)


async def _json_body(request: HTTPRequest):
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON; nesting deep enough to exhaust the stack
        raise APIError(400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None


async def _encode(tokenizer, prompt, max_chars: int, context: int) -> list[int]:
    """Token ids of a text prompt, encoded off the event loop (a long text takes a while)."""
    if not isinstance(prompt, str):
        return prompt
    if len(prompt) > max_chars:
        raise APIError(400, f"prompt: {len(prompt)} characters cannot fit in the context of {context} tokens",
                       "prompt")
    try:
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    except ValueError as e:  # text that is not valid Unicode (a lone surrogate escaped in the JSON)
        raise APIError(400, f"prompt: {e}", "prompt") from None
    if not ids:
        raise APIError(400, "prompt: the prompt is empty (it encodes to no tokens)", "prompt")
    return ids


class Reply:
    """The response to one completions request, whole or as server-sent events."""

    def __init__(self, request: HTTPRequest, params: CompletionParams, prompt_ids, choices: list[Choice], tokenizer,
                 model_name: str):
        self.http, self.params, self.prompt_ids, self.choices = request, params, prompt_ids, choices
        self.tokenizer, self.model_name = tokenizer, model_name
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _usage(self) -> dict:
        return usage_json(sum(map(len, self.prompt_ids)), sum(len(c.tokens) for c in self.choices))

    async def _watch_disconnect(self, requests: list[Request]) -> None:
        """Cancel the requests when the client goes away (receive() returns http.disconnect)."""
        while (await self.http.receive())["type"] != "http.disconnect":
            pass
        for r in requests:
            r.cancel()

    def _prompt_part(self, choice: Choice) -> tuple[str, dict | None]:
        """With echo: the prompt's text, and its tokens' log-probabilities when asked for."""
        if not self.params.echo:
            return "", None
        ids = self.prompt_ids[choice.index]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)  # the prompt as given, <|endoftext|> and all
        if choice.prompt_scores is None:
            return text, None
        return text, logprobs_json(self.tokenizer, ids, choice.prompt_scores, special_tokens=True)

    async def whole(self, requests: list[Request]) -> dict:
        watcher = asyncio.ensure_future(self._watch_disconnect(requests))
        try:
            out = []
            for choice in self.choices:
                while (event := await choice.events.get())[0] != "finish":
                    pass
                _, _, reason, error = event
                if error is not None:
                    raise APIError(500, f"the model failed: {error}", type="server_error")
                prompt_text, prompt_lp = self._prompt_part(choice)
                logprobs = None
                if self.params.logprobs is not None:
                    n = len(choice.tokens)
                    generated = logprobs_json(self.tokenizer, choice.tokens, choice.token_logprobs[:n],
                                              offset=len(prompt_text))
                    logprobs = _join_logprobs(prompt_lp, generated)
                out.append({"text": prompt_text + choice.text.text, "index": choice.index, "logprobs": logprobs,
                            "finish_reason": _finish_reason(reason)})
            return self._envelope(out, self._usage())
        finally:
            watcher.cancel()
            for r in requests:
                r.cancel()  # no-op for finished ones; frees the rest if this handler was cancelled

    async def stream(self, requests: list[Request]):
        watcher = asyncio.ensure_future(self._watch_disconnect(requests))
        try:
            for choice in self.choices:
                early = None  # with echo and logprobs, the prompt's scores come first (unless the request failed)
                if self.params.echo and self.params.logprobs is not None:
                    early = await choice.events.get()
                    early = None if early[0] == "prompt" else early
                prompt_text, prompt_lp = self._prompt_part(choice)
                sent_logprobs = 0
                if self.params.echo:
                    yield _sse(self._envelope([{"text": prompt_text, "index": choice.index, "logprobs": prompt_lp,
                                                "finish_reason": None}]))
                offset = len(prompt_text)
                while True:
                    event, early = early or await choice.events.get(), None
                    finished = event[0] == "finish"
                    if finished and event[3] is not None:
                        yield _sse(APIError(500, f"the model failed: {event[3]}", type="server_error").body())
                        break
                    logprobs = None
                    upto = len(choice.tokens) if finished else event[2]
                    if self.params.logprobs is not None and upto > sent_logprobs:
                        new = choice.tokens[sent_logprobs:upto]
                        logprobs = logprobs_json(self.tokenizer, new, choice.token_logprobs[sent_logprobs:upto],
                                                 offset)
                        offset += sum(len(t) for t in logprobs["tokens"])
                        sent_logprobs = upto
                    # One chunk per token (its text may be empty while a character is incomplete), then the last.
                    yield _sse(self._envelope([{"text": event[1], "index": choice.index, "logprobs": logprobs,
                                                "finish_reason": _finish_reason(event[2]) if finished else None}]))
                    if finished:
                        break
            if self.params.include_usage:
                yield _sse(self._envelope([], self._usage()))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            for r in requests:
                r.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}
