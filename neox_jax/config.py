"""Model configuration: one frozen dataclass, presets, and Hugging Face `config.json` I/O."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `hidden_act` values by the GELU they compute. The GPT-NeoX library's fused bias-GELU is the tanh form.
_TANH_GELU_NAMES = ("gelu_fast", "gelu_new", "gelu_pytorch_tanh")
_EXACT_GELU_NAMES = ("gelu",)


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-NeoX model (names the offending key)."""


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
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dims per head ({self.rotary_dim}) must be even")

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
        def need(key):
            if d.get(key) is None:
                raise ConfigError(f"missing key {key!r}")
            return d[key]

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rotary_pct = d.get("rotary_pct", rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)))
        rotary_base = d.get("rotary_emb_base", rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        act = d.get("hidden_act", "gelu")
        if act in _TANH_GELU_NAMES:
            activation = "gelu_tanh"
        elif act in _EXACT_GELU_NAMES:
            activation = "gelu"
        else:
            raise ConfigError(f"unsupported hidden_act {act!r} (expected one of "
                              f"{', '.join(_TANH_GELU_NAMES + _EXACT_GELU_NAMES)})")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=need("num_attention_heads"),
            intermediate_size=d.get("intermediate_size", 4 * need("hidden_size")),
            rotary_pct=float(rotary_pct),
            rotary_base=float(rotary_base),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            activation=activation,
            parallel_residual=bool(d.get("use_parallel_residual", True)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

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
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


PRESETS: dict[str, NeoXConfig] = {
    "gpt-neox-20b": NeoXConfig(
        vocab_size=50432, hidden_size=6144, num_layers=44, num_heads=64, intermediate_size=24576,
        rotary_pct=0.25, rotary_base=10000.0, layer_norm_eps=1e-5, activation="gelu_tanh",
        parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False),
    "pythia-70m": NeoXConfig(
        vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048,
        rotary_pct=0.25, rotary_base=10000.0, layer_norm_eps=1e-5, activation="gelu",
        parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False),
}
