"""Speculative decoding benchmark: tokens/s against plain decoding of the same target in the same run.

    python -m bench.speculative                       # pythia-160m-shaped target, pythia-14m-shaped draft, CPU
    python -m bench.speculative --target PATH --draft PATH|ngram   # real checkpoints (anything load takes)
    python -m bench.speculative --cost-only --target gpt-neox-20b --draft pythia-410m --dtype float16   # GPU row

Measured, in one process, after a warm-up run of each (compilation excluded):
* plain decoding of the target: ms per generated token (median of --reps) and tokens/s;
* speculative decoding at each K of --k with the draft, and with the target as its own draft: ms/token,
  the speed-up over plain decoding, the acceptance rate and target passes per token. On random weights a
  draft agrees with the target by chance only: that acceptance rate means nothing, and the row says so.
  The target as its own draft agrees by construction (acceptance 1, 1 / (K + 1) passes per token) but
  costs as much as the target, so it can only be slower: it shows the bookkeeping, not a gain;
* the cost side, meaningful on any weights: a target pass over K + 1 tokens against one decode step
  (r_v(K)), and a draft step against a target step (r_d), each on a cache filled with the prompt;
* the estimate: with acceptance rate a per token, a pass yields (1 - a^(K+1)) / (1 - a) tokens and costs
  r_v(K) + K r_d target steps, so the speed-up is their ratio; printed from the measured ratios for a from
  0.5 to 0.9 (assumed: the range Leviathan et al. 2023 report for a small draft of a large model).

Preset shapes (--target/--draft naming a preset) get random weights made on the device; paths are loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .common import fmt, load_average, machine, markdown_page, markdown_table, median, parse_list, table, utc_now, \
    write_page

ASSUMED_ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def random_model(preset: str, dtype: str, seed: int):
    """A NeoXModel of a preset's shape with random weights drawn on the device (bench.gpu's standard deviations;
    one compiled draw per distinct shape, so that the layers' repeated shapes compile once)."""
    import functools

    import jax

    from neox_jax.api import NeoXModel
    from neox_jax.config import PRESETS
    from neox_jax.dtypes import DTYPES
    from neox_jax.weights import abstract_params

    from .gpu import init_std

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(key, shape, dtype, std):
        return (jax.random.normal(key, shape, jax.numpy.float32) * std).astype(dtype)

    config = PRESETS[preset]
    jax_dtype = DTYPES[dtype].jax
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(config, jax_dtype))
    key = jax.random.PRNGKey(seed)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        std = init_std(name, config)
        if std is None:
            values.append(jax.numpy.zeros(leaf.shape, leaf.dtype))
        elif std == 1.0:
            values.append(jax.numpy.ones(leaf.shape, leaf.dtype))
        else:
            values.append(normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, std))
    return NeoXModel(config, jax.tree_util.tree_unflatten(treedef, values), dtype)


def get_model(source: str, dtype: str, seed: int, tokenizer: str | None = None):
    from neox_jax.config import PRESETS

    if source in PRESETS:
        return random_model(source, dtype, seed), True
    import neox_jax

    return neox_jax.load(source, dtype=dtype, progress=False, tokenizer=tokenizer), False


def pass_ms(model, batch: int, prompt_len: int, tokens: int, reps: int) -> float:
    """Median ms of one forward pass of `tokens` tokens per row through a cache holding `prompt_len` tokens."""
    import jax
    import jax.numpy as jnp

    from neox_jax.decode import length_bucket

    slots = length_bucket(prompt_len + tokens)
    cache = model.decoder.new_cache(batch, slots)
    prompt = jnp.ones((batch, prompt_len), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    fill = jax.jit(lambda params, cache: model.module.apply({"params": params}, prompt, positions, cache,
                                                            last_token_only=True).cache, donate_argnums=(1,))
    cache = fill(model.params, cache)
    step_tokens = jnp.ones((batch, tokens), jnp.int32)
    step_positions = prompt_len + jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))

    def one_pass(params, cache):  # the cache is rewound after each pass: every pass writes the same slots
        out = model.module.apply({"params": params}, step_tokens, step_positions, cache)
        return out.logits, out.cache.replace(length=cache.length)

    one_pass = jax.jit(one_pass, donate_argnums=(1,))
    logits, cache = one_pass(model.params, cache)
    logits.block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        logits, cache = one_pass(model.params, cache)
        logits.block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    return median(times)


