"""NeoXConfig: presets, Hugging Face config.json in both rotary spellings, validation."""

import json

import pytest

from neox_jax.config import PRESETS, ConfigError, NeoXConfig

from conftest import tiny_config


def test_20b_preset_matches_the_published_model():
    c = PRESETS["gpt-neox-20b"]
    assert (c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.rotary_dim) == (44, 6144, 64, 96, 24)
    assert (c.vocab_size, c.max_position_embeddings, c.activation) == (50432, 2048, "gelu_tanh")
    assert c.parallel_residual and not c.tie_word_embeddings


@pytest.mark.parametrize("changes", [{}, dict(parallel_residual=False, activation="gelu", rotary_pct=1.0),
                                     dict(tie_word_embeddings=True, rotary_base=500.0)])
def test_hf_dict_round_trip(changes):
    config = tiny_config(**changes)
    assert NeoXConfig.from_hf_dict(config.to_hf_dict()) == config


def test_reads_transformers_5_rope_parameters_form():
    d = tiny_config().to_hf_dict()
    del d["rotary_pct"], d["rotary_emb_base"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0, "partial_rotary_factor": 0.5}
    c = NeoXConfig.from_hf_dict(d)
    assert (c.rotary_base, c.rotary_pct) == (1234.0, 0.5)


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(rotary_pct=0.5, rotary_base=777.0, activation="gelu")
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "gpt_neox" and hf.hidden_act == "gelu"
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5 and hf.rope_parameters["rope_theta"] == 777.0


@pytest.mark.parametrize("act, expected", [("gelu_fast", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu", "gelu")])
def test_activation_names(act, expected):
    d = tiny_config().to_hf_dict()
    d["hidden_act"] = act
    assert NeoXConfig.from_hf_dict(d).activation == expected


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="relu"), "unsupported hidden_act 'relu'"),
    (dict(num_attention_heads=5), "not divisible by num_heads 5"),
    (dict(hidden_size=None), "missing key 'hidden_size'"),
    (dict(num_hidden_layers=0), "num_layers must be a positive integer"),
])
def test_bad_config_is_named(change, message):
    d = {**tiny_config().to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        NeoXConfig.from_hf_dict(d)


def test_missing_key_and_bad_json_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        NeoXConfig.from_hf_json(path)
    path.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="config.json: missing key 'vocab_size'"):
        NeoXConfig.from_hf_json(path)
