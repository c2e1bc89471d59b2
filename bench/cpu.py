"""CPU benchmark: neox-jax greedy generation against the parity/ PyTorch model, transformers' generate, and the
engines a CPU user would pick instead (CTranslate2, llama.cpp).

    python -m bench.cpu [--shapes tiny,pythia-70m] [--batch 1,8] [--new-tokens 32] [--prompt-len 64]
                        [--reps 3] [--engines ...] [--llama-cpp-convert PY] [--json OUT] [--markdown FILE]

One run compares the engines on the same random weights (`random_tensors(config, seed)`), the
same prompts (random token ids, every row the same length, so nobody pads) and the same number of new
tokens (no stop token: each decodes exactly `--new-tokens`, greedy, with a KV cache). The shapes are
`PRESETS` entries. Each engine runs in a child process of its own (`common.run_worker`), generates once to warm up (neox-jax compiles then), then
`--reps` times; the tables show medians.

* prefill: the forward pass over the prompt that yields the first new token; tok/s counts prompt tokens.
* decode: the remaining new_tokens - 1 steps, one token for every row each; tok/s counts all rows'
  tokens, ms/step is the time of one step.
* compile s: neox-jax's one-off XLA compilation (prefill + decode programs), excluded from its times.
* peak MB: peak resident set size during the timed runs minus the RSS before the engine was built (with
  its framework already imported and started): its copy of the weights, compiled programs, cache,
  activations and allocator pools (not the host copy of the random weights every engine is built from).
* jax speedup: neox-jax's tok/s divided by that engine's; same tokens: rows whose tokens equal neox-jax's.

`neox-jax-int8` is neox-jax with `quantize="int8"` (docs/quantization.md): each case then also reports its
decode against neox-jax fp32 and transformers fp32 from the same run, and the bytes it reads per step.
`neox-jax-xla` and `neox-jax-int8-xla` are the two with the native CPU kernels switched off (XLA's matmuls).
`neox-jax-int8-dynamic` is `quantize="int8-dynamic"`: int8's weights, and the activations quantized per row in
each matmul (int8 x int8 sums, as llama.cpp's q8_0 and CTranslate2's int8 do); beside neox-jax-int8, each case
reports its decode against int8's and how many rows' tokens equal int8's.

The peers (`pip install -e .[peers]`) convert the same weights, written as a Hugging Face directory with the
GPT-NeoX-20B tokenizer: `ctranslate2` (float32) and `ctranslate2-int8` (int8_float32) through CTranslate2's
TransformersConverter; `llama.cpp` (f32) and `llama.cpp-q8_0` through llama.cpp's convert_hf_to_gguf.py, run by
llama-cpp-python's low-level API with one sequence per row. Each uses a thread per core. 'same tokens'
compares every engine's greedy tokens with neox-jax fp32's: the fp32 engines must agree; the 8-bit ones
compute something else (llama.cpp's q8_0 also quantizes the activations), so theirs is information.

Every engine's decode is also reported as the weight bytes it reads per second (bytes of parameters one
step must read: every layer and the output head, the input embedding only for the gathered rows, int8's
as stored, KV cache not counted; over the time of one step) and as a fraction of the machine's
memory-read limit, measured right after that engine in a process of its own: the best of several readers
of a `--bandwidth-mib` array, threaded (numpy and torch on every core, XLA's sum and matvec; the page names
the best; see `memory_read_limit`). Right after each engine, because this shared machine's memory rate
moves over minutes (one run measured 37 GB/s after its engines while its fp32 engine had read 48 GB/s
minutes before): each engine is set against the rate the machine gave at about the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import (SHAPES, PeakRSS, decode_weight_bytes, load_average, machine, markdown_page, markdown_table,
                     median, param_count, parse_list, release_memory, rss_mb, run_worker, sig, table, utc_now,
                     write_page)

ENGINES = ("neox-jax", "neox-jax-int8", "parity", "transformers", "ctranslate2", "ctranslate2-int8", "llama.cpp",
           "llama.cpp-q8_0", "neox-jax-xla", "neox-jax-int8-xla", "neox-jax-int8-dynamic")
DEFAULT_ENGINES = ENGINES[:4]  # the peers need the `peers` extra (and llama.cpp its converter): named when wanted
PEERS = ENGINES[4:8]
MEMORY_READ = "memory-read"  # the worker that measures the machine's memory-read limit
# How each engine stores its matmul weights (the others: fp32). llama.cpp's q8_0 is counted as int8: it reads
# 34 bytes per 32 weights (an fp16 scale per block) where int8 with per-channel scales reads ~32.
QUANTIZE = {"neox-jax-int8": "int8", "neox-jax-int8-xla": "int8", "ctranslate2-int8": "int8", "llama.cpp-q8_0": "int8",
            "neox-jax-int8-dynamic": "int8-dynamic"}


# ---- engines: each returns per-run (prefill_s, decode_s, decode_steps, tokens) ----

class NeoXJaxEngine:
    name = "neox-jax"
    quantize = None

    @staticmethod
    def prepare():
        """Import and start the runtime, so that peak MB does not count it."""
        import jax.numpy as jnp

        import neox_jax.api  # noqa: F401

        (jnp.ones((2, 2)) @ jnp.ones((2, 2))).block_until_ready()

    def __init__(self, config, tensors):
        import jax.numpy as jnp

        from neox_jax.api import NeoXModel
        from neox_jax.weights import build_params

        params = build_params(config, tensors.items(), jnp.float32, progress=False, quantize=self.quantize)
        self.model = NeoXModel(config, params, "float32", quantize=self.quantize)
        self.compile_seconds = 0.0

    def run(self, prompts: np.ndarray, new_tokens: int):
        g = self.model.generate_timed(prompts.tolist(), new_tokens, stop_token=None)
        self.compile_seconds += g.compile_seconds
        return g.prefill_seconds, g.decode_seconds, g.decode_steps, g.tokens


class NeoXJaxInt8Engine(NeoXJaxEngine):
    """neox-jax with its matmul weights in int8, a scale per output channel (activations fp32)."""

    name = "neox-jax-int8"
    quantize = "int8"


class NeoXJaxInt8DynamicEngine(NeoXJaxEngine):
    """neox-jax with int8 weights and each matmul's activations quantized per row (int8 x int8 sums)."""

    name = "neox-jax-int8-dynamic"
    quantize = "int8-dynamic"


