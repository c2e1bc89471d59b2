"""GPT-NeoX training YAML configs: read, merge, and turn into a NeoXConfig.

The keys read here are checked by a strict schema with GPT-NeoX's defaults, as GPT-NeoX's own argument
parser checks them (NeoXArgs.validate_types: exactly the declared type, an integer allowed for a float).
Beyond that parser, where the meaning cannot be mistaken:
- a decimal string is accepted for a float key: YAML 1.1, which PyYAML implements, reads `1e-5` (no dot)
  as a string;
- the strings "true" and "false", in any case, are accepted for a boolean key. Any other string ("yes",
  "0", "off" in quotes) is refused; unquoted yes/no/on/off are booleans in YAML 1.1 already.
Null is accepted only for the sizes whose GPT-NeoX default is None, meaning "not configured". Elsewhere
GPT-NeoX would run with None itself rather than its default, so null is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import BaseModel, BeforeValidator

from ..config import (STRICT, ConfigError, NeoXConfig, flag_field, fraction_field, positive_field,
                      rotary_base_field, show, size_field, text_field, validate)

# Keys that shape the model: two YAML files disagreeing on one of these is an error.
_MODEL_KEYS = {"num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
               "seq_length", "rotary_pct", "rotary_emb_base", "no_weight_tying", "gpt_j_residual", "gpt_j_tied",
               "activation", "bias_gelu_fusion", "openai_gelu", "layernorm_epsilon", "norm", "pos_emb",
               "mlp_type", "num_kv_heads", "use_bias_in_norms", "use_bias_in_attn_linear", "model_parallel_size"}

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def _number_from_string(value: Any) -> Any:
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)
    return value


def _bool_from_string(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


_YamlFloat = Annotated[float, BeforeValidator(_number_from_string)]
_YamlBool = Annotated[bool, BeforeValidator(_bool_from_string)]


class _NeoXArgs(BaseModel):
    """The GPT-NeoX arguments read here, with GPT-NeoX's defaults; other keys are ignored."""

    model_config = STRICT
    num_layers: int | None = size_field(None)
    hidden_size: int | None = size_field(None)
    num_attention_heads: int | None = size_field(None)
    num_kv_heads: int | None = size_field(None)
    intermediate_size: int | None = size_field(None)
    max_position_embeddings: int | None = size_field(None)
    seq_length: int | None = size_field(None)
    model_parallel_size: int = size_field(1)  # checked against the checkpoint's ranks by DeepSpeedCheckpoint
    rotary_pct: _YamlFloat = fraction_field(1.0)
    rotary_emb_base: _YamlFloat = rotary_base_field(10000.0)
    layernorm_epsilon: _YamlFloat = positive_field(1e-5)
    pos_emb: str = text_field("learned")
    norm: str = text_field("layernorm")
    mlp_type: str = text_field("regular")
    activation: str = text_field("gelu")
    gpt_j_residual: _YamlBool = flag_field(False)
    gpt_j_tied: _YamlBool = flag_field(False)
    bias_gelu_fusion: _YamlBool = flag_field(False)
    openai_gelu: _YamlBool = flag_field(False)
    no_weight_tying: _YamlBool = flag_field(False)
    use_bias_in_norms: _YamlBool = flag_field(True)
    use_bias_in_attn_linear: _YamlBool = flag_field(True)


