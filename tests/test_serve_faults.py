"""The server in process (uvicorn in a thread, real HTTP) on a broken model: a model whose logits are not finite
gives every client the non-finite-logits error, streaming or not, and never NaN in the JSON; and connections
that never finish their headers, or send too many, are closed or answered (serve/connection.py)."""

import json
import socket
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")

from neox_jax.api import NeoXModel  # noqa: E402
from neox_jax.checkpoints.synthetic import random_tensors  # noqa: E402
from neox_jax.serve import connection  # noqa: E402
from neox_jax.serve.app import create_app  # noqa: E402
from neox_jax.serve.engine import Engine  # noqa: E402
from neox_jax.tokenizer import demo_tokenizer  # noqa: E402
from neox_jax.weights import build_params  # noqa: E402

from conftest import tiny_config  # noqa: E402

POISONED = 7  # the token whose embedding is NaN: every position from it on has NaN logits


HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def url():
    connection.HEADER_TIMEOUT_SECONDS, default = HEADER_TIMEOUT, connection.HEADER_TIMEOUT_SECONDS
    config = tiny_config(vocab_size=384)
    tensors = random_tensors(config, seed=0)
    tensors["gpt_neox.embed_in.weight"][POISONED] = np.nan
    model = NeoXModel(config, build_params(config, tensors.items(), jnp.float32, progress=False),
                      tokenizer=demo_tokenizer(320))
    engine = Engine(model, max_batch=2, context=32, max_queue=4)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model.tokenizer, "broken", None), host="127.0.0.1",
                                           port=0, log_level="warning", lifespan="off",
                                           http=connection.Connection))
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
        assert thread.is_alive()
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    engine.stop(30)
    connection.HEADER_TIMEOUT_SECONDS = default


def events(reply) -> list[dict]:
    """Every server-sent event's JSON, parsed strictly (NaN and Infinity are not JSON)."""
    strict = dict(parse_constant=lambda name: pytest.fail(f"{name} in the stream"))
    return [json.loads(line[6:], **strict) for line in reply.iter_lines()
            if line.startswith(b"data: ") and line != b"data: [DONE]"]


@pytest.mark.parametrize("body, where", [
    ({"prompt": [1, 2, POISONED, 3], "echo": True, "logprobs": 2, "max_tokens": 0}, "scoring prompt token "),
    ({"prompt": [1, 2, POISONED, 3], "echo": True, "logprobs": 0, "max_tokens": 3}, "scoring prompt token "),
    ({"prompt": [1, POISONED], "logprobs": 1, "max_tokens": 3}, "at generated token 0, "),
    ({"prompt": [1, POISONED], "max_tokens": 3}, "at generated token 0, "),
])
@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_logits_are_one_error_streaming_or_not(url, body, where, stream):
    reply = requests.post(f"{url}/v1/completions", json=body | {"stream": stream}, stream=stream, timeout=60)
    if stream:
        assert reply.status_code == 200
        errors = [e["error"] for e in events(reply) if "error" in e]
    else:
        assert reply.status_code == 500 and reply.headers["content-type"] == "application/json"
        errors = [json.loads(reply.text, parse_constant=lambda name: pytest.fail(name))["error"]]
    [error] = errors
    assert error["type"] == "server_error"
    assert f"the model's logits are not finite (NaN or infinity) {where}" in error["message"]


def test_a_clean_request_beside_them_is_served(url):
    reply = requests.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "logprobs": 1},
                          timeout=60)
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["logprobs"]["token_logprobs"]) == 4


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"])
def test_a_connection_that_never_finishes_its_headers_is_closed(url, sent):
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=HEADER_TIMEOUT * 10) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < HEADER_TIMEOUT * 5


def test_a_slow_request_body_is_not_cut_by_the_header_deadline(url):
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(HEADER_TIMEOUT * 1.5)
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


def test_headers_beyond_the_limit_get_431_json(url):
    reply = requests.get(f"{url}/health", headers={"X-Big": "x" * 1_000_000}, timeout=30)
    assert reply.status_code == 431
    assert "headers are too large" in reply.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
