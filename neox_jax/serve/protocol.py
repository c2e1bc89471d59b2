"""OpenAI's completions API: request bodies checked field by field, responses and stream chunks built.

Every field OpenAI's `POST /v1/completions` defines is accepted; those this server cannot honour (`n`,
`best_of` above 1, penalties, `logit_bias`, `suffix`) are refused unless they hold their neutral value, and
any other field is refused: a misspelt parameter is an error, never silently ignored. `top_k` is an
extension (0 or -1: no limit). Errors are `APIError`s, rendered as OpenAI's error JSON.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from typing import Any

from .engine import MAX_LOGPROBS, TokenLogprobs

MAX_STOP_STRINGS = 4  # as OpenAI
# Each stop string's length; OpenAI documents none. Matching costs the same whatever the length
# (streaming.TextStream), so this only bounds the memory a request holds.
MAX_STOP_CHARS = 1000
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class APIError(Exception):
    """An error answered with OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    """`text` with what UTF-8 cannot hold (a lone surrogate, from a JSON escape such as "\\ud800") escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclasses.dataclass
class CompletionParams:
    prompts: list[str | list[int]]  # text, or token ids
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    model: str | None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(body, name, default, low, high=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad(name, f"must be an integer, got {_show(value)}")
    if value < low or (high is not None and value > high):
        raise bad(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return int(value)


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(name, f"must be a finite number, got {_show(value)}")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _flag(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {_show(value)}")
    return value


def _neutral(body, name, neutral, of_type) -> None:
    """Only the neutral value, and of its JSON type (`of_type(value)`): true is not 1, 1.0 is not the integer 1."""
    value = body.get(name)
    if value is not None and not (of_type(value) and value == neutral):
        raise bad(name, f"only {neutral!r} is supported by this server, got {_show(value)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
         "logprobs", "echo", "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "user", "suffix"}


def parse_completion(body: Any) -> CompletionParams:
    """A decoded JSON body -> CompletionParams, or APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(unknown[0], "unknown parameter")
    if "prompt" not in body:
        raise bad("prompt", "required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {_show(model)}")
    is_dict, is_str = (lambda x: isinstance(x, dict)), (lambda x: isinstance(x, str))  # noqa: E731
    for name, neutral, of_type in (("n", 1, _is_int), ("best_of", 1, _is_int), ("presence_penalty", 0, _is_number),
                                   ("frequency_penalty", 0, _is_number), ("logit_bias", {}, is_dict),
                                   ("suffix", "", is_str)):
        _neutral(body, name, neutral, of_type)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", f"must be a string, got {_show(body['user'])}")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", f"must be {{\"include_usage\": true|false}}, got {_show(options)}")
        include_usage = _flag(options, "include_usage")
    seed = _integer(body, "seed", None, 0, 2**64 - 1)
    return CompletionParams(
        prompts=_prompts(body["prompt"]),
        max_tokens=_integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(_integer(body, "top_k", 0, -1), 0),
        seed=secrets.randbits(63) if seed is None else seed,
        stop=_stop(body.get("stop")),
        stream=stream, include_usage=include_usage,
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS),
        echo=_flag(body, "echo"), model=model)


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", f"must be a string, a list of strings, a list of token ids or a list of such lists, "
                            f"got {_show(prompt)}")
    if all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    for i, p in enumerate(prompt):
        if not isinstance(p, list) or not p or not all(_is_int(t) for t in p):
            raise bad("prompt", f"item {i} must be a non-empty list of integer token ids (a list of prompts is all "
                                f"strings or all token-id lists), got {_show(p)}")
    return [list(p) for p in prompt]


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"must be a string or a list of strings, got {_show(stop)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise bad("stop", f"each stop string has at most {MAX_STOP_CHARS} characters, got one of {len(long)}")
    return [s for s in stops if s]


# ---- responses ----

def logprobs_json(tokenizer, tokens: list[int], scores: list[TokenLogprobs | None], offset: int = 0,
                  special_tokens: bool = False) -> dict:
    """OpenAI's completions `logprobs` object for `tokens` with their scores (None: the first prompt token,
    which nothing predicts). text_offset counts characters from `offset`. `special_tokens`: show their text
    (an echoed prompt's), else none (as in the completion's text)."""
    strings = [tokenizer.decode([t], skip_special_tokens=not special_tokens) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": strings,
            "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {tokenizer.decode([t]): lp for t, lp in s.top} for s in scores],
            "text_offset": offsets}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