class NeoXJaxXlaEngine(NeoXJaxEngine):
    """neox-jax with its native CPU kernels switched off (NEOX_JAX_CPU_KERNELS=0): XLA's matmuls, for comparison."""

    name = "neox-jax-xla"

    @staticmethod
    def prepare():
        from neox_jax import cpu_kernels

        os.environ[cpu_kernels.SWITCH] = "0"
        NeoXJaxEngine.prepare()


class NeoXJaxInt8XlaEngine(NeoXJaxInt8Engine):
    """neox-jax-int8 on XLA's blocked path (NEOX_JAX_CPU_KERNELS=0)."""

    name = "neox-jax-int8-xla"
    prepare = NeoXJaxXlaEngine.prepare


class ParityEngine:
    """parity/model.py's GPTNeoX, driven by a batched greedy loop over its KV cache (its own `generate`
    takes one prompt at a time)."""

    name = "parity"

    @staticmethod
    def prepare():
        import torch

        import parity.model  # noqa: F401

        torch.ones(2, 2) @ torch.ones(2, 2)

    def __init__(self, config, tensors):
        import torch

        from parity.model import GPTNeoX

        self.torch = torch
        model = GPTNeoX(config, torch.float32, device="meta").to_empty(device="cpu").requires_grad_(False)
        state = {k.removeprefix("gpt_neox."): torch.from_numpy(np.ascontiguousarray(v, np.float32))
                 for k, v in tensors.items()}
        model.load_state_dict(state, strict=True)
        self.model = model.eval()
        self.compile_seconds = None

    def run(self, prompts: np.ndarray, new_tokens: int):
        from parity.model import KVCache

        torch, model = self.torch, self.model
        with torch.inference_mode():
            ids = torch.from_numpy(prompts).long()
            start = time.perf_counter()
            cache = KVCache(len(model.layers))
            token = model(ids, cache=cache)[:, -1].float().argmax(-1)
            out = [token]
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                token = model(token[:, None], cache=cache)[:, -1].float().argmax(-1)
                out.append(token)
            decode = time.perf_counter() - start
        return prefill, decode, new_tokens - 1, torch.stack(out, 1).tolist()


