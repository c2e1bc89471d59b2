"""NeoXConfig: presets, Hugging Face config.json in both rotary spellings, validation."""

import json

import pytest

from neox_jax.checkpoints.neox_yaml import config_from_neox_args, read_neox_yaml
from neox_jax.config import PRESETS, ConfigError, NeoXConfig

from conftest import tiny_config


def test_20b_preset_matches_the_published_model():
    c = PRESETS["gpt-neox-20b"]
    assert (c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.rotary_dim) == (44, 6144, 64, 96, 24)
    assert (c.vocab_size, c.max_position_embeddings, c.activation) == (50432, 2048, "gelu_tanh")
    assert c.parallel_residual and not c.tie_word_embeddings


# The published config.json of each model on the Hugging Face hub (https://huggingface.co/EleutherAI/NAME/blob/main/
# config.json), the keys that differ between them: (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, hidden_act). Every one also has rotary_pct 0.25, rotary_emb_base 10000, layer_norm_eps 1e-5,
# max_position_embeddings 2048, use_parallel_residual true, tie_word_embeddings false. Checked 2026-12-01 against
# the hub configs and lit-gpt's table (its padding_multiple 128 / 256 / 512 gives 50304 / 50432 / 50688).
PUBLISHED = {
    "gpt-neox-20b": (50432, 6144, 24576, 44, 64, "gelu_fast"),
    "pythia-14m": (50304, 128, 512, 6, 4, "gelu"),
    "pythia-31m": (50304, 256, 1024, 6, 8, "gelu"),
    "pythia-70m": (50304, 512, 2048, 6, 8, "gelu"),
    "pythia-160m": (50304, 768, 3072, 12, 12, "gelu"),
    "pythia-410m": (50304, 1024, 4096, 24, 16, "gelu"),
    "pythia-1b": (50304, 2048, 8192, 16, 8, "gelu"),
    "pythia-1.4b": (50304, 2048, 8192, 24, 16, "gelu"),
    "pythia-2.8b": (50304, 2560, 10240, 32, 32, "gelu"),
    "pythia-6.9b": (50432, 4096, 16384, 32, 32, "gelu"),
    "pythia-12b": (50688, 5120, 20480, 36, 40, "gelu"),
}
DEDUPED = [f"{name}-deduped" for name in PUBLISHED if name.startswith("pythia") and name not in ("pythia-14m", "pythia-31m")]


def published_config_json(name: str) -> dict:
    vocab, hidden, intermediate, layers, heads, act = PUBLISHED[name.removesuffix("-deduped")]
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "hidden_act": act, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "use_parallel_residual": True,
            "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16"}


@pytest.mark.parametrize("name", [*PUBLISHED, *DEDUPED])
def test_presets_equal_the_published_configs(name):
    assert PRESETS[name] == NeoXConfig.from_hf_dict(published_config_json(name))


def test_preset_help_lists_every_preset(capsys):
    from neox_jax.generate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in [*PUBLISHED, *DEDUPED]:
        assert name in out


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
    (dict(hidden_act="relu"), "key 'hidden_act' = 'relu' is not supported"),
    (dict(num_attention_heads=5), "key 'hidden_size' = 64 is not divisible by key 'num_attention_heads' = 5"),
    (dict(hidden_size=None), r"key 'hidden_size' = None \(null\): expected a positive integer"),
    (dict(num_hidden_layers=0), r"key 'num_hidden_layers' = 0 \(an integer\): expected a positive integer"),
    (dict(rotary_pct=1.5), r"key 'rotary_pct' = 1.5 \(a float\): expected a number in \[0, 1\]"),
    (dict(rotary_emb_base=0.5), "key 'rotary_emb_base' = 0.5 .*expected a finite number >= 1"),
    (dict(layer_norm_eps=-1e-5), "key 'layer_norm_eps' = -1e-05 .*expected a finite number > 0"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
     "key 'rope_parameters.rope_type' = 'linear': scaled rotary embeddings are not supported"),
    (dict(rope_parameters={"partial_rotary_factor": 0.5}),
     "key 'rotary_pct' = 0.25 disagrees with key 'rope_parameters.partial_rotary_factor' = 0.5"),
    (dict(rope_scaling=[1.0]), r"key 'rope_scaling' = \[1.0\] \(a list\): expected a mapping or null"),
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
    path.write_text("1" * 5000)  # past Python's integer conversion limit: a ValueError, not a JSONDecodeError
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        NeoXConfig.from_hf_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object of model settings, got a list"):
        NeoXConfig.from_hf_json(path)
    path.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="config.json: missing key 'vocab_size'"):
        NeoXConfig.from_hf_json(path)


# ---- Values of the wrong type or out of range, in config.json and in the GPT-NeoX YAML ----

SIZE = "expected a positive integer no larger than 2**20 = 1048576"

