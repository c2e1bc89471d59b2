"""Model configuration: one frozen dataclass, presets, and Hugging Face `config.json` I/O.

Values are checked by strict pydantic schemas, one per source (the dataclass's own fields, `config.json`,
and in `checkpoints.neox_yaml` the GPT-NeoX YAML): nothing is read as something else (no boolean as a
size, no "false" string as true, no 24.0 as a layer count), and each error is one line naming the key,
the value, its type and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
from typing import Any, Callable, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# HF `hidden_act` values by the GELU they compute. The GPT-NeoX library's fused bias-GELU is the tanh form.
_TANH_GELU_NAMES = ("gelu_fast", "gelu_new", "gelu_pytorch_tanh")
_EXACT_GELU_NAMES = ("gelu",)

# Limits that refuse absurd sizes before anything allocates. Each is far above any GPT-NeoX-family model
# (GPT-NeoX-20B: 2048 positions, 50432 vocabulary, 6144 hidden, 2.1e10 parameters) yet turns a typo such as
# 10**12 positions into a message here rather than an out-of-memory failure later.
MAX_SIZE = 2**20  # any one size: positions, vocabulary, hidden, intermediate, layers, heads
MAX_PARAMETERS = 2**40  # about 1.1e12 parameters, 2 TiB in fp16
MAX_ROTARY_TABLE = 2**28  # positions x rotary dims per head: the cos/sin tables are built whole on the host


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-NeoX model (names the offending key)."""


# ---- Typed schemas and their one-line errors ----

# Strict: no conversion between types (an int is still accepted for a float). Unknown keys are ignored.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
Schema = TypeVar("Schema", bound=BaseModel)


def size_field(default: Any = ...) -> Any:
    return Field(default, ge=1, le=MAX_SIZE, description=f"a positive integer no larger than 2**20 = {MAX_SIZE}")


def fraction_field(default: Any = ...) -> Any:
    return Field(default, ge=0.0, le=1.0, description="a number in [0, 1]")


def positive_field(default: Any = ...) -> Any:
    return Field(default, gt=0.0, description="a finite number > 0")


def rotary_base_field(default: Any = ...) -> Any:
    # RoPE's frequencies are base**(-2i/d): below 1 they grow instead of falling, and a tiny base overflows them
    # to infinity. From 1 up, no angle exceeds its position, so the rotary tables are always finite.
    return Field(default, ge=1.0, description="a finite number >= 1")


def flag_field(default: Any = ...) -> Any:
    return Field(default, description="a boolean (true or false)")


def text_field(default: Any = ...) -> Any:
    return Field(default, description="a string")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 40


def show(value: Any) -> str:
    """A short one-line repr of a value read from a file (repr escapes line breaks)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        return "<an integer too long to print>"


def kind(value: Any) -> str:
    """What a value read from JSON or YAML is, in those formats' words."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                        ((list, tuple), "a list"), (dict, "a mapping")):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"


def validate(schema: type[Schema], data: Any, label: Callable[[str], str]) -> Schema:
    """`schema.model_validate(data)`, its first error as a one-line ConfigError naming the key as `label` does."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        if not error["loc"]:
            raise ConfigError(f"expected a mapping of settings, got {kind(data)}") from None
        name = str(error["loc"][0])
        if error["type"] == "missing":
            raise ConfigError(f"missing {label(name)}") from None
        value = error["input"]
        raise ConfigError(f"{label(name)} = {show(value)} ({kind(value)}): expected "
                          f"{schema.model_fields[name].description}") from None


class _Fields(BaseModel):
    """NeoXConfig's fields, typed."""

    model_config = STRICT
    vocab_size: int = size_field()
    hidden_size: int = size_field()
    num_layers: int = size_field()
    num_heads: int = size_field()
    intermediate_size: int = size_field()
    rotary_pct: float = fraction_field()
    rotary_base: float = rotary_base_field()
    layer_norm_eps: float = positive_field()
    activation: Literal["gelu_tanh", "gelu"] = Field(description="'gelu_tanh' or 'gelu'")
    parallel_residual: bool = flag_field()
    max_position_embeddings: int = size_field()
    tie_word_embeddings: bool = flag_field()