class TransformersEngine:
    """GPTNeoXForCausalLM.generate: greedy, KV cache (its default DynamicCache, default attention kernel),
    no EOS. A stopping criterion that never stops records when each new token exists: the first call comes
    right after the prefill's token, so prefill and decode are split exactly as for the other two."""

    name = "transformers"

    @staticmethod
    def prepare():
        import torch
        import transformers

        transformers.GPTNeoXForCausalLM  # noqa: B018  (resolves the lazy import)
        torch.ones(2, 2) @ torch.ones(2, 2)

    def __init__(self, config, tensors):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        self.torch = torch
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict("float32")))
        own = set(model.state_dict())
        # transformers 5 calls the output head `lm_head` (checkpoints on disk keep `embed_out`).
        rename = {"embed_out.weight": "lm_head.weight"} if "embed_out.weight" not in own else {}
        state = {rename.get(k, k): torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"transformers state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        self.model = model.eval().requires_grad_(False)
        self.compile_seconds = None

    def run(self, prompts: np.ndarray, new_tokens: int):
        import transformers

        torch = self.torch
        times: list[float] = []

        class Clock(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = torch.from_numpy(prompts).long()
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, num_beams=1, use_cache=True,
                                  eos_token_id=None, pad_token_id=0,
                                  stopping_criteria=transformers.StoppingCriteriaList([Clock()]))
        new = out[:, prompts.shape[1]:]
        if new.shape[1] != new_tokens or len(times) != new_tokens:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens ({len(times)} steps), "
                               f"expected {new_tokens}")
        return times[0] - start, times[-1] - times[0], new_tokens - 1, new.tolist()


def peer_checkpoint(config, tensors, folder: Path) -> Path:
    """The Hugging Face directory the peers convert from: the same random tensors, and the GPT-NeoX-20B tokenizer
    (their converters take the vocabulary from it; the prompts are token ids, so its merges are not used)."""
    from neox_jax.checkpoints.synthetic import write_hf_checkpoint
    from neox_jax.demo import trained_tokenizer

    tokenizer = trained_tokenizer()
    if tokenizer is None:
        raise RuntimeError("the peers' converters need the GPT-NeoX-20B tokenizer.json: set NEOX_TOKENIZER")
    path = write_hf_checkpoint(folder / "hf", config, tensors)
    shutil.copy(tokenizer, path / "tokenizer.json")
    return path


class CTranslate2Engine:
    """CTranslate2's Generator on the HF directory converted by its TransformersConverter: greedy
    (sampling_topk=1), the prompt forwarded at once (include_prompt_in_result=False), no end token. A step
    callback records when each new token exists, as the transformers engine's stopping criterion does."""

    name = "ctranslate2"
    compute_type = "float32"
    quantization = None

    @staticmethod
    def prepare():
        import ctranslate2  # noqa: F401

    def __init__(self, config, tensors):
        import ctranslate2
        import ctranslate2.converters.transformers as converters

        self.folder = tempfile.TemporaryDirectory()
        folder = Path(self.folder.name)
        # CTranslate2 4.8's GPT-NeoX loader reads transformers 4's names: `rotary_pct` and `embed_out`
        # (transformers 5: `rope_parameters["partial_rotary_factor"]` and `lm_head`).
        loader = converters._MODEL_LOADERS["GPTNeoXConfig"]
        spec = type(loader).get_model_spec

        def get_model_spec(model):
            if not hasattr(model.config, "rotary_pct"):
                model.config.rotary_pct = model.config.rope_parameters["partial_rotary_factor"]
            if not hasattr(model, "embed_out"):
                model.embed_out = model.lm_head
            return spec(loader, model)

        loader.get_model_spec = get_model_spec
        out = folder / "ct2"
        converters.TransformersConverter(str(peer_checkpoint(config, tensors, folder))).convert(
            str(out), quantization=self.quantization)
        self.vocabulary = json.loads((out / "vocabulary.json").read_text())
        self.generator = ctranslate2.Generator(str(out), device="cpu", compute_type=self.compute_type,
                                               intra_threads=os.cpu_count() or 1)
        self.compile_seconds = None

    def run(self, prompts: np.ndarray, new_tokens: int):
        times: list[float] = []

        def step(result):
            if result.batch_id == 0:
                times.append(time.perf_counter())

        start = time.perf_counter()
        results = self.generator.generate_batch([[self.vocabulary[i] for i in row] for row in prompts],
                                                max_length=new_tokens, include_prompt_in_result=False,
                                                sampling_topk=1, end_token=[], callback=step)
        tokens = [r.sequences_ids[0] for r in results]
        if len(times) != new_tokens or any(len(row) != new_tokens for row in tokens):
            raise RuntimeError(f"ctranslate2 generated {len(times)} steps, expected {new_tokens}")
        return times[0] - start, times[-1] - times[0], new_tokens - 1, tokens


