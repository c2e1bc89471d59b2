"""The Python entry point: `neox_jax.load(path)` -> a model holding config and params, ready to run."""

from __future__ import annotations

import numbers
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .checkpoints import Checkpoint, CheckpointError, open_checkpoint
from .config import NeoXConfig
from .decode import Compiled, Decoder, Generation, length_bucket
from . import quantize as quantization
from .dtypes import default_dtype, lookup
from .model import NeoX
from .sampling import Sampling
from .sharding import default_mesh, plan_memory, require_fit, to_host
from .speculative import DEFAULT_DRAFT_TOKENS, Speculator
from .streaming import STREAM_CHUNK, TextStream, stop_strings, stream_text
from .tokenizer import Tokenizer, check_vocabulary, checkpoint_dirs, find_tokenizer, load_tokenizer
from .weights import build_params, tp_ranks_of


class _TokenizerEndOfText:
    """The default stop token: the model's tokenizer's <|endoftext|> id (without a tokenizer, never stop)."""

    def __repr__(self) -> str:
        return "TOKENIZER_EOS"


TOKENIZER_EOS = _TokenizerEndOfText()
StopToken = int | None | _TokenizerEndOfText  # None: never stop


class NeoXModel:
    """Config plus params on device, with compiled entry points for logits and generation."""

    def __init__(self, config: NeoXConfig, params: dict, dtype: str = "float32", rotary_dtype: str | None = None,
                 tokenizer: Tokenizer | None = None, mesh: Mesh | None = None, quantize: str | None = None):
        lookup(dtype)  # refuses an unknown name
        quantization.lookup(quantize)
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.quantize = quantize  # how `params` holds the matmul weights (None: in `dtype`)
        self.tp_ranks = tp_ranks_of(params)  # exact tensor-parallel params: the ranks they keep (None: merged)
        self.module = NeoX(config, lookup(dtype).jax, lookup(rotary_dtype).jax if rotary_dtype else None,
                           self.tp_ranks)
        self.rotary_dtype = self.module.rotary_table_dtype.name
        self.decoder = Decoder(self.module, params, mesh)
        self.mesh = self.decoder.mesh
        self._speculators: dict = {}  # (draft, K) -> Speculator, so its compiled programs are reused
        self._logits = Compiled(self._logits_fn)
        self._hidden_states = Compiled(self._hidden_states_fn)

    def _logits_fn(self, params, tokens, positions):
        return self.module.apply({"params": params}, tokens, positions).logits

    def _hidden_states_fn(self, params, tokens, positions):
        return self.module.apply({"params": params}, tokens, positions,
                                 return_hidden_states=True).hidden_states.astype(jnp.float32)

    def _token_array(self, tokens) -> np.ndarray:
        """[B, T] token ids, checked: integers (never truncated floats or bools) within the vocabulary."""
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iuO" or (tokens.dtype.kind == "O" and not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens.flat)):
            raise TypeError(f"token ids must be integers, not {tokens.dtype} (a float would be truncated)")
        if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be [batch, length] with batch and length >= 1, got shape {tokens.shape}")
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context of {self.config.max_position_embeddings}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return tokens.astype(np.int32)  # in range: exact

    def _run(self, compiled: Compiled, tokens: np.ndarray) -> jax.Array:
        """Run on checked [B, T] tokens right-padded to buckets (nearby shapes share one compilation)."""
        batch, length = tokens.shape
        padded = np.zeros((self.decoder.batch_size(batch), length_bucket(length)), np.int32)
        positions = np.full(padded.shape, -1, np.int32)  # padding is never attended to
        padded[:batch, :length] = tokens
        positions[:batch, :length] = np.arange(length)
        return compiled(self.params, self.decoder.place_rows(padded), self.decoder.place_rows(positions))

    def logits(self, tokens) -> np.ndarray:
        """[B, T] token ids -> fp32 logits [B, T, V] over the (padded) vocabulary."""
        tokens = self._token_array(tokens)
        batch, length = tokens.shape
        return to_host(self._run(self._logits, tokens))[:batch, :length]

    def hidden_states(self, tokens) -> np.ndarray:
        """[B, T] -> fp32 residual stream after the embedding and after each layer, [L + 1, B, T, D]."""
        tokens = self._token_array(tokens)
        batch, length = tokens.shape
        return to_host(self._run(self._hidden_states, tokens))[:, :batch, :length]

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_token: StopToken = TOKENIZER_EOS, stop: Sequence[str] = (), draft=None,
                 num_draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> list[list[int]] | list[str]:
        """Continue each prompt: greedy unless a temperature is given, ending before `stop_token` (by default
        the tokenizer's <|endoftext|>; None: never).

        Token-id prompts return new token ids; text prompts (which need `self.tokenizer`) return the
        completion text, cut before the first of the `stop` strings.

        `draft`: speculative decoding (docs/speculative.md) with a smaller model of the same tokenizer (a
        NeoXModel) or "ngram" (prompt lookup), `num_draft_tokens` proposed per target pass. Greedy output is
        the same tokens; sampled output has the same distribution.
        """
        sampling = Sampling.create(temperature, top_k, top_p, seed)
        prompts, single = prompt_batch(prompts)
        stop = stop_strings(stop)  # a bare string is one stop string, not one per character
        if prompts and isinstance(prompts[0], str):
            texts = ["".join(parts) for parts in zip(*self.stream(
                prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop_token=stop_token, stop=stop, draft=draft, num_draft_tokens=num_draft_tokens))]
            return texts[0] if single else texts
        if stop:
            raise ValueError("stop strings need text prompts (and a tokenizer): pass strings, not token ids")
        decoder = self.decoder_for(draft, num_draft_tokens)
        return decoder.generate(prompts, max_new_tokens, sampling, stop_token=self.stop_id(stop_token)).tokens

    def stream(self, prompts: Sequence[str], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_token: StopToken = TOKENIZER_EOS, stop: Sequence[str] = (),
               chunk: int | None = STREAM_CHUNK, timing: Generation | None = None, draft=None,
               num_draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Iterator[list[str]]:
        """Yield the newly generated text of every prompt, `chunk` decode steps (with a draft: target passes)
        at a time; the sampling and draft keywords are generate()'s, and the chunks joined are exactly
        generate()'s text."""
        sampling = Sampling.create(temperature, top_k, top_p, seed)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: load(..., tokenizer=PATH) or set model.tokenizer")
        prompts, _ = prompt_batch(prompts)
        if prompts and not isinstance(prompts[0], str):
            raise TypeError("stream() takes text prompts; generate() also takes token ids")
        ids = [self.tokenizer.encode(p) for p in prompts]
        stop = stop_strings(stop)
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        decoder = self.decoder_for(draft, num_draft_tokens)
        return stream_text(decoder, streams, ids, max_new_tokens, sampling=sampling,
                           stop_token=self.stop_id(stop_token), chunk=chunk, timing=timing)

    def generate_timed(self, prompts, max_new_tokens: int, sampling: Sampling | None = None,
                       stop_token: StopToken = TOKENIZER_EOS, draft=None,
                       num_draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Generation:
        """Token ids in, a Generation out (with a draft: a SpeculativeGeneration, with the acceptance rate)."""
        return self.decoder_for(draft, num_draft_tokens).generate(prompts, max_new_tokens, sampling,
                                                                  stop_token=self.stop_id(stop_token))

    def decoder_for(self, draft, num_draft_tokens: int):
        """The plain decoder (no draft), or the speculative one for this draft and K, made once."""
        if draft is None:
            return self.decoder
        key = (id(draft), num_draft_tokens)
        if key not in self._speculators:
            self._speculators[key] = (draft, Speculator(self, draft, num_draft_tokens))  # keeps `draft` alive
        return self._speculators[key][1]

    def stop_id(self, stop_token: StopToken) -> int | None:
        """The token id that ends a row, or None for never: TOKENIZER_EOS is the tokenizer's <|endoftext|>."""
        if stop_token is TOKENIZER_EOS:
            return None if self.tokenizer is None else self.tokenizer.eos_id
        return stop_token


def prompt_batch(prompts) -> tuple[list[str] | list[list[int]], bool]:
    """-> (a list of text prompts or of token-id lists, whether one bare string was given).

    A bare string is one prompt (not one per character); ids must be integers (a float would be truncated)."""
    if isinstance(prompts, str):
        return [prompts], True
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Sequence | np.ndarray):
        raise TypeError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                        f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if all(isinstance(p, str) for p in prompts):
        return prompts, False
    batch = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) or not isinstance(prompt, Sequence | np.ndarray):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}: a batch is all strings or all token-id "
                            f"lists, not a mix")
        if isinstance(prompt, np.ndarray):
            bad = None if prompt.ndim == 1 and prompt.dtype.kind in "iu" else f"an array of {prompt.dtype}"
        else:
            bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
        if bad is not None:
            raise TypeError(f"prompt {i}: token ids must be integers, got {bad!r}")
        batch.append([int(t) for t in prompt])
    return batch, False


