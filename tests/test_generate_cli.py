"""`python -m neox_jax.generate`: the demo, a real checkpoint directory, and every user mistake."""

import json
import subprocess
import sys

import pytest

from neox_jax.checkpoints.synthetic import write_hf_checkpoint
from neox_jax.demo import PROMPTS
from neox_jax.generate import main
from neox_jax.tokenizer import demo_tokenizer

from conftest import REPO, tiny_config


def test_demo_runs_end_to_end_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "neox_jax.generate", "--demo", "--max-new-tokens", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPTS[0])
    assert "ms/token" in result.stderr and "compile" in result.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = demo_tokenizer()
    path = write_hf_checkpoint(tmp_path_factory.mktemp("m"), tiny_config(vocab_size=384))
    tokenizer._tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_json_output_one_object_per_prompt(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nJAX compiles\n")
    assert main(["--model", str(model_dir), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                 "--json", "--stop-token", "-1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in records] == ["The quick brown fox", "JAX compiles"]
    tokenizer = demo_tokenizer()
    for r in records:  # counts under the names other tools use for counts; the ids beside them
        assert r["completion_tokens"] == len(r["completion_token_ids"]) == 5
        assert r["prompt_token_ids"] == tokenizer.encode(r["prompt"])
        assert r["prompt_tokens"] == len(r["prompt_token_ids"])
        assert r["completion"] == tokenizer.decode(r["completion_token_ids"])


def test_stop_token_default_is_the_tokenizers_end_of_text_and_minus_one_is_never():
    """--stop-token as the decoder gets it: the tokenizer's <|endoftext|> by default (--demo's trained model too),
    -1 the command line's spelling of never (None), any other id as given."""
    from neox_jax.generate import parse_args, stop_token

    tokenizer = demo_tokenizer()
    assert tokenizer.eos_id == tokenizer.encode("<|endoftext|>")[0]

    def stop(*argv):
        return stop_token(parse_args(["--model", "m", *argv]), tokenizer)

    assert stop() == tokenizer.eos_id
    assert stop("--stop-token", "-1") is None
    assert stop("--stop-token", "7") == 7
    assert stop_token(parse_args(["--demo"]), tokenizer) == tokenizer.eos_id


def test_stop_token_outside_the_vocabulary_is_refused_before_loading(model_dir, capsys):
    assert main(["--model", str(model_dir), "--prompt", "hi", "--stop-token", "384"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stop token 384 is outside the vocabulary [0, 384)") and "loading" not in err


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--prompt", "hi"], "no such directory"),
    (["--model", "{model}", "--prompt", "hi", "--tokenizer", "{missing}"], "the tokenizer file given does not exist"),
    (["--model", "{untokenized}", "--prompt", "hi"], "no tokenizer found"),
    (["--model", "{model}", "--prompt", ""], "encodes to no tokens"),
    (["--model", "{model}", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive"),
    (["--model", "{model}", "--prompt", "hi " * 200, "--max-new-tokens", "8"], "beyond the model's context"),
    (["--model", "{model}", "--prompt-file", "{missing}"], "--prompt-file"),
    (["--model", "{empty}", "--prompt", "hi", "--tokenizer", "{model}/tokenizer.json"], "not a checkpoint directory"),
])
def test_user_mistakes_exit_2_with_a_clear_message(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    untokenized = write_hf_checkpoint(tmp_path / "untokenized", tiny_config(vocab_size=384))
    args = [a.format(model=model_dir, missing=tmp_path / "missing", empty=tmp_path / "empty",
                     untokenized=untokenized) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert "loading" not in err  # checked before any weights are read


def test_help_explains_the_inputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--demo" in out and "DeepSpeed" in out and "--max-new-tokens" in out


def test_deepspeed_shards_without_yaml_take_a_preset_or_config(tmp_path, capsys):
    from neox_jax.checkpoints.synthetic import neox_yaml, write_deepspeed_checkpoint

    config = tiny_config(vocab_size=384)
    ds = write_deepspeed_checkpoint(tmp_path / "ds", config, ranks=2, write_config_yaml=False)
    tokenizer = tmp_path / "tokenizer.json"
    demo_tokenizer()._tokenizer.save(str(tokenizer))
    args = ["--model", str(ds), "--tokenizer", str(tokenizer), "--prompt", "The quick", "--max-new-tokens", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model config" in err and "--config" in err, err
    yaml = tmp_path / "model.yml"
    yaml.write_text(neox_yaml(config, ranks=2))
    assert main(args + ["--config", str(yaml)]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    hf_dir = write_hf_checkpoint(tmp_path / "hf", config)
    assert main(["--model", str(hf_dir), "--tokenizer", str(tokenizer), "--prompt", "x",
                 "--preset", "gpt-neox-20b"]) == 2
    assert "DeepSpeed shards only" in capsys.readouterr().err


def test_one_tokenizer_rule_generate_load_and_eval_find_20b_tokenizer_beside_the_shards(tmp_path, capsys):
    """tokenizer.json, else the one *tokenizer*.json beside the model: EleutherAI's slim weights come with
    20B_tokenizer.json, which convert always found and generate, load and eval did not."""
    import neox_jax
    from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint

    ds = write_deepspeed_checkpoint(tmp_path / "slim", tiny_config(vocab_size=384), ranks=2, step=3)
    demo_tokenizer()._tokenizer.save(str(ds / "20B_tokenizer.json"))
    assert main(["--model", str(ds), "--prompt", "The quick", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("The quick")
    model = neox_jax.load(ds, progress=False)
    assert model.tokenizer.path == ds / "20B_tokenizer.json"
    lm_eval_model = pytest.importorskip("neox_jax.lm_eval_model")
    assert lm_eval_model.NeoXLM(pretrained=str(ds)).tokenizer_name.endswith("20B_tokenizer.json")
    (ds / "other_tokenizer.json").write_bytes((ds / "20B_tokenizer.json").read_bytes())
    assert main(["--model", str(ds), "--prompt", "The quick"]) == 2
    err = capsys.readouterr().err
    assert "several tokenizer files (20B_tokenizer.json, other_tokenizer.json)" in err, err