class CTranslate2Int8Engine(CTranslate2Engine):
    """CTranslate2 with int8 weights (a scale per output channel) and fp32 activations (`int8_float32`)."""

    name = "ctranslate2-int8"
    compute_type = quantization = "int8_float32"


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python's low-level API) on a GGUF converted from the HF directory by llama.cpp's own
    convert_hf_to_gguf.py (--llama-cpp-convert): every row a sequence of one batch per step, greedy argmax of
    each row's logits, one thread per core."""

    name = "llama.cpp"
    outtype = "f32"

    @staticmethod
    def prepare():
        import llama_cpp

        llama_cpp.llama_backend_init()

    def __init__(self, config, tensors):
        import llama_cpp

        converter = os.environ.get(LLAMA_CPP_CONVERT)
        if not converter or not Path(converter).is_file():
            raise RuntimeError(f"llama.cpp engines need --llama-cpp-convert (convert_hf_to_gguf.py), got {converter!r}")
        self.folder = tempfile.TemporaryDirectory()
        folder = Path(self.folder.name)
        gguf = folder / f"model-{self.outtype}.gguf"
        # The converter reads config.json through transformers' AutoConfig when it can; transformers 5 drops
        # GPT-NeoX's `rotary_pct` from that dict, so it is made to read the file as written.
        script = ("import os, runpy, sys, transformers\n"
                  "def as_written(*args, **kwargs): raise ValueError('read config.json')\n"
                  "transformers.AutoConfig.from_pretrained = as_written\n"
                  "sys.path.insert(0, os.path.dirname(sys.argv[1]))\n"
                  "sys.argv = sys.argv[1:]\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
        subprocess.run([sys.executable, "-c", script, converter, str(peer_checkpoint(config, tensors, folder)),
                        "--outtype", self.outtype, "--outfile", str(gguf)], check=True, capture_output=True)
        self.llama = llama_cpp
        self.quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        llama_cpp.llama_log_set(self.quiet, None)
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.context = None
        self.compile_seconds = None

    def open(self, batch: int, tokens: int):
        """A context for `batch` sequences of `tokens` positions (a new one when the batch size changes)."""
        llama = self.llama
        if self.context is None or self.context[0] != (batch, tokens):
            params = llama.llama_context_default_params()
            params.n_ctx, params.n_seq_max = batch * tokens, batch
            params.n_batch = params.n_ubatch = batch * tokens
            params.n_threads = params.n_threads_batch = os.cpu_count() or 1
            self.context = ((batch, tokens), llama.llama_init_from_model(self.model, params),
                            llama.llama_batch_init(batch * tokens, 0, batch))
        _, context, batch_buffer = self.context
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        return context, batch_buffer

    def step(self, context, buffer, rows, start: int) -> list[int]:
        """Feeds each row's tokens (row i as sequence i, from position `start`) -> each row's greedy next token."""
        n = 0
        for seq, row in enumerate(rows):
            for j, token in enumerate(row):
                buffer.token[n], buffer.pos[n], buffer.n_seq_id[n] = int(token), start + j, 1
                buffer.seq_id[n][0], buffer.logits[n] = seq, j == len(row) - 1
                n += 1
        buffer.n_tokens = n
        if self.llama.llama_decode(context, buffer) != 0:
            raise RuntimeError("llama_decode failed")
        last = np.cumsum([len(row) for row in rows]) - 1
        return [int(np.argmax(np.ctypeslib.as_array(self.llama.llama_get_logits_ith(context, int(i)),
                                                    shape=(self.vocab_size,)))) for i in last]

    def run(self, prompts: np.ndarray, new_tokens: int):
        context, buffer = self.open(*prompts.shape[:1], prompts.shape[1] + new_tokens)
        start = time.perf_counter()
        token = self.step(context, buffer, prompts.tolist(), 0)
        out = [token]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            token = self.step(context, buffer, [[t] for t in token], prompts.shape[1] + i)
            out.append(token)
        decode = time.perf_counter() - start
        return prefill, decode, new_tokens - 1, np.array(out).T.tolist()


class LlamaCppQ8Engine(LlamaCppEngine):
    """llama.cpp's q8_0: int8 weights with an fp16 scale per block of 32, and int8 activations quantized per
    block on the fly (integer dot products): a different numerics from the weight-only engines."""

    name = "llama.cpp-q8_0"
    outtype = "q8_0"


LLAMA_CPP_CONVERT = "LLAMA_CPP_CONVERT"  # how --llama-cpp-convert reaches the workers
ENGINE_CLASSES = {"neox-jax": NeoXJaxEngine, "neox-jax-int8": NeoXJaxInt8Engine, "parity": ParityEngine,
                  "transformers": TransformersEngine, "ctranslate2": CTranslate2Engine,
                  "ctranslate2-int8": CTranslate2Int8Engine, "llama.cpp": LlamaCppEngine,
                  "llama.cpp-q8_0": LlamaCppQ8Engine, "neox-jax-xla": NeoXJaxXlaEngine,
                  "neox-jax-int8-xla": NeoXJaxInt8XlaEngine, "neox-jax-int8-dynamic": NeoXJaxInt8DynamicEngine}


def make_prompts(config, batch: int, prompt_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000 * batch)
    return rng.integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)