def load(path: str | os.PathLike, dtype: str | None = None, rotary_dtype: str | None = None,
         tokenizer: str | os.PathLike | None = None, mesh: Mesh | None = None, progress: bool = True,
         config: NeoXConfig | str | os.PathLike | None = None, revision: str | None = None,
         tp_exact: bool = False, quantize: str | None = None) -> NeoXModel:
    """Load a Hugging Face GPT-NeoX directory, GPT-NeoX DeepSpeed shards (merged while streaming), or a
    model id on the Hugging Face hub (`"EleutherAI/pythia-410m"`, at `revision`: a branch, tag or commit),
    through huggingface_hub's cache (`HF_HOME`; `HF_HUB_OFFLINE=1`: the cache only).

    The tokenizer is `tokenizer` if given, else the checkpoint's `tokenizer.json`, else its one
    `*tokenizer*.json` (as `20B_tokenizer.json` beside the slim weights), if there is one. The
    params are split over `mesh` (`sharding.make_mesh(model=N, data=M)`); by default one device, or all
    local devices on the model axis when the weights do not fit on one. `config` (a NeoXConfig, e.g.
    `PRESETS["gpt-neox-20b"]`, or a NeoX YAML) describes DeepSpeed shards that carry no `configs/*.yml`.

    `tp_exact`: DeepSpeed shards only. Keep every tensor-parallel rank's LayerNorm copies and row-parallel
    biases and compute as the ranks did in training (see `neox_jax.model`), instead of merging them into
    one model; the mesh's model axis must divide the rank count. A 1-rank checkpoint has nothing to merge:
    its model is the same either way. Raises CheckpointError for a Hugging Face directory or hub id.

    `quantize` ("int8", "fp8" or "int8-dynamic") stores every matmul weight in that format (int8-dynamic: int8,
    its matmuls quantizing their activations too) with a scale per output channel,
    quantized tensor by tensor while loading (docs/quantization.md); merged mode only.
    """
    quantization.lookup(quantize)  # an unknown mode fails before the checkpoint is opened
    checkpoint = open_checkpoint(path, config, revision)
    return load_checkpoint(checkpoint, dtype, rotary_dtype, tokenizer, mesh, progress,
                           exact_ranks(checkpoint, tp_exact), quantize)


