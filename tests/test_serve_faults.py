"""The server on a broken model, in process (uvicorn in a thread, real HTTP): a model whose logits are not finite
gives every client the non-finite-logits error, streaming or not, and never NaN in the JSON."""

import json
import threading

import jax.numpy as jnp
import numpy as np
import pytest

requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")

from neox_jax.api import NeoXModel  # noqa: E402
from neox_jax.checkpoints.synthetic import random_tensors  # noqa: E402
from neox_jax.serve.app import create_app  # noqa: E402
from neox_jax.serve.engine import Engine  # noqa: E402
from neox_jax.tokenizer import demo_tokenizer  # noqa: E402
from neox_jax.weights import build_params  # noqa: E402

from conftest import tiny_config  # noqa: E402

POISONED = 7  # the token whose embedding is NaN: every position from it on has NaN logits


@pytest.fixture(scope="module")
def url():
    config = tiny_config(vocab_size=384)
    tensors = random_tensors(config, seed=0)
    tensors["gpt_neox.embed_in.weight"][POISONED] = np.nan
    model = NeoXModel(config, build_params(config, tensors.items(), jnp.float32, progress=False),
                      tokenizer=demo_tokenizer(320))
    engine = Engine(model, max_batch=2, context=32, max_queue=4)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model.tokenizer, "broken", None), host="127.0.0.1",
                                           port=0, log_level="warning", lifespan="off"))
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