def time_engine(engine, prompts, new_tokens, reps, base_mb) -> dict:
    compile_before = engine.compile_seconds
    engine.run(prompts, new_tokens)  # warm-up (neox-jax compiles here)
    runs = []
    with PeakRSS() as mem:
        for _ in range(reps):
            runs.append(engine.run(prompts, new_tokens))
    batch, prompt_len = prompts.shape
    prefill = median([r[0] for r in runs])
    decode = median([r[1] for r in runs])
    steps = runs[0][2]
    return {
        "engine": engine.name,
        "prefill_seconds": prefill, "decode_seconds": decode, "decode_steps": steps,
        "prefill_runs": [r[0] for r in runs], "decode_runs": [r[1] for r in runs],
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_tokens_per_s": batch * steps / decode,
        "ms_per_step": 1e3 * decode / steps,
        "compile_seconds": None if compile_before is None else engine.compile_seconds - compile_before,
        "peak_mb": mem.peak_mb - base_mb,
        "tokens": [list(map(int, row)) for row in runs[-1][3][:batch]],
    }


# ---- the machine's memory-read limit ----

def memory_read_limit(mib: int, reps: int = 5) -> dict:
    """The host's memory-read rate, as the best of several readers of one `mib` fp32 array (past any cache),
    each counted as bytes read over the median time of `reps` reads after one warm-up:

    * numpy, one thread per core: each thread sums its slice (numpy releases the GIL in the loop);
    * torch, its intra-op threads (one per core): `x.sum()` over the same array, shared, not copied;
    * XLA sum: a jitted `jnp.sum` (XLA:CPU runs a reduction on one thread: the slowest reader, which the
      decode figures were once set against);
    * XLA matvec: a jitted fp32 `[n, 512] @ [512]`, the decode step's own kind of read.

    A decode step that reads its weights once cannot beat the best of these, so every engine's decode is
    reported as a fraction of it. The machine's other jobs slow every reader: measured in the same run.

    Then neox-jax's native kernels alone, in the same process (`kernels`): a batch-1 product with an fp32
    weight of `mib` and an int8 weight of `mib` / 4 (both `[n, 512]`, in huge pages as `build_params` places
    weights), counted the same way: how close the kernels come to the limit, apart from a decode step's
    other work."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    import torch

    from neox_jax import cpu_kernels
    from neox_jax.huge_pages import back_with_huge_pages

    threads = os.cpu_count() or 1
    n = mib * 2 ** 20 // 4
    host = np.full(n, 0.5, np.float32)
    slices = np.array_split(host, threads)

    def timed(read, nbytes: int = n * 4) -> float:
        read()
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            read()
            runs.append(time.perf_counter() - t)
        return nbytes / median(runs) / 1e9

    readers = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        readers[f"numpy, {threads} threads"] = timed(lambda: list(pool.map(np.sum, slices)))
    torch.set_num_threads(threads)
    shared = torch.from_numpy(host)
    readers[f"torch, {torch.get_num_threads()} threads"] = timed(lambda: float(shared.sum()))
    device = jnp.asarray(host)
    xla_sum = jax.jit(jnp.sum)
    readers["XLA sum"] = timed(lambda: xla_sum(device).block_until_ready())
    matrix = device.reshape(-1, 512)
    vector = jnp.ones((512,), jnp.float32)
    matvec = jax.jit(lambda w, x: jnp.dot(w, x, precision="highest"))
    readers["XLA matvec"] = timed(lambda: matvec(matrix, vector).block_until_ready())
    kernels = {}
    if cpu_kernels.unavailable_reason() is None:
        x = jnp.ones((1, 512), jnp.float32)
        back_with_huge_pages(matrix)
        fp32 = jax.jit(cpu_kernels.matmul)
        kernels["fp32"] = timed(lambda: fp32(x, matrix).block_until_ready())
        values = jnp.asarray(np.ones((n // 4 // 512, 512), np.int8))
        scale = jnp.ones((values.shape[0],), jnp.float32)
        back_with_huge_pages(values)
        int8 = jax.jit(cpu_kernels.weight_matmul)
        kernels["int8"] = timed(lambda: int8(x, values, scale).block_until_ready(), values.nbytes)
        del values
    del host, slices, shared, device, matrix
    release_memory()
    best = max(readers, key=readers.get)
    return {"mib": mib, "reps": reps, "readers": readers, "best": best, "gbps": readers[best], "kernels": kernels}


# ---- worker: one engine, one shape, every batch size ----

def worker(args) -> int:
    """One engine, or the memory-read limit, in the child process `common.run_worker` starts."""
    from neox_jax.checkpoints.synthetic import random_tensors

    if args.worker == MEMORY_READ:
        with open(args.worker_out, "w") as f:
            json.dump(memory_read_limit(args.bandwidth_mib), f)
        return 0

    config = SHAPES[args.shapes]
    tensors = random_tensors(config, seed=args.seed)
    engine_class = ENGINE_CLASSES[args.worker]
    engine_class.prepare()
    release_memory()
    base_mb = rss_mb()
    start = time.perf_counter()
    engine = engine_class(config, tensors)
    build_seconds = time.perf_counter() - start
    out = []
    for batch in parse_list(args.batch, int):
        prompts = make_prompts(config, batch, args.prompt_len, args.seed)
        result = time_engine(engine, prompts, args.new_tokens, args.reps, base_mb)
        result.update(shape=args.shapes, batch=batch, build_seconds=build_seconds)
        out.append(result)
    with open(args.worker_out, "w") as f:
        json.dump(out, f)
    return 0


def engine_results(engine: str, shape: str, args) -> list[dict]:
    argv = ["--shapes", shape, "--batch", args.batch, "--new-tokens", str(args.new_tokens), "--prompt-len",
            str(args.prompt_len), "--reps", str(args.reps), "--seed", str(args.seed), "--bandwidth-mib",
            str(args.bandwidth_mib)]
    env = dict(os.environ)
    if args.llama_cpp_convert:
        env[LLAMA_CPP_CONVERT] = str(Path(args.llama_cpp_convert).resolve())
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    return run_worker("bench.cpu", engine, argv, env, capture=True)


# ---- report ----

def case_title(case, config) -> str:
    return (f"{case['shape']}  batch {case['batch']}  prompt {case['prompt_len']}  new tokens {case['new_tokens']}  "
            f"({param_count(config) / 1e6:.2f}M params, fp32, median of {case['reps']})")


def weight_gbps(config, batch: int, engine: str, result: dict) -> float:
    """Bytes of weights one decode step of `engine` reads (as it stores them), per second."""
    return decode_weight_bytes(config, batch, 4, QUANTIZE.get(engine)) / (result["ms_per_step"] / 1e3) / 1e9


def case_table(case, config) -> tuple[list[str], list[list]]:
    results = case["engines"]
    ref = results.get("neox-jax")
    limits = case.get("read_limits") or {}
    headers = ["engine", "prefill tok/s", "decode tok/s", "ms/step", "weights GB/s", "of read limit", "compile s",
               "peak MB", "jax speedup prefill", "jax speedup decode", "same tokens"]
    rows = []
    for name, r in results.items():
        gbps = weight_gbps(config, case["batch"], name, r)
        fraction = f"{gbps / limits[name]['gbps']:.2f}" if name in limits else "-"
        if ref is None or name == "neox-jax":
            speed_p = speed_d = same = "-"
        else:
            speed_p = f"{ref['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:.2f}x"
            speed_d = f"{ref['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x"
            agree = sum(a == b for a, b in zip(ref["tokens"], r["tokens"]))
            same = f"{agree}/{len(r['tokens'])} rows"
        rows.append([name, r["prefill_tokens_per_s"], r["decode_tokens_per_s"], f"{r['ms_per_step']:.2f}",
                     sig(gbps), fraction, None if r["compile_seconds"] is None else f"{r['compile_seconds']:.2f}",
                     r["peak_mb"], speed_p, speed_d, same])
    return headers, rows


def quantized_lines(case, config) -> list[str]:
    """The int8 engine against neox-jax fp32 and transformers fp32 of the same case, and its bytes per step."""
    engines = case["engines"]
    int8 = engines.get("neox-jax-int8")
    if int8 is None:
        return []
    fp32 = decode_weight_bytes(config, case["batch"], 4)
    int8_bytes = decode_weight_bytes(config, case["batch"], 4, "int8")
    ratios = [f"{int8['decode_tokens_per_s'] / engines[name]['decode_tokens_per_s']:.2f}x {name} fp32"
              for name in ("neox-jax", "transformers") if name in engines]
    return [f"neox-jax-int8 decode reads {int8_bytes / 1e6:.1f} MB of weights per step ({int8_bytes / fp32:.2f} of "
            f"fp32's {fp32 / 1e6:.1f} MB) in {int8['ms_per_step']:.2f} ms = "
            f"{int8_bytes / (int8['ms_per_step'] / 1e3) / 1e9:.1f} GB/s",
            f"  decode tok/s: {', '.join(ratios) or 'no fp32 engine in this run'} (issue 14's targets: 1.8x and 2.5x)"]


def dynamic_lines(case) -> list[str]:
    """int8-dynamic against weight-only int8 in the same case: decode speed, and rows with int8's tokens."""
    engines = case["engines"]
    dynamic, int8 = engines.get("neox-jax-int8-dynamic"), engines.get("neox-jax-int8")
    if dynamic is None or int8 is None:
        return []
    same = sum(a == b for a, b in zip(int8["tokens"], dynamic["tokens"]))
    return [f"neox-jax-int8-dynamic decode: {dynamic['decode_tokens_per_s'] / int8['decode_tokens_per_s']:.2f}x "
            f"neox-jax-int8 ({dynamic['ms_per_step']:.2f} vs {int8['ms_per_step']:.2f} ms/step); the same tokens as "
            f"int8 in {same}/{len(int8['tokens'])} rows"]


