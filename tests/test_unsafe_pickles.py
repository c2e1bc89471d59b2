"""A `.pt` file whose pickle would run code is refused as exactly that by both DeepSpeed loaders (neox_jax's and
the parity reference's), the code never runs, and no message suggests loading it with weights_only=False."""

import os
import pickle
import re
import shlex

import numpy as np
import pytest
import torch

from conftest import tiny_config
from neox_jax.checkpoints import CheckpointError, synthetic
from neox_jax.checkpoints.deepspeed import DeepSpeedCheckpoint
from parity.load import LoadError, load_deepspeed

# torch warns about every pickle protocol but 2 before refusing it: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class RunsShellCommand:
    """Pickles as os.system creating `marker`: loading it must refuse, and never run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


FORMATS = {
    "torch.save zip": lambda obj, file: torch.save(obj, file),
    "torch.save legacy": lambda obj, file: torch.save(obj, file, _use_new_zipfile_serialization=False),
    # pickle's default protocol (5), whose opcodes torch's weights-only unpickler does not read at all
    "plain pickle": lambda obj, file: file.write_bytes(pickle.dumps(obj)),
}


def assert_refused_as_code(error, file, marker):
    message = str(error.value)
    assert re.fullmatch(rf"{re.escape(str(file))}: refused to \w+: .*would run code.*\bposix\.system\b.*", message)
    assert "corrupt" not in message and "unreadable" not in message
    assert "weights_only" not in message, message
    assert not marker.exists(), "the pickled command ran"


@pytest.mark.parametrize("fmt", FORMATS)
def test_neox_jax_loader_refuses_a_layer_file_that_would_run_code(tmp_path, fmt):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=2)
    file, marker = tmp_path / "layer_00-model_01-model_states.pt", tmp_path / "ran"
    FORMATS[fmt]({"word_embeddings.weight": RunsShellCommand(marker)}, file)
    with pytest.raises(CheckpointError) as error:
        DeepSpeedCheckpoint(tmp_path)
    assert_refused_as_code(error, file, marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_neox_jax_loader_refuses_a_sequential_file_that_would_run_code(tmp_path, fmt):
    # Sequential files are read with their non-tensor objects made inert; a shell command is still refused.
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=2, layout="sequential")
    file, marker = tmp_path / "mp_rank_01_model_states.pt", tmp_path / "ran"
    state = torch.load(file, weights_only=False)  # written just above by the synthetic writer
    state["args"] = RunsShellCommand(marker)
    FORMATS[fmt](state, file)
    with pytest.raises(CheckpointError) as error:
        DeepSpeedCheckpoint(tmp_path)
    assert_refused_as_code(error, file, marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parity_loader_refuses_a_layer_file_that_would_run_code(tmp_path, fmt):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    file, marker = tmp_path / "layer_02-model_00-model_states.pt", tmp_path / "ran"
    FORMATS[fmt]({"input_layernorm.weight": RunsShellCommand(marker)}, file)
    with pytest.raises(LoadError) as error:
        load_deepspeed(tmp_path, config)
    assert_refused_as_code(error, file, marker)


def protocol_4_tensors(file):
    """Only tensors, but in pickle protocol 4, which torch's weights-only unpickler cannot read."""
    torch.save({"word_embeddings.weight": torch.zeros(48, 64)}, file, pickle_protocol=4)


def truncate(file):
    file.write_bytes(file.read_bytes()[:300])


@pytest.mark.parametrize("damage", [protocol_4_tensors, truncate])
def test_an_unreadable_file_without_code_is_not_called_code(tmp_path, damage):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2, dtype=np.float32)
    file = tmp_path / "layer_00-model_01-model_states.pt"
    damage(file)
    for loader, error_type, pattern in ((DeepSpeedCheckpoint, CheckpointError, "truncated or corrupt checkpoint file"),
                                        (lambda path: load_deepspeed(path, config), LoadError, "unreadable shard")):
        with pytest.raises(error_type) as error:
            loader(tmp_path)
        message = str(error.value)
        assert message.startswith(f"{file}: {pattern} (") and "code" not in message, message
        assert "weights_only" not in message, message