def _checked(values: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """NeoXConfig field values, typed and consistent; errors name each field as `labels` does (default: as is)."""

    def label(name: str) -> str:
        return labels.get(name, name)

    c = validate(_Fields, dict(values), label)
    if c.hidden_size % c.num_heads:
        raise ConfigError(f"{label('hidden_size')} = {c.hidden_size} is not divisible by "
                          f"{label('num_heads')} = {c.num_heads}")
    head_dim = c.hidden_size // c.num_heads
    rotary_dim = int(head_dim * c.rotary_pct)  # as NeoXConfig.rotary_dim
    rotary_source = f"{label('rotary_pct')} of {label('hidden_size')} / {label('num_heads')}"
    if rotary_dim % 2:
        raise ConfigError(f"{rotary_source} gives {rotary_dim} rotary dims per head ({c.rotary_pct} of "
                          f"{head_dim}): they must be even")
    if c.max_position_embeddings * rotary_dim > MAX_ROTARY_TABLE:
        raise ConfigError(f"{label('max_position_embeddings')} = {c.max_position_embeddings} times {rotary_dim} "
                          f"rotary dims per head ({rotary_source}) exceeds the rotary tables' limit of 2**28")
    parameters = _parameter_count(c)
    if parameters > MAX_PARAMETERS:
        raise ConfigError(f"{label('vocab_size')}, {label('hidden_size')}, {label('num_layers')} and "
                          f"{label('intermediate_size')} make {parameters:.3g} parameters, over the limit of "
                          f"2**40 (about 1.1e12)")
    return c.model_dump()


def _parameter_count(c: _Fields) -> int:
    d, f = c.hidden_size, c.intermediate_size
    per_layer = 4 * d * d + 2 * d * f + 9 * d + f  # attention and MLP weights, their biases, two LayerNorms
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_layers * per_layer + 2 * d


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # "gelu_tanh" or "gelu" (exact erf form)
    parallel_residual: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # Written back so that an int given for a float field is stored as the float it means.
        for name, value in _checked(vars(self), {}).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], labels: Mapping[str, str]) -> "NeoXConfig":
        """A config from values parsed out of a file; errors name each field as `labels` does (the file's key)."""
        return cls(**_checked(values, labels))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        # Same truncation as both the GPT-NeoX library and transformers: int(head_dim * rotary_pct).
        return int(self.head_dim * self.rotary_pct)

    def replace(self, **changes) -> "NeoXConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "NeoXConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object of model settings, got {kind(d)}")
        if d.get("model_type", "gpt_neox") != "gpt_neox":  # another architecture's keys could read as NeoX's
            raise ConfigError(f"{_key('model_type')} = {show(d['model_type'])}: not a GPT-NeoX model (expected "
                              f"'gpt_neox')")
        hf = validate(_HFConfigJson, d, _key)
        (pct_label, rotary_pct), (base_label, rotary_base) = _rotary_settings(hf)
        if hf.hidden_act in _TANH_GELU_NAMES:
            activation = "gelu_tanh"
        elif hf.hidden_act in _EXACT_GELU_NAMES:
            activation = "gelu"
        else:
            raise ConfigError(f"{_key('hidden_act')} = {show(hf.hidden_act)} is not supported (expected one of "
                              f"{', '.join(_TANH_GELU_NAMES + _EXACT_GELU_NAMES)})")
        intermediate_label = (_key("intermediate_size") if hf.intermediate_size is not None
                              else f"intermediate_size (4 x {_key('hidden_size')}, as it is absent)")
        return cls.from_values(
            dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                 num_heads=hf.num_attention_heads,
                 intermediate_size=hf.intermediate_size if hf.intermediate_size is not None else 4 * hf.hidden_size,
                 rotary_pct=rotary_pct, rotary_base=rotary_base, layer_norm_eps=hf.layer_norm_eps,
                 activation=activation, parallel_residual=hf.use_parallel_residual,
                 max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=hf.tie_word_embeddings),
            dict(vocab_size=_key("vocab_size"), hidden_size=_key("hidden_size"), num_layers=_key("num_hidden_layers"),
                 num_heads=_key("num_attention_heads"), intermediate_size=intermediate_label, rotary_pct=pct_label,
                 rotary_base=base_label, layer_norm_eps=_key("layer_norm_eps"),
                 max_position_embeddings=_key("max_position_embeddings")))

    def to_hf_dict(self, torch_dtype: str = "float16") -> dict[str, Any]:
        """A `config.json` that both transformers 4.x (legacy rotary keys) and 5.x (`rope_parameters`) read."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base,
                                "partial_rotary_factor": self.rotary_pct},
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": "gelu_fast" if self.activation == "gelu_tanh" else "gelu",
            "use_parallel_residual": self.parallel_residual,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "NeoXConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{path}: unreadable ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer past 4300 digits, deep nesting
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _key(name: str) -> str:
    return f"key {name!r}"


class _HFConfigJson(BaseModel):
    """The keys of a transformers GPT-NeoX `config.json` that NeoXConfig reads; other keys are ignored.

    A key that may be absent defaults to None when its value is derived from other keys. An explicit null
    is refused: transformers would fail on it, or read it as false.
    """

    model_config = STRICT
    vocab_size: int = size_field()
    hidden_size: int = size_field()
    num_hidden_layers: int = size_field()
    num_attention_heads: int = size_field()
    intermediate_size: int = size_field(None)
    # The rotary settings, spelled differently by different transformers versions (see _rotary_settings).
    rotary_pct: float = fraction_field(None)
    rotary_emb_base: float = rotary_base_field(None)
    partial_rotary_factor: float = fraction_field(None)
    rope_theta: float = rotary_base_field(None)
    # Mappings that transformers writes as null when unused.
    rope_parameters: dict | None = Field(None, description="a mapping or null")
    rope_scaling: dict | None = Field(None, description="a mapping or null")
    layer_norm_eps: float = positive_field(1e-5)
    hidden_act: str = text_field("gelu")
    use_parallel_residual: bool = flag_field(True)
    max_position_embeddings: int = size_field(2048)
    tie_word_embeddings: bool = flag_field(False)


class _RopeParameters(BaseModel):
    """`rope_parameters` (transformers 5.x) or `rope_scaling` (4.x, which spells rope_type `type`)."""

    model_config = STRICT
    rope_type: str = text_field(None)
    type: str = text_field(None)
    rope_theta: float = rotary_base_field(None)
    partial_rotary_factor: float = fraction_field(None)


def _rotary_settings(hf: _HFConfigJson) -> tuple[tuple[str, float], tuple[str, float]]:
    """(label, value) of the rotary fraction and of the rotary base, from whichever keys the file uses."""
    ropes = {name: validate(_RopeParameters, rope, lambda field: _key(f"{name}.{field}"))
             for name in ("rope_parameters", "rope_scaling") if (rope := getattr(hf, name)) is not None}
    for name, rope in ropes.items():
        for field in ("rope_type", "type"):
            if getattr(rope, field) not in (None, "default"):
                raise ConfigError(f"{_key(f'{name}.{field}')} = {show(getattr(rope, field))}: scaled rotary "
                                  f"embeddings are not supported (only 'default')")
    fraction = _agreed({"rotary_pct": hf.rotary_pct,
                        **{f"{name}.partial_rotary_factor": rope.partial_rotary_factor for name, rope in ropes.items()},
                        "partial_rotary_factor": hf.partial_rotary_factor}, default=0.25)
    base = _agreed({"rotary_emb_base": hf.rotary_emb_base,
                    **{f"{name}.rope_theta": rope.rope_theta for name, rope in ropes.items()},
                    "rope_theta": hf.rope_theta}, default=10000.0)
    return fraction, base


def _agreed(sources: dict[str, float | None], default: float) -> tuple[str, float]:
    """The value given by the keys present in `sources` (first key first), with that key's label.

    Several present keys must agree: different transformers versions would read different ones.
    """
    present = [(name, value) for name, value in sources.items() if value is not None]
    if not present:
        return f"{next(iter(sources))} (absent: {default})", default
    (first, value), *others = present
    for name, other in others:
        if other != value:
            raise ConfigError(f"{_key(first)} = {value} disagrees with {_key(name)} = {other}")
    return _key(first), value


PRESETS: dict[str, NeoXConfig] = {
    "gpt-neox-20b": NeoXConfig(
        vocab_size=50432, hidden_size=6144, num_layers=44, num_heads=64, intermediate_size=24576,
        rotary_pct=0.25, rotary_base=10000.0, layer_norm_eps=1e-5, activation="gelu_tanh",
        parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False),
    # A toy of the same code path, for tests, `--demo` and the benchmarks' smoke runs. Its 384-row vocabulary
    # holds the demo tokenizer's 320 tokens, padded to a multiple of 128 as GPT-NeoX pads.
    "tiny": NeoXConfig(
        vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
        rotary_pct=0.25, max_position_embeddings=256),
}

# The Pythia suite: (vocab_size, hidden_size, num_layers, num_heads) as in EleutherAI/pythia-* config.json on
# the Hugging Face hub; the rest is shared (MLP 4x wide, rotary on a quarter of each head, exact GELU,
# parallel residual, 2048 positions, untied head). The vocabulary is padded differently by size.
_PYTHIA = {
    "pythia-14m": (50304, 128, 6, 4), "pythia-31m": (50304, 256, 6, 8), "pythia-70m": (50304, 512, 6, 8),
    "pythia-160m": (50304, 768, 12, 12), "pythia-410m": (50304, 1024, 24, 16), "pythia-1b": (50304, 2048, 16, 8),
    "pythia-1.4b": (50304, 2048, 24, 16), "pythia-2.8b": (50304, 2560, 32, 32), "pythia-6.9b": (50432, 4096, 32, 32),
    "pythia-12b": (50688, 5120, 36, 40),
}
_PYTHIA_WITHOUT_DEDUPED = ("pythia-14m", "pythia-31m")  # trained only on the standard Pile


def _pythia(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int) -> NeoXConfig:
    return NeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      intermediate_size=4 * hidden_size, rotary_pct=0.25, rotary_base=10000.0, layer_norm_eps=1e-5,
                      activation="gelu", parallel_residual=True, max_position_embeddings=2048,
                      tie_word_embeddings=False)


PRESETS.update({name: _pythia(*shape) for name, shape in _PYTHIA.items()})
# "-deduped": the same model trained on the deduplicated Pile.
PRESETS.update({f"{name}-deduped": PRESETS[name] for name in _PYTHIA if name not in _PYTHIA_WITHOUT_DEDUPED})