def limit_lines(case) -> list[str]:
    """The memory-read limit measured right after each engine: its best reader's rate (what that engine's 'of read
    limit' divides by), then every reader's rate and the kernels alone of each measurement."""
    limits = case.get("read_limits")
    if not limits:
        return []
    first = next(iter(limits.values()))
    after = ", ".join(f"{engine} {limit['gbps']:.1f} ({limit['best']})" for engine, limit in limits.items())
    lines = [f"memory-read limit right after each engine, GB/s (best reader): {after}; each the best of several "
             f"readers of {first['mib']} MiB fp32, median of {first['reps']}; 'weights GB/s' is the weight bytes each "
             f"engine's decode step reads (int8 as stored) over its step time, 'of read limit' its fraction of the "
             f"limit measured right after it"]
    for engine, limit in limits.items():
        readers = ", ".join(f"{name} {gbps:.1f}" for name, gbps in limit["readers"].items())
        lines.append(f"  after {engine}: the best of: {readers} GB/s" + "".join(f"; {line}" for line in
                                                                             kernel_lines(limit)))
    return lines


def kernel_lines(limit) -> list[str]:
    """The native kernels alone against the limit (`memory_read_limit`'s `kernels`), if they were measured."""
    kernels = limit.get("kernels")
    if not kernels:
        return []
    rates = ", ".join(f"{name} {gbps:.1f} GB/s = {gbps / limit['gbps']:.2f}" for name, gbps in kernels.items())
    return [f"neox-jax's kernels alone, batch 1 (fp32 weight of {limit['mib']} MiB, int8 of {limit['mib'] // 4} "
            f"MiB, [n, 512] in huge pages), as a fraction of that limit: {rates}"]