def exact_ranks(checkpoint: Checkpoint, tp_exact: bool) -> int | None:
    """The rank count the exact tensor-parallel mode keeps for `checkpoint` (None: merged).

    A 1-rank checkpoint loads merged: with one copy of everything the two modes are one model, and the
    merged params run the programs every other path uses. Only DeepSpeed shards hold per-rank copies."""
    if not tp_exact:
        return None
    ranks = getattr(checkpoint, "ranks", None)
    if ranks is None:
        raise CheckpointError(f"{checkpoint.path}: the exact tensor-parallel mode (--tp-exact) needs GPT-NeoX "
                              f"DeepSpeed shards; a Hugging Face directory holds one merged copy of each LayerNorm "
                              f"and row-parallel bias, not each rank's")
    return ranks if ranks > 1 else None


def load_checkpoint(checkpoint: Checkpoint, dtype: str | None = None, rotary_dtype: str | None = None,
                    tokenizer: Tokenizer | str | os.PathLike | None = None, mesh: Mesh | None = None,
                    progress: bool = True, tp_ranks: int | None = None, quantize: str | None = None) -> NeoXModel:
    """`tp_ranks`: `exact_ranks(checkpoint, True)`, for the exact tensor-parallel mode (None: merged)."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (neox_jax.sharding.make_mesh(model=N, data=M)), "
                        f"got {type(mesh).__name__} {mesh!r:.40}")
    dtype = dtype or default_dtype()
    jax_dtype = lookup(dtype).jax
    quantization.lookup(quantize)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = find_tokenizer(tokenizer, *checkpoint_dirs(checkpoint))
        tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
    if tokenizer is not None:
        check_vocabulary(tokenizer, checkpoint.config.vocab_size)
    mesh = mesh or default_mesh(checkpoint.config, jax_dtype, quantize)
    require_fit(plan_memory(checkpoint.config, jax_dtype, mesh, tp_ranks=tp_ranks, quantize=quantize),
                checkpoint.config, mesh, 0, 0)
    tensors = checkpoint.per_rank_tensors() if tp_ranks else checkpoint.tensors(dtype=jax_dtype)
    params = build_params(checkpoint.config, tensors, jax_dtype, mesh, progress=progress, tp_ranks=tp_ranks,
                          quantize=quantize)
    return NeoXModel(checkpoint.config, params, dtype, rotary_dtype, tokenizer, mesh, quantize)
