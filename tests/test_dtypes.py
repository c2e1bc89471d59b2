"""The dtype registry: every name means the same dtype to JAX, numpy and torch, and every --dtype offers it."""

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bench.gpu
from neox_jax import convert, generate
from neox_jax.dtypes import DTYPES, NAMES, default_dtype, lookup


@pytest.mark.parametrize("name", NAMES)
def test_one_name_one_dtype_everywhere(name):
    d = DTYPES[name]
    assert d.jax == jnp.dtype(getattr(jnp, name)) and d.numpy == jnp.zeros(1, d.jax).dtype
    assert d.torch == getattr(torch, name) and d.bytes == torch.finfo(d.torch).bits // 8
    assert np.zeros(1, d.numpy).tobytes() == bytes(d.bytes)


def test_defaults_per_backend_and_unknown_names():
    assert default_dtype("cpu") == "float32" and default_dtype("gpu") == default_dtype("tpu") == "float16"
    with pytest.raises(ValueError, match="float16, bfloat16, float32, got 'float64'"):
        lookup("float64")


def help_text(parse, argv=("--help",)) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(list(argv))
    return out.getvalue()


def test_command_lines_offer_the_registry():
    names = "{" + ",".join(NAMES) + "}"
    generate_help = help_text(generate.parse_args)
    assert f"--dtype {names}" in generate_help and f"--rotary-dtype {names}" in generate_help
    assert f"--dtype {names}" in help_text(bench.gpu.main)
    assert "--dtype {keep," + names[1:] in help_text(convert.build_parser().parse_args)
