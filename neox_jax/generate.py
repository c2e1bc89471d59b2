"""`python -m neox_jax.generate`: greedy text generation from a GPT-NeoX checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .checkpoints import CheckpointError
from .config import ConfigError
from .decode import GenerationError, validate_request

EPILOG = """examples:
  python -m neox_jax.generate --demo
  python -m neox_jax.generate --model ./gpt-neox-20b --prompt "GPT-NeoX-20B is" --max-new-tokens 32
  python -m neox_jax.generate --model ./slim_weights --tokenizer 20B_tokenizer.json --prompt-file prompts.txt --json

--model takes a Hugging Face GPT-NeoX directory (config.json + safetensors, as written by
`python -m neox_jax.convert`) or GPT-NeoX DeepSpeed shards, merged while loading (converting once is faster).
Timings (load, compile, prefill, ms per generated token) go to stderr."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m neox_jax.generate", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (Hugging Face layout or DeepSpeed shards)")
    src.add_argument("--demo", action="store_true",
                     help="no files needed: a tiny random model and an in-memory tokenizer run the whole path")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-file", help="file with one prompt per line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--rotary-dtype", choices=["float16", "bfloat16", "float32"],
                   help="precision of the rotary angle tables (default: the model dtype, fp32 for bf16)")
    p.add_argument("--stop-token", type=int,
                   help="token id that ends a completion (default: the tokenizer's <|endoftext|>; -1: never stop)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    if args.prompt_file:
        if args.prompt_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise FileNotFoundError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise GenerationError(f"--prompt-file {args.prompt_file}: no prompts (one per line)")
        return prompts
    if args.demo:
        return ["GPT-NeoX-20B is", "The quick brown fox"]
    raise GenerationError("give --prompt TEXT or --prompt-file FILE")


def load_model_and_tokenizer(args, prompts: list[str]):
    """-> model, tokenizer, prompt ids; the request is checked against the config before any weights load."""
    from .api import load_checkpoint
    from .checkpoints import open_checkpoint
    from .tokenizer import load_tokenizer

    if args.demo:
        from .demo import demo_model

        print("demo: a tiny random model (2 layers, hidden 64) and tokenizer; the text is gibberish by design",
              file=sys.stderr)
        model, tokenizer = demo_model(args.dtype or "float32", args.rotary_dtype)
        return model, tokenizer, encode(tokenizer, prompts, model.config, args.max_new_tokens)
    checkpoint = open_checkpoint(args.model)
    tokenizer_path = args.tokenizer or Path(args.model) / "tokenizer.json"
    if not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"{tokenizer_path}: no tokenizer (give --tokenizer FILE)")
    tokenizer = load_tokenizer(tokenizer_path)
    prompt_ids = encode(tokenizer, prompts, checkpoint.config, args.max_new_tokens)
    model = load_checkpoint(checkpoint, dtype=args.dtype, rotary_dtype=args.rotary_dtype)
    return model, tokenizer, prompt_ids


def encode(tokenizer, prompts: list[str], config, max_new_tokens: int) -> list[list[int]]:
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for text, ids in zip(prompts, prompt_ids):
        if not ids:
            raise GenerationError(f"prompt {text!r} encodes to no tokens")
    validate_request(config, prompt_ids, max_new_tokens)
    return prompt_ids


def run(args) -> None:
    prompts = read_prompts(args)
    start = time.perf_counter()
    model, tokenizer, prompt_ids = load_model_and_tokenizer(args, prompts)
    load_seconds = time.perf_counter() - start

    stop = args.stop_token if args.stop_token is not None else (-1 if args.demo else tokenizer.eos_id)
    result = model.generate_timed(prompt_ids, args.max_new_tokens, None if stop == -1 else stop)

    for text, ids, new in zip(prompts, prompt_ids, result.tokens):
        completion = tokenizer.decode(new)
        if args.json:
            print(json.dumps({"prompt": text, "completion": completion, "prompt_tokens": ids,
                              "completion_tokens": new}, ensure_ascii=False), flush=True)
        else:
            print(text + completion, flush=True)
            if len(prompts) > 1:
                print("-" * 40, flush=True)

    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    per_token = 1e3 * result.decode_seconds / max(result.decode_steps, 1)
    print(f"[{model.dtype}] load {load_seconds:.2f}s | compile {result.compile_seconds:.2f}s | "
          f"prefill {prompt_tokens} tokens {1e3 * result.prefill_seconds:.1f}ms | "
          f"decode {result.decode_steps} steps x batch {len(prompts)}: {per_token:.2f} ms/token",
          file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ConfigError, GenerationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
