"""neox-jax as an lm-evaluation-harness (0.4.x) model, registered as `neox-jax`.

    import neox_jax.lm_eval_model  # registers the model with lm-eval
    lm_eval.simple_evaluate(model="neox-jax", model_args="pretrained=DIR,tokenizer=FILE,dtype=float16",
                            tasks=["lambada_openai"], batch_size=16)

or from the shell, `python -m neox_jax.eval` (lm-eval's own CLI with `--model neox-jax` as the default).

model_args:
  pretrained   a Hugging Face GPT-NeoX directory, GPT-NeoX DeepSpeed shards or a hub id (anything
               `neox_jax.load` reads); from Python also an already loaded `NeoXModel`.
  revision     with a hub id: branch, tag or commit (default main).
  tokenizer    a tokenizer JSON (default: the model's `tokenizer.json`, else its one `*tokenizer*.json`).
  dtype        float16 | bfloat16 | float32 (default: float16 on accelerators, float32 on CPU).
  rotary_dtype rotary table dtype (default as `neox_jax.load`: the model dtype, fp32 for bf16).
  quantize     int8 | fp8 | int8-dynamic: quantized matmul weights; int8-dynamic quantizes the activations too
               (docs/quantization.md).
  max_length   context used for scoring (default and maximum: max_position_embeddings).
  max_gen_toks default generation budget of generate_until (256, as lm-eval's `hf` model).
  prefix_token_id  token conditioning an empty context and the first rolling window (default <|endoftext|>).
  batch_size   rows per forward pass ("auto" means 16: there is no out-of-memory probing); rounded up to
               a multiple of the data-parallel size.
  model_parallel, data_parallel   device mesh (default: `neox_jax.load`'s choice: one device, or all
               local devices on the model axis when the weights do not fit on one).
  tp_exact     true: DeepSpeed shards computed as their tensor-parallel ranks did in training, each rank's
               LayerNorm copies and row-parallel biases kept (`neox_jax.load(..., tp_exact=True)`).

Scoring follows lm-eval's own `hf` model (HFLM) request for request: the same context/continuation
tokenisation (TemplateLM), the empty context replaced by the prefix token, the input left-truncated to the
last `max_length + 1` tokens of context + continuation (minus the last token), rolling windows from
`get_rolling_token_windows` + `make_disjoint_window`, log-probabilities from a log-softmax in fp32 over
the full (padded) vocabulary, `is_greedy` as "argmax equals the continuation token at every position".

Scoring runs on device (`neox_jax.scoring`), and no [B, T, V] logits come back to the host. Requests that
share their context (multiple choice: HellaSwag's 4 endings, PIQA's and Winogrande's 2), where context and
continuation fit without truncation, compute the context once (`ContextScorer`): packed in one row with every
continuation but its last token, each continuation masked to see the context and itself only, when that row
fits in `max_length`; else prefilled into a KV cache that each continuation is scored against. Only the
positions that score a continuation token (queued across calls, `HeadQueue`) go through the output projection. Every
other request is one right-padded row of context + continuation (`Scorer`), of which only the continuation's
positions go through the output projection. Both pad to a fixed batch size
and to length buckets (`neox_jax.scoring.score_bucket`: multiples of 16 up to 256, then of 256), and every
shared context of a task to one cache size, so a task compiles once per bucket (or pair of buckets) it
touches, whatever the number of requests. The two ways give the same log-likelihoods up to the order of fp32 summation.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .api import NeoXModel, load
from .quantize import QuantizedWeight
from .scoring import ContextScorer, HeadQueue, Scorer, even_batch, packed_length, score_bucket, shared_lengths
from .sharding import DATA
from .tokenizer import END_OF_TEXT, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

AUTO_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _parse_batch_size(batch_size, max_batch_size) -> int:
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        size = int(max_batch_size) if max_batch_size else AUTO_BATCH_SIZE
        logger.warning("neox-jax: batch_size=%s: no out-of-memory probing; using %d", batch_size, size)
        return size
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        size = 0
    if isinstance(batch_size, bool) or size < 1 or (isinstance(batch_size, float) and batch_size != size):
        raise ValueError(f"batch_size must be a positive integer or auto, got {batch_size!r}")
    return size


@register_model("neox-jax")
class NeoXLM(TemplateLM):
    """lm-eval model over a `neox_jax.NeoXModel` (see the module docstring for model_args)."""

    def __init__(self, pretrained: str | os.PathLike | NeoXModel | None = None,
                 tokenizer: str | os.PathLike | Tokenizer | None = None,
                 dtype: str | None = None, rotary_dtype: str | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, prefix_token_id: int | None = None,
                 device: str | None = None, model_parallel: int | None = None, data_parallel: int | None = None,
                 revision: str | None = None, tp_exact: bool = False, quantize: str | None = None,
                 **kwargs: Any):
        super().__init__()
        if kwargs:  # a misspelt model_arg would otherwise change nothing, silently
            known = [p for p in inspect.signature(NeoXLM.__init__).parameters if p not in ("self", "kwargs")]
            raise ValueError(f"unknown model_args {', '.join(repr(k) for k in sorted(kwargs))}: neox-jax takes "
                             f"{', '.join(known)}")
        if pretrained is None or pretrained == "":
            raise ValueError("model_args must name the model: pretrained=DIR (a Hugging Face GPT-NeoX directory, "
                             "GPT-NeoX DeepSpeed shards or a hub id)")
        batch = _parse_batch_size(batch_size, max_batch_size)  # before the weights load
        if device:  # lm-eval's CLI always passes one (default "cuda:0")
            logger.info("neox-jax: device=%r not used: JAX runs on its default backend (%s)", device,
                        jax.default_backend())
        if isinstance(pretrained, NeoXModel):
            if dtype is not None and dtype != pretrained.dtype:
                raise ValueError(f"dtype={dtype!r} given with a model already loaded as {pretrained.dtype}")
            if quantize is not None and quantize != pretrained.quantize:
                raise ValueError(f"quantize={quantize!r} given with a model already loaded as {pretrained.quantize}")
            if tokenizer is None:
                raise ValueError("tokenizer= is required when pretrained is a loaded NeoXModel")
            self.model = pretrained
            self._tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        else:
            extra = {}
            if model_parallel or data_parallel:
                from .sharding import make_mesh

                extra["mesh"] = make_mesh(model=int(model_parallel or 1), data=int(data_parallel or 1))
            if not isinstance(tp_exact, bool):  # lm-eval passes model_args values it cannot parse as strings
                raise ValueError(f"tp_exact must be true or false, got {tp_exact!r}")
            self.model = load(pretrained, dtype=dtype, rotary_dtype=rotary_dtype, tokenizer=tokenizer,
                              revision=revision, tp_exact=tp_exact, quantize=quantize, **extra)
            if self.model.tokenizer is None:
                raise FileNotFoundError(f"{pretrained}: no tokenizer found (looked for tokenizer.json and "
                                        f"*tokenizer*.json beside the model): pass tokenizer=FILE in model_args")
            self._tok = self.model.tokenizer
        self._tokenizer_path = os.fspath(self._tok.path or "<object>")
        self.config = self.model.config
        if self._tok.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer has {self._tok.vocab_size} tokens, the model only {self.config.vocab_size}")
        if self._tok.eos_id is None:
            raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")

        limit = self.config.max_position_embeddings
        self._max_length = limit if max_length is None else int(max_length)
        if not 1 <= self._max_length <= limit:
            raise ValueError(f"max_length must be in [1, {limit}] (max_position_embeddings), got {max_length}")
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        data = self.model.mesh.shape[DATA]
        self._batch_size = -(-batch // data) * data
        self.scorer = Scorer(self.model)
        self.context_scorer = ContextScorer(self.model)
        self._warned_sampling = False

    # ---- lm-eval properties ----

    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id if self._prefix_token_id is None else self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return str(jax.devices()[0])

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_path.replace("/", "__")

    def get_model_info(self) -> dict:
        weights = jax.tree.leaves(self.model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
        n = sum(int(np.prod(x.shape)) for x in weights)  # a quantized weight's values, not its scales
        return {"model_num_parameters": n, "model_dtype": self.model.dtype, "model_quantize": self.model.quantize,
                "model_revision": "", "model_sha": ""}

    # ---- tokenisation ----

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self._tok.encode(string, add_special_tokens=add_special_tokens is not False)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def _eot_string(self) -> str:
        return self._tok.id_to_token(self.eot_token_id)

    # ---- scoring ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, desc: str = "Running loglikelihood requests"
                              ) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) or None, context_tokens, continuation_tokens)] ->
        [(log-prob of the continuation, whether greedy decoding produces it)], in the original order.

        Requests that share their context (multiple choice), when it fits without truncation, compute it once
        (`ContextScorer`: packed with their continuations when the row fits in max_length, else cached); the others
        are scored as whole rows (`Scorer`)."""
        limit = self.max_length
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("each request needs a non-empty context and continuation (after tokenisation)")
            if len(continuation) > limit:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={limit}")
            # A one-token context (an empty context's prefix token, a rolling window's first) saves nothing shared.
            if len(context) > 1 and len(context) + len(continuation) <= limit + 1:
                by_context.setdefault(tuple(context), []).append(i)
        shared = {context: users for context, users in by_context.items() if len(users) > 1}
        in_shared = {i for users in shared.values() for i in users}
        packed = {context: users for context, users in shared.items()
                  if packed_length(context, [requests[i][2] for i in users]) <= limit}

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc=desc)

        def record(i: int, logprob: float, is_greedy: bool):
            if not math.isfinite(logprob):
                raise FloatingPointError(f"request {i}: the continuation's log-likelihood is {logprob} (non-finite "
                                         f"logits: activations overflowing the dtype? try dtype=float32)")
            results[i] = (logprob, is_greedy)
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            pbar.update(1)

        self._score_rows(requests, [i for i in range(len(requests)) if i not in in_shared], record)
        self._score_packed(requests, packed, record)
        self._score_shared_contexts(requests, {c: users for c, users in shared.items() if c not in packed}, record)
        pbar.close()
        logger.debug("neox-jax scorers: %d compilations, %.1fs", self.compiles, self.compile_seconds)
        return results

    @property
    def compiles(self) -> int:
        return self.scorer.compiles + self.context_scorer.compiles

    @property
    def compile_seconds(self) -> float:
        return self.scorer.compile_seconds + self.context_scorer.compile_seconds

    def _score_rows(self, requests, indices: Sequence[int], record) -> None:
        """Each request as one row of context + continuation (left-truncated as HFLM does)."""
        limit = self.max_length
        row_of: dict[tuple[int, ...], int] = {}
        row_tokens: list[tuple[int, ...]] = []
        users: list[list[int]] = []  # request indices per row
        for i in indices:
            _, context, continuation = requests[i]
            # As HFLM: keep the last max_length + 1 tokens and feed all but the last.
            inp = tuple((list(context) + list(continuation))[-(limit + 1):][:-1])
            row = row_of.setdefault(inp, len(row_tokens))
            if row == len(row_tokens):
                row_tokens.append(inp)
                users.append([])
            users[row].append(i)
        # Longest first: the first batch shows the peak memory, and rows of a batch have similar lengths.
        order = Collator(list(enumerate(row_tokens)), sort_fn=lambda r: (-len(r[1]), r[1]))
        for chunk in order.get_batched(n=self.batch_size):
            # Always batch_size rows (padding rows are empty): one compilation per length bucket.
            first = [min(len(inp) - len(requests[i][2]) for i in users[row]) for row, inp in chunk]
            target_lp, greedy, last_lp = self.scorer([r for _, r in chunk], first, self.batch_size)
            for b, ((row, inp), offset) in enumerate(zip(chunk, first)):
                n = len(inp) - offset  # positions scored from `offset` on; the last is n - 1
                for i in users[row]:
                    continuation = requests[i][2]
                    start = n - len(continuation)  # first scored position of this request
                    logprob = math.fsum(target_lp[b, start:n - 1].tolist()) + float(last_lp[b, continuation[-1]])
                    is_greedy = bool(greedy[b, start:n - 1].all() and last_lp[b].argmax() == continuation[-1])
                    record(i, logprob, is_greedy)

    def _score_packed(self, requests, groups: dict[tuple[int, ...], list[int]], record) -> None:
        """Each context with its continuations in one row, in as few batches of at most batch_size rows as fit
        them, of equal row counts (`even_batch`; longest first: rows of a batch have similar lengths; a batch may
        run at a longer batch's length, `shared_lengths`); the positions these score through the head, HEAD_ROWS
        at a time."""
        continuations = {context: [requests[i][2] for i in users] for context, users in groups.items()}
        contexts = sorted(groups, key=lambda c: (-packed_length(c, continuations[c]), c))
        queue = HeadQueue(self.context_scorer)
        rows = even_batch(len(contexts), self.batch_size, self.model.mesh.shape[DATA])
        chunks = [contexts[start:start + rows] for start in range(0, len(contexts), rows)]
        lengths = shared_lengths([self.context_scorer.packed_shape(chunk, [continuations[c] for c in chunk], rows)
                                  for chunk in chunks])
        for chunk, length in zip(chunks, lengths):
            hidden = self.context_scorer.packed(chunk, [continuations[c] for c in chunk], rows, length)
            for context, states in zip(chunk, hidden):
                for i, positions in zip(groups[context], states):
                    queue.add(i, positions, requests[i][2])
            for i, logprob, greedy in queue.scored():
                record(i, logprob, greedy)
        for i, logprob, greedy in queue.scored(flush=True):
            record(i, logprob, greedy)

    def _score_shared_contexts(self, requests, shared: dict[tuple[int, ...], list[int]], record) -> None:
        """Each context once, batch_size contexts at a time; then their continuations against their cache, and
        the positions these score through the head, HEAD_ROWS at a time."""
        batch = self.batch_size
        contexts = sorted(shared, key=lambda c: (-len(c), c))
        slots = score_bucket(len(contexts[0])) if contexts else 0  # one cache size: fewer programs
        queue = HeadQueue(self.context_scorer)
        first: dict[int, tuple[float, bool]] = {}  # request -> (log-prob, greedy) of its first token

        def record_scored(flush: bool = False):
            for i, logprob, greedy in queue.scored(flush):
                first_lp, first_greedy = first.pop(i)
                record(i, first_lp + logprob, first_greedy and greedy)

        for start in range(0, len(contexts), batch):
            chunk = contexts[start:start + batch]
            cache, last_lp = self.context_scorer.contexts(chunk, batch, slots)  # last_lp scores each first token
            first_greedy = last_lp.argmax(-1)
            for row, context in enumerate(chunk):
                for i in shared[context]:
                    token = requests[i][2][0]
                    if len(requests[i][2]) == 1:
                        record(i, float(last_lp[row, token]), bool(first_greedy[row] == token))
                    else:
                        first[i] = (float(last_lp[row, token]), bool(first_greedy[row] == token))
            longer = sorted(((row, i) for row, context in enumerate(chunk) for i in shared[context]
                             if len(requests[i][2]) > 1), key=lambda r: -len(requests[r[1]][2]))
            for part in (longer[s:s + batch] for s in range(0, len(longer), batch)):
                hidden = self.context_scorer.continuations(
                    cache, [row for row, _ in part], [len(chunk[row]) for row, _ in part],
                    [requests[i][2] for _, i in part], batch)
                for (_, i), positions in zip(part, hidden):
                    queue.add(i, positions, requests[i][2][1:])
                record_scored()
        record_scored(flush=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of max_length, the first conditioned on the
        prefix token (as HFLM). All windows of all documents are batched together."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm,
                                            desc="Running loglikelihood_rolling windows")
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations through the JIT decoder, cut at the first `until` string (and <|endoftext|>)."""
        if not requests:
            return []
        eot = self._eot_string
        order = Collator([req.args for req in requests], sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                         group_by="gen_kwargs", group_fn=lambda x: x[1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests")
        res = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eot)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") and not self._warned_sampling:
                logger.warning("neox-jax: do_sample=True requested; neox-jax decodes greedily")
                self._warned_sampling = True
            if "max_length" in kwargs:
                logger.warning("neox-jax: `max_length` in gen_kwargs ignored; use max_gen_toks")
            max_context = self.max_length - max_gen_toks
            if max_context <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length="
                                 f"{self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=max_context) or [self.prefix_token_id] for c in contexts]
            outputs = self.model.generate(prompts, max_gen_toks, stop_token=self.eot_token_id)
            for tokens, context, gen_kwargs in zip(outputs, contexts, all_kwargs):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return order.get_original(res)