def costs(target, draft, ks, batch: int, prompt_len: int, reps: int) -> dict:
    step = pass_ms(target, batch, prompt_len, 1, reps)
    out = {"target_step_ms": step, "verify_ms": {k: pass_ms(target, batch, prompt_len, k + 1, reps) for k in ks}}
    out["r_v"] = {k: ms / step for k, ms in out["verify_ms"].items()}
    if draft is not None:
        out["draft_step_ms"] = pass_ms(draft, batch, prompt_len, 1, reps)
        out["r_d"] = out["draft_step_ms"] / step
    return out


def expected_speedup(acceptance: float, k: int, r_v: float, r_d: float) -> float:
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (r_v + k * r_d)


def timed(model, prompts, new_tokens: int, reps: int, draft=None, k: int = 0) -> dict:
    """Median decode ms per generated token (one row's), after a warm-up run."""
    runs = []
    for _ in range(reps + 1):
        g = model.generate_timed(prompts, new_tokens, stop_token=None, draft=draft, num_draft_tokens=k or 4)
        per_row = (g.new_tokens / len(prompts)) if draft is not None else g.decode_steps
        runs.append((1e3 * g.decode_seconds / per_row, g))
    ms = median([r[0] for r in runs[1:]])
    g = runs[-1][1]
    out = {"ms_per_token": ms, "tokens_per_s": len(prompts) * 1e3 / ms}
    if draft is not None:
        out.update(acceptance=g.acceptance_rate, passes_per_token=g.passes_per_token)
    return out