# (config.json key, GPT-NeoX YAML key, value as JSON/YAML text, how the message shows it, expected)
MISREAD = [
    ("use_parallel_residual", "gpt-j-residual", '"no"', "'no' (a string)", "expected a boolean (true or false)"),
    ("num_hidden_layers", "num-layers", "true", "True (a boolean)", SIZE),
    ("num_hidden_layers", "num-layers", "24.0", "24.0 (a float)", SIZE),
    ("layer_norm_eps", "layernorm-epsilon", '"small"', "'small' (a string)", "expected a finite number > 0"),
    ("rotary_emb_base", "rotary-emb-base", "NaN", "nan (a float)", "expected a finite number >= 1"),
    ("max_position_embeddings", "max-position-embeddings", "1000000000000", "1000000000000 (an integer)", SIZE),
]


def write_hf_config(path, key, json_value):
    d = tiny_config().to_hf_dict()
    del d["rope_parameters"]  # one spelling of the rotary settings, so that each key alone decides
    d[key] = json.loads(json_value)
    path.write_text(json.dumps(d))
    return path


def write_neox_yaml(path, key, yaml_value):
    path.write_text('{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 64,\n'
                    f' "pos-emb": "rotary", "{key}": {yaml_value}}}\n')
    return path


def neox_yaml_config(path):
    return config_from_neox_args(read_neox_yaml([path]), 96, str(path))


@pytest.mark.parametrize("hf_key, yaml_key, text, shown, expected", MISREAD)
def test_config_json_value_of_the_wrong_kind_is_named(tmp_path, hf_key, yaml_key, text, shown, expected):
    path = write_hf_config(tmp_path / "config.json", hf_key, text)
    with pytest.raises(ConfigError) as error:
        NeoXConfig.from_hf_json(path)
    assert str(error.value) == f"{path}: key '{hf_key}' = {shown}: {expected}"


@pytest.mark.parametrize("hf_key, yaml_key, text, shown, expected", MISREAD)
def test_neox_yaml_value_of_the_wrong_kind_is_named(tmp_path, hf_key, yaml_key, text, shown, expected):
    path = write_neox_yaml(tmp_path / "neox.yml", yaml_key, text.replace("NaN", ".nan"))
    with pytest.raises(ConfigError) as error:
        neox_yaml_config(path)
    assert str(error.value) == f"{path}: key '{yaml_key}' = {shown}: {expected}"


def test_the_string_false_is_never_true(tmp_path):
    with pytest.raises(ConfigError, match="key 'use_parallel_residual' = 'false' \\(a string\\): expected a boolean"):
        NeoXConfig.from_hf_json(write_hf_config(tmp_path / "config.json", "use_parallel_residual", '"false"'))
    # In the YAML, "true" and "false" strings are unambiguous and read as what they say.
    for text, parallel in (('"false"', False), ('"TRUE"', True), ("false", False)):
        path = write_neox_yaml(tmp_path / "neox.yml", "gpt-j-residual", text)
        assert neox_yaml_config(path).parallel_residual is parallel


def test_yaml_numeric_strings_are_numbers_only_for_float_keys(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string, and GPT-NeoX configs write it so.
    assert neox_yaml_config(write_neox_yaml(tmp_path / "a.yml", "layernorm-epsilon", "1e-6")).layer_norm_eps == 1e-6
    for key, text in (("layernorm-epsilon", '"inf"'), ("num-layers", '"2"'), ("rotary-pct", '"\u0661"')):
        with pytest.raises(ConfigError, match=f"key '{key}' = .* \\(a string\\): expected"):
            neox_yaml_config(write_neox_yaml(tmp_path / "a.yml", key, text))


def test_sizes_whose_product_is_absurd_are_refused_before_anything_allocates():
    # Each size is within its own limit; together they make 1.32e13 parameters.
    with pytest.raises(ConfigError, match=r"key 'num_hidden_layers' .* make 1\.32e\+13 parameters, over the limit"):
        NeoXConfig.from_hf_dict({**tiny_config().to_hf_dict(), "hidden_size": 2**14, "intermediate_size": 2**16,
                                 "num_hidden_layers": 2**12})
    with pytest.raises(ConfigError, match="key 'max_position_embeddings' = 1048576 times 1024 rotary dims per head"):
        NeoXConfig.from_hf_dict({**tiny_config().to_hf_dict(), "max_position_embeddings": 2**20, "hidden_size": 4096,
                                 "num_attention_heads": 1, "rotary_pct": 0.25, "rope_parameters": None})


def test_dataclass_checks_types_strictly():
    with pytest.raises(ConfigError, match=r"^num_layers = True \(a boolean\): expected a positive integer"):
        tiny_config(num_layers=True)
    with pytest.raises(ConfigError, match=r"^parallel_residual = 'false' \(a string\): expected a boolean"):
        tiny_config(parallel_residual="false")
    with pytest.raises(ConfigError, match=r"^layer_norm_eps = inf \(a float\): expected a finite number > 0"):
        tiny_config(layer_norm_eps=float("inf"))
    config = tiny_config(rotary_base=500)  # an int for a float field is stored as the float it means
    assert type(config.rotary_base) is float and config == tiny_config(rotary_base=500.0)
