"""Arbitrary text in any command-line option: the command succeeds, or prints one `error:` line and exits 2.

Never a traceback, never a hang. The commands run in-process (their `main`), so an exception escaping
`main` fails the test; output is captured and checked line by line.
"""

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint, write_hf_checkpoint
from neox_jax.tokenizer import demo_tokenizer

from conftest import tiny_config

CONFIG = tiny_config(vocab_size=384)
HYPOTHESIS = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 25)), deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Text as users (and shells) produce it: numbers of every size and form, paths, option-like and odd strings.
values = st.one_of(
    st.text(max_size=12),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "-1", "0", "1e23", "nan", "-inf", "model=0", "model=2,data=3", "data=-1", "model=x",
                     "/", ".", "..", "/dev/null", "--help", "float64", "keep", "gpt-neox-20b", "a=1=2", "\x00",
                     "é", "1GB", "0B", "-5MB", "1e400TB"]),
)


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path, monkeypatch):
    """Relative paths that hypothesis makes up (`--json x`) land in a scratch folder, not the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("m"), CONFIG)
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def deepspeed_dir(tmp_path_factory):
    return write_deepspeed_checkpoint(tmp_path_factory.mktemp("ds"), CONFIG, ranks=2)


def run(main, argv) -> tuple[int, str]:
    """-> (exit status, stderr as a terminal shows it) of an in-process `main(argv)`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse, --help
            status = e.code
    shown = [line.split("\r")[-1] for line in err.getvalue().split("\n")]
    return status or 0, "\n".join(line for line in shown if line.strip())


def assert_clean(status: int, err: str, argv) -> None:
    assert status in (0, 2), (status, argv, err)
    if status == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, (argv, err)


GENERATE_OPTIONS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--stop-token",
                    "--dtype", "--rotary-dtype", "--mesh", "--prompt", "--tokenizer", "--preset", "--config",
                    "--quantize"]


@HYPOTHESIS
@given(option=st.sampled_from(GENERATE_OPTIONS), value=values)
def test_generate_options(model_dir, option, value):
    from neox_jax.generate import main

    argv = ["--model", str(model_dir), "--max-new-tokens", "2", "--prompt", "The quick", option, value]
    assert_clean(*run(main, argv), argv)


CONVERT_OPTIONS = ["--shard-size", "--dtype", "--preset", "--config", "--tokenizer"]


@HYPOTHESIS
@given(option=st.sampled_from(CONVERT_OPTIONS), value=values)
def test_convert_options(deepspeed_dir, tmp_path_factory, option, value):
    from neox_jax.convert import main

    out = tmp_path_factory.mktemp("out") / "hf"
    argv = [str(deepspeed_dir), str(out), option, value]
    assert_clean(*run(main, argv), argv)


PARITY_OPTIONS = ["--max-new-tokens", "--dtype", "--mesh", "--prompt", "--json", "--preset", "--config",
                  "--tokenizer", "--model", "--quantize"]


@settings(HYPOTHESIS, max_examples=12)
@given(option=st.sampled_from(PARITY_OPTIONS), value=values)
def test_parity_check_options(model_dir, option, value):
    from parity.check import main

    argv = ["--checkpoint", str(model_dir), "--tokenizer", str(model_dir / "tokenizer.json"), "--prompt", "The quick",
            "--max-new-tokens", "2", option, value]
    status, err = run(main, argv)
    assert status in (0, 1, 2), (status, argv, err)  # 1: a mismatch, e.g. a --model of other weights
    if status == 2:
        assert_clean(status, err, argv)


# Not --model: a made-up "owner/name" would be looked up on the hub (tests/test_plan.py covers directories).
PLAN_OPTIONS = ["--preset", "--dtype", "--quantize", "--batch", "--context", "--mesh", "--device-memory"]


@HYPOTHESIS
@given(option=st.sampled_from(PLAN_OPTIONS), value=values)
def test_plan_options(option, value):
    from neox_jax.plan import main

    argv = (["--preset", "pythia-70m"] if option != "--preset" else []) + [option, value]
    status, err = run(main, argv)
    assert status in (0, 1, 2), (status, argv, err)  # 1: does not fit
    if status == 2:
        assert_clean(status, err, argv)