def read_neox_yaml(files: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Merge GPT-NeoX training YAMLs (as NeoX does with several), keys normalized to `_`.

    The keys read by `config_from_neox_args` are type-checked here, naming the file and the key as written.
    A key that shapes the model given different values by two files is an error rather than a silent override.
    """
    import yaml

    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for file in map(Path, files):
        try:
            data = yaml.safe_load(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such file") from None
        # ValueError: an integer past Python's 4300-digit limit; RecursionError: deeply nested values.
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
            raise ConfigError(f"{file}: not a readable YAML file ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of GPT-NeoX arguments")
        for written, value in data.items():
            key = str(written).replace("-", "_")
            if key in _NeoXArgs.model_fields:
                try:
                    value = getattr(validate(_NeoXArgs, {key: value}, lambda _: f"key {str(written)!r}"), key)
                except ConfigError as e:
                    raise ConfigError(f"{file}: {e}") from None
            if key in merged and merged[key] != value and key in _MODEL_KEYS:
                raise ConfigError(f"{file}: {key} = {show(value)} conflicts with {show(merged[key])} in {origin[key]}")
            merged[key], origin[key] = value, file
    return merged


def config_from_neox_args(args: Mapping[str, Any], vocab_size: int, where: str = "config") -> NeoXConfig:
    """A NeoXConfig from merged NeoX arguments (keys spelled with `_`); defaults are GPT-NeoX's own (e.g. tied
    embeddings). `vocab_size` comes from the checkpoint: GPT-NeoX pads it at run time."""
    try:
        return _config(validate(_NeoXArgs, dict(args), _key), vocab_size)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _config(args: _NeoXArgs, vocab_size: int) -> NeoXConfig:
    for name, supported, note in (
            ("pos_emb", "rotary", " (GPT-NeoX's default is 'learned': set \"pos-emb\": \"rotary\")"),
            ("norm", "layernorm", ""), ("mlp_type", "regular", ""), ("gpt_j_tied", False, ""),
            ("use_bias_in_norms", True, ""), ("use_bias_in_attn_linear", True, "")):
        if getattr(args, name) != supported:
            raise ConfigError(f"{_dashed(name)} = {show(getattr(args, name))} is not supported "
                              f"(only {supported!r}){note}")
    if args.activation != "gelu":
        raise ConfigError(f"activation {show(args.activation)} is not supported (only 'gelu')")
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, name) is None:
            raise ConfigError(f"no {_dashed(name)!r}")
    if args.num_kv_heads not in (None, args.num_attention_heads):
        raise ConfigError(f"{_key('num_kv_heads')} = {args.num_kv_heads} differs from {_key('num_attention_heads')} = "
                          f"{args.num_attention_heads}: grouped-query attention is not supported")
    positions_key = "max_position_embeddings" if args.max_position_embeddings is not None else "seq_length"
    if getattr(args, positions_key) is None:
        raise ConfigError("neither 'max-position-embeddings' nor 'seq-length' is given")
    intermediate_label = (_key("intermediate_size") if args.intermediate_size is not None
                          else f"intermediate-size (4 x {_key('hidden_size')}, as it is absent)")
    return NeoXConfig.from_values(
        dict(vocab_size=vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
             num_heads=args.num_attention_heads, intermediate_size=args.intermediate_size or 4 * args.hidden_size,
             rotary_pct=args.rotary_pct, rotary_base=args.rotary_emb_base, layer_norm_eps=args.layernorm_epsilon,
             # GPT-NeoX's fused bias-GELU kernel and its openai-gelu option compute the tanh approximation;
             # plain F.gelu is exact.
             activation="gelu_tanh" if args.bias_gelu_fusion or args.openai_gelu else "gelu",
             parallel_residual=args.gpt_j_residual, max_position_embeddings=getattr(args, positions_key),
             tie_word_embeddings=not args.no_weight_tying),
        dict(vocab_size="the vocabulary size (rows of the checkpoint's embedding)", hidden_size=_key("hidden_size"),
             num_layers=_key("num_layers"), num_heads=_key("num_attention_heads"),
             intermediate_size=intermediate_label, rotary_pct=_key("rotary_pct"),
             rotary_base=_key("rotary_emb_base"), layer_norm_eps=_key("layernorm_epsilon"),
             max_position_embeddings=_key(positions_key)))


def _dashed(name: str) -> str:
    """A key as GPT-NeoX's own configs spell it."""
    return name.replace("_", "-")


def _key(name: str) -> str:
    return f"key {_dashed(name)!r}"
