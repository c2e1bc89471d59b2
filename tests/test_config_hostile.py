"""Hostile config values: any JSON value under any key that config.json or a GPT-NeoX YAML is read for gives
either a NeoXConfig with fields of exactly the declared types, or a one-line ConfigError naming the key;
never another exception, in-process or through the generate CLI."""

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from neox_jax.checkpoints.neox_yaml import config_from_neox_args, read_neox_yaml
from neox_jax.checkpoints.synthetic import write_hf_checkpoint
from neox_jax.config import ConfigError, NeoXConfig
from neox_jax.tokenizer import demo_tokenizer

from conftest import REPO, tiny_config

# Every config.json key NeoXConfig.from_hf_dict reads.
HF_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "rotary_pct", "rotary_emb_base", "partial_rotary_factor", "rope_theta", "rope_parameters", "rope_scaling",
           "layer_norm_eps", "hidden_act", "use_parallel_residual", "max_position_embeddings", "tie_word_embeddings"]

# Every GPT-NeoX YAML key config_from_neox_args reads, each with a valid value.
NEOX_ARGS = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "num-kv-heads": 4, "intermediate-size": 256,
             "max-position-embeddings": 256, "seq-length": 256, "model-parallel-size": 1, "rotary-pct": 0.25,
             "rotary-emb-base": 10000, "layernorm-epsilon": 1e-5, "pos-emb": "rotary", "norm": "layernorm",
             "mlp-type": "regular", "activation": "gelu", "gpt-j-residual": False, "gpt-j-tied": False,
             "bias-gelu-fusion": False, "openai-gelu": False, "no-weight-tying": False, "use-bias-in-norms": True,
             "use-bias-in-attn-linear": True}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=6)
# Values at the edges that arbitrary JSON seldom hits.
edge_values = st.sampled_from(["false", "true", "TRUE", "1e-5", "nan", "24", 24, 24.0, 0, -1, 0.5, 1.5, 2**20,
                               2**20 + 1, 10**12, float("inf"), float("nan")])
# Mappings with the keys read inside `rope_parameters` and `rope_scaling`.
rope_mappings = st.fixed_dictionaries({}, optional={name: json_values | edge_values for name in (
    "rope_type", "type", "rope_theta", "partial_rotary_factor")})
values = json_values | edge_values | rope_mappings

HOSTILE = settings(max_examples=400, deadline=None, derandomize=True, database=None)
FIELD_TYPES = typing.get_type_hints(NeoXConfig)


def check_parse(parse, key: str) -> None:
    try:
        config = parse()
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and key in message, message
    else:
        for field in dataclasses.fields(NeoXConfig):
            assert type(getattr(config, field.name)) is FIELD_TYPES[field.name], field.name


@HOSTILE
@given(key=st.sampled_from(HF_KEYS), value=values)
def test_any_value_for_a_config_json_key(key, value):
    d = tiny_config().to_hf_dict()
    d[key] = value
    check_parse(lambda: NeoXConfig.from_hf_dict(d), key)


@pytest.fixture(scope="module")
def yaml_file(tmp_path_factory):
    return tmp_path_factory.mktemp("neox") / "neox.yml"


@HOSTILE
@given(key=st.sampled_from(sorted(NEOX_ARGS)), value=values)
def test_any_value_for_a_neox_yaml_key(yaml_file, key, value):
    yaml_file.write_text(yaml.safe_dump({**NEOX_ARGS, key: value}))
    check_parse(lambda: config_from_neox_args(read_neox_yaml([yaml_file]), 96, str(yaml_file)), key)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("hostile"), tiny_config(vocab_size=384))
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    return path


# Each run is a fresh process (seconds): a few examples, plus a valid change that generates and issue 12's.
@settings(max_examples=2, deadline=None, derandomize=True, database=None)
@example(key="rotary_pct", value=0.5)
@example(key="use_parallel_residual", value="false")
@given(key=st.sampled_from(HF_KEYS), value=values)
def test_generate_cli_on_a_corrupted_config_json(model_dir, key, value):
    d = tiny_config(vocab_size=384).to_hf_dict("float32")
    d.pop("rope_parameters")  # one spelling of the rotary settings, so that a valid change stays valid
    d[key] = value
    (model_dir / "config.json").write_text(json.dumps(d))
    result = subprocess.run([sys.executable, "-m", "neox_jax.generate", "--model", str(model_dir), "--prompt", "x",
                             "--max-new-tokens", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, len(errors)) in ((0, 0), (2, 1)), result.stderr