def print_case(case, config) -> None:
    print(f"\n== {case_title(case, config)} ==")
    print(table(*case_table(case, config)))
    for line in limit_lines(case) + quantized_lines(case, config) + dynamic_lines(case):
        print(line)


def markdown_case(case, config) -> str:
    lines = [f"## {case_title(case, config)}", "", markdown_table(*case_table(case, config)), ""]
    extra = limit_lines(case) + quantized_lines(case, config) + dynamic_lines(case)
    return "\n".join(lines + [f"- {line.strip().removeprefix('= ')}" for line in extra]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,pythia-70m", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median shown)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma list of {', '.join(ENGINES)} (default: {', '.join(DEFAULT_ENGINES)}). The peers "
                             f"({', '.join(PEERS)}) need `pip install -e .[peers]` and the GPT-NeoX-20B tokenizer "
                             f"(NEOX_TOKENIZER), and convert the same random weights written as a Hugging Face "
                             f"directory; their shapes need vocab_size >= the tokenizer's (Pythia's)")
    parser.add_argument("--llama-cpp-convert", metavar="PY",
                        help="llama.cpp's convert_hf_to_gguf.py, for the llama.cpp engines (not in the "
                             "llama-cpp-python wheel: in its sdist, vendor/llama.cpp/)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="size of the array the memory-read limit is measured on (0: do not measure it)")
    parser.add_argument("--omp-wait-policy", choices=("active", "passive"),
                        help="set OMP_WAIT_POLICY for the engines (default: leave it alone, torch's default). Its "
                             "OpenMP threads spin between ops: fastest on an idle machine, but when other jobs "
                             "take a core a 2-thread team can stall per op (tiny-model transformers steps were "
                             "measured at 1.3 ms idle and 69 ms under load). 'passive' is steadier under load "
                             "but slower when idle (1.3 -> 2.4 ms; Pythia-70M batch 1 10-12 -> 16-18 ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all results (and per-run times) to this file")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write the tables as a Markdown page with the date, machine and command "
                             "(the docs' figures are these pages: docs/figures/cpu.md)")
    parser.add_argument("--worker", choices=(*ENGINES, MEMORY_READ), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.markdown and not Path(args.markdown).resolve().parent.is_dir():
        parser.error(f"--markdown {args.markdown}: its folder does not exist")
    shapes = parse_list(args.shapes)
    engines = parse_list(args.engines)
    unknown = [s for s in shapes if s not in SHAPES] + [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown shape or engine: {', '.join(unknown)}")
    if any(e.startswith("llama.cpp") for e in engines) and not (args.llama_cpp_convert
                                                               and Path(args.llama_cpp_convert).is_file()):
        parser.error(f"the llama.cpp engines need --llama-cpp-convert, llama.cpp's convert_hf_to_gguf.py; got "
                     f"{args.llama_cpp_convert!r}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.reps < 1 or not parse_list(args.batch, int):
        parser.error("need --new-tokens >= 2, --prompt-len >= 1, --reps >= 1 and at least one batch size")
    for shape in shapes:
        if args.prompt_len + args.new_tokens > SHAPES[shape].max_position_embeddings:
            parser.error(f"--prompt-len + --new-tokens exceed the context of {shape}")
    if args.worker:
        return worker(args)

    import torch
    import transformers

    import neox_jax

    setup = (f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
             f"{machine()}; load average at start {load_average()}; OMP_WAIT_POLICY "
             f"{args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY') or 'unset (the default)'}. Each engine "
             f"runs in its own child process, on the same random weights and prompts.")
    print(f"neox-jax CPU benchmark ({os.path.dirname(neox_jax.__file__)}): {setup}", flush=True)
    started, started_at = time.perf_counter(), utc_now()
    cases = []
    for shape in shapes:
        config = SHAPES[shape]
        per_engine, limits = {}, {}
        for engine in engines:
            per_engine[engine] = engine_results(engine, shape, args)
            if args.bandwidth_mib:
                limits[engine] = engine_results(MEMORY_READ, shape, args)
        for i, batch in enumerate(parse_list(args.batch, int)):
            case = {"shape": shape, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                    "reps": args.reps, "engines": {e: per_engine[e][i] for e in engines}, "read_limits": limits}
            print_case(case, config)
            cases.append(case)
        sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at end {load_average()} "
          f"(on a shared machine compare within a table, not across runs)")
    if args.markdown:
        argv = sys.argv[1:] if argv is None else argv
        body = f"{setup}\n\n" + "\n".join(markdown_case(c, SHAPES[c["shape"]]) for c in cases)
        write_page(args.markdown, markdown_page("CPU benchmark", "bench.cpu", argv, body, started_at))
        print(f"wrote {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, "cases": cases}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