def make_prompts(target, args, count: int | None = None) -> list[list[int]]:
    count = count or args.batch
    if args.prompt_text is None:
        rng = np.random.default_rng(args.seed)
        return [rng.integers(0, min(50000, target.config.vocab_size), args.prompt_len).tolist()
                for _ in range(count)]
    if target.tokenizer is None:
        raise SystemExit("error: --prompt-text needs the target's tokenizer (a checkpoint with tokenizer.json, "
                         "or --tokenizer FILE)")
    with open(args.prompt_text, encoding="utf-8") as f:
        lines = f.read().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()] if args.prompt_text.endswith(".jsonl") \
        else ["\n".join(lines)]
    prompts = [ids[:args.prompt_len] for ids in map(target.tokenizer.encode, texts) if len(ids) >= args.prompt_len]
    if len(prompts) < count:
        raise SystemExit(f"error: {args.prompt_text} has fewer than {count} texts of {args.prompt_len} tokens")
    return prompts[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--target", default="pythia-160m", help="a preset (random weights) or a checkpoint")
    parser.add_argument("--draft", default="pythia-14m", help="a preset, a checkpoint, or 'ngram'")
    parser.add_argument("--with-ngram", action="store_true", help="also rows for prompt lookup (draft 'ngram')")
    parser.add_argument("--k", default="1,2,3,4,6,8", help="comma list of draft tokens per pass")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", metavar="FILE", help="the target checkpoint's tokenizer JSON, where it has none "
                        "of its own (neox_jax/models' pair: the 20B tokenizer)")
    parser.add_argument("--prompt-text", metavar="FILE",
                        help="prompts from this text (a .jsonl of {\"text\": ...} or plain text), tokenized with the "
                             "target's tokenizer: the first --prompt-len tokens of successive documents (default: "
                             "random ids, fine for random weights only)")
    parser.add_argument("--acceptance-prompts", type=int, default=0, metavar="N",
                        help="also measure acceptance (not speed) over N prompts decoded as one batch, and check "
                             "that greedy speculative tokens equal plain decoding's")
    parser.add_argument("--cost-only", action="store_true",
                        help="only the cost ratios and the estimate (the GPU row at 20B shapes)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", metavar="FILE", help="write the figures page (docs/figures/speculative.md)")
    args = parser.parse_args(argv)
    started = utc_now()
    ks = parse_list(args.k, int)

    target, target_random = get_model(args.target, args.dtype, args.seed, args.tokenizer)
    draft, draft_random = (args.draft, False) if args.draft == "ngram" else get_model(args.draft, args.dtype,
                                                                                       args.seed + 1)
    print(f"target {args.target}, draft {args.draft}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; {machine()}; load average {load_average()}", file=sys.stderr)
    result = {"target": args.target, "draft": args.draft, "dtype": args.dtype, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "load_average": load_average()}
    result["costs"] = cost = costs(target, None if draft == "ngram" else draft, ks, args.batch, args.prompt_len,
                                   max(args.reps, 5))
    lines = [f"target step {fmt(cost['target_step_ms'], 2)} ms"
             + (f", draft step {fmt(cost['draft_step_ms'], 2)} ms (r_d = {cost['r_d']:.3f})" if "r_d" in cost
                else "")]
    cost_rows = [[k, fmt(cost["verify_ms"][k], 2), f"{cost['r_v'][k]:.2f}"] for k in ks]
    r_d = cost.get("r_d", 0.0)
    estimate_rows = [[k] + [f"{expected_speedup(a, k, cost['r_v'][k], r_d):.2f}x" for a in ASSUMED_ACCEPTANCE]
                     for k in ks]
    rows = []
    if not args.cost_only:
        prompts = make_prompts(target, args)
        plain = timed(target, prompts, args.new_tokens, args.reps)
        result["plain"] = plain
        rows.append(["plain", "-", fmt(plain["ms_per_token"], 2), fmt(plain["tokens_per_s"]), "1.00x", "-", "1.000"])
        result["speculative"] = []
        decoders = [("draft", draft)] + [("ngram", "ngram")] * args.with_ngram + [("target as draft", target)]
        for name, d in decoders:
            for k in ks:
                r = timed(target, prompts, args.new_tokens, args.reps, d, k)
                r.update(draft=name, k=k, speedup=plain["ms_per_token"] / r["ms_per_token"])
                result["speculative"].append(r)
                meaningless = name != "target as draft" and (target_random or (name == "draft" and draft_random))
                rows.append([name, k, fmt(r["ms_per_token"], 2), fmt(r["tokens_per_s"]), f"{r['speedup']:.2f}x",
                             f"{r['acceptance']:.2f}" + (" (random weights: meaningless)" if meaningless else ""),
                             f"{r['passes_per_token']:.3f}"])
    acceptance_rows = []
    if args.acceptance_prompts and not args.cost_only:
        many = make_prompts(target, args, args.acceptance_prompts)
        reference = target.generate(many, args.new_tokens, stop_token=None)
        for name, d in decoders:
            for k in ks:
                g = target.generate_timed(many, args.new_tokens, stop_token=None, draft=d, num_draft_tokens=k)
                same = g.tokens == reference
                result.setdefault("acceptance", []).append(dict(draft=name, k=k, acceptance=g.acceptance_rate,
                                                                passes_per_token=g.passes_per_token, same=same))
                acceptance_rows.append([name, k, f"{g.acceptance_rate:.3f}", f"{g.passes_per_token:.3f}",
                                        "yes" if same else "NO"])
    acceptance_headers = ["decoder", "K", "acceptance", "passes/token", "tokens = plain greedy"]
    headers = ["decoder", "K", "ms/token", "tokens/s", "vs plain", "acceptance", "passes/token"]
    cost_headers = ["K", "verify pass ms", "r_v = verify / step"]
    estimate_headers = ["K"] + [f"a = {a}" for a in ASSUMED_ACCEPTANCE]
    print("\n".join(lines))
    if rows:
        print(table(headers, rows))
    if acceptance_rows:
        print(f"over {args.acceptance_prompts} prompts in one batch:")
        print(table(acceptance_headers, acceptance_rows))
    print(table(cost_headers, cost_rows))
    print("expected speed-up from the measured r_v, r_d and an assumed acceptance a:")
    print(table(estimate_headers, estimate_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.markdown:
        body = (f"Target `{args.target}`{' (random weights)' if target_random else ''}, draft `{args.draft}`"
                f"{' (random weights)' if draft_random else ''}, {args.dtype}, batch {args.batch}, prompt "
                f"{args.prompt_len} tokens, {args.new_tokens} new tokens. Load average at the start: "
                f"{result['load_average']} (the machine is shared: timings are noisy).\n\n"
                + (markdown_table(headers, rows) + "\n\n" if rows else "")
                + (f"Acceptance over {args.acceptance_prompts} prompts decoded as one batch (greedy; the tokens "
                   f"checked against plain decoding's):\n\n" + markdown_table(acceptance_headers, acceptance_rows)
                   + "\n\n" if acceptance_rows else "")
                + "Cost side (measured): " + lines[0] + ".\n\n" + markdown_table(cost_headers, cost_rows)
                + "\n\nExpected speed-up from the measured ratios at assumed acceptance rates a:\n\n"
                + markdown_table(estimate_headers, estimate_rows) + "\n")
        write_page(args.markdown, markdown_page("Speculative decoding", "bench.speculative",
                                                sys.argv[1:] if argv is None else argv, body, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
