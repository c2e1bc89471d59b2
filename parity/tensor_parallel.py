"""GPT-NeoX's tensor-parallel forward pass, run as R processes with `torch.distributed`: the computation the
DeepSpeed checkpoints were trained and evaluated with, not a merge of them.

Each process is one tensor-parallel rank and reads only its own shard files
(`layer_{idx:02d}-model_{rank:02d}-model_states.pt`). It computes as Megatron's layers in GPT-NeoX did:

* VocabParallelEmbedding: each rank looks up the tokens in its block of the vocabulary (zeros elsewhere), and
  the ranks' lookups are all-reduced;
* ColumnParallelLinear (`query_key_value`, `dense_h_to_4h`): each rank multiplies its own LayerNorm output
  (its own copy of the LayerNorm) by its block of output rows, with its block of the bias: whole heads for
  QKV, whose attention runs on that rank only;
* RowParallelLinear (`attention.dense`, `dense_4h_to_h`): each rank multiplies its block of input columns,
  giving a partial sum; the bias is returned apart (`skip_bias_add`). Under the parallel (GPT-J) residual
  each rank adds its own attention and MLP biases to its two partials, and one all-reduce sums both branches
  (`residual + reduce(attn + attn_bias + mlp + mlp_bias)`); under the sequential residual each partial is
  all-reduced and then the rank's own bias copy is added;
* the final LayerNorm copy of each rank feeds its own vocabulary block of the output layer (parallel output),
  and the logits are gathered.

The ranks are joined with the gloo backend on CPU through a rendezvous file (no network port). Rank 0 writes
the logits, optional hidden states (its own residual stream) and greedy continuations, which `run` returns.
Shares no code with `neox_jax` beyond the config dataclass; the rotary tables are `parity.model`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neox_jax.config import NeoXConfig

from .load import IGNORED_LAYER_KEYS, LoadError, _load_shard, find_step_dir, num_ranks
from .model import apply_rotary, greedy, rotary_tables

TIMEOUT = datetime.timedelta(minutes=30)  # a collective no rank reaches (a crashed peer) fails after this


def local_shapes(config: NeoXConfig, ranks: int) -> dict[str, tuple[int, ...]]:
    """One rank's tensors of a transformer layer and their shapes, as GPT-NeoX's parallel layers hold them."""
    d, f = config.hidden_size, config.intermediate_size
    return {
        "input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
        "post_attention_layernorm.weight": (d,), "post_attention_layernorm.bias": (d,),
        "attention.query_key_value.weight": (3 * d // ranks, d), "attention.query_key_value.bias": (3 * d // ranks,),
        "attention.dense.weight": (d, d // ranks), "attention.dense.bias": (d,),
        "mlp.dense_h_to_4h.weight": (f // ranks, d), "mlp.dense_h_to_4h.bias": (f // ranks,),
        "mlp.dense_4h_to_h.weight": (d, f // ranks), "mlp.dense_4h_to_h.bias": (d,),
    }


class Rank:
    """One tensor-parallel rank's weights and forward pass."""

    def __init__(self, step_dir: Path, config: NeoXConfig, rank: int, ranks: int, dtype: torch.dtype):
        self.config, self.rank, self.ranks, self.dtype = config, rank, ranks, dtype
        d, L = config.hidden_size, config.num_layers

        def stage(idx: int, expected: dict[str, tuple[int, ...]], ignored=()) -> dict[str, torch.Tensor]:
            f = step_dir / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"
            if not f.exists():
                raise LoadError(f"{f}: missing shard")
            state = _load_shard(f)
            extra = sorted(set(state) - set(expected) - set(ignored))
            if extra:
                raise LoadError(f"{f}: unexpected tensor {extra[0]!r}")
            out = {}
            for key, shape in expected.items():
                if key not in state:
                    raise LoadError(f"{f}: no tensor {key!r}")
                if tuple(state[key].shape) != shape:
                    raise LoadError(f"{f} [{key}]: shape {tuple(state[key].shape)}, rank {rank} of {ranks} "
                                    f"expects {shape}")
                out[key] = state[key].to(dtype)
            return out

        vocab = config.vocab_size // ranks
        self.embed = stage(0, {"word_embeddings.weight": (vocab, d)})["word_embeddings.weight"]
        self.layers = [stage(i + 2, local_shapes(config, ranks), IGNORED_LAYER_KEYS) for i in range(L)]
        norm = stage(L + 3, {"norm.weight": (d,), "norm.bias": (d,)})
        self.norm = (norm["norm.weight"], norm["norm.bias"])
        self.head = self.embed if config.tie_word_embeddings else \
            stage(L + 4, {"final_linear.weight": (vocab, d)})["final_linear.weight"]
        self.cos, self.sin = rotary_tables(config.rotary_dim, config.rotary_base, config.max_position_embeddings,
                                           dtype, "cpu")

    def layer_norm(self, x, weight, bias):
        return F.layer_norm(x, (self.config.hidden_size,), weight, bias, self.config.layer_norm_eps)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """VocabParallelEmbedding: this rank's rows for the tokens in its block, zeros for the others, summed."""
        rows = self.embed.shape[0]
        local = tokens - self.rank * rows
        outside = (local < 0) | (local >= rows)
        x = F.embedding(local.clamp(0, rows - 1), self.embed)
        x[outside] = 0
        return self.all_reduce(x)

    def attention(self, w: dict, x, cache: list, start: int):
        """This rank's heads from its LayerNorm output x [B, T, D] -> its partial output [B, T, D] (no bias)."""
        b, t, _ = x.shape
        heads, hd = self.config.num_heads // self.ranks, self.config.head_dim
        qkv = F.linear(x, w["attention.query_key_value.weight"], w["attention.query_key_value.bias"])
        q, k, v = qkv.view(b, t, heads, 3, hd).unbind(dim=3)  # head-major rows, this rank's heads
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, hd]
        if cache[0] is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        cache[0], cache[1] = k, v
        s = k.shape[2]
        scores = torch.baddbmm(torch.empty(b * heads, t, s, dtype=q.dtype), q.reshape(b * heads, t, hd),
                               k.reshape(b * heads, s, hd).transpose(1, 2), beta=0.0,
                               alpha=1.0 / math.sqrt(hd)).view(b, heads, t, s)
        causal = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        probs = torch.softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, heads * hd)
        return F.linear(out, w["attention.dense.weight"])

    def mlp(self, w: dict, x):
        """This rank's MLP columns from its LayerNorm output -> its partial output (no bias)."""
        approximate = "tanh" if self.config.activation == "gelu_tanh" else "none"
        h = F.gelu(F.linear(x, w["mlp.dense_h_to_4h.weight"], w["mlp.dense_h_to_4h.bias"]), approximate=approximate)
        return F.linear(h, w["mlp.dense_4h_to_h.weight"])

    def layer(self, w: dict, x, cache: list, start: int):
        ln1 = self.layer_norm(x, w["input_layernorm.weight"], w["input_layernorm.bias"])
        if self.config.parallel_residual:
            # ParallelTransformerLayer with gpt_j_residual: both branches and both of this rank's biases go
            # into one all-reduce, then the residual: attention_output + (mlp_output + mlp_bias).
            attn = self.attention(w, ln1, cache, start) + w["attention.dense.bias"]
            ln2 = self.layer_norm(x, w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"])
            out = attn + (self.mlp(w, ln2) + w["mlp.dense_4h_to_h.bias"])
            return x + self.all_reduce(out)
        h = x + (self.all_reduce(self.attention(w, ln1, cache, start)) + w["attention.dense.bias"])
        ln2 = self.layer_norm(h, w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"])
        return h + (self.all_reduce(self.mlp(w, ln2)) + w["mlp.dense_4h_to_h.bias"])

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, caches: list[list], start: int, hidden: list | None = None):
        """tokens [B, T] at positions start.. -> logits [B, T, V] (gathered from every rank's block)."""
        x = self.embedding(tokens)
        if hidden is not None:
            hidden.append(x.clone())
        for w, cache in zip(self.layers, caches):
            x = self.layer(w, x, cache, start)
            if hidden is not None:
                hidden.append(x.clone())
        local = F.linear(self.layer_norm(x, *self.norm), self.head)  # [B, T, V / ranks]
        blocks = [torch.empty_like(local) for _ in range(self.ranks)]
        dist.all_gather(blocks, local.contiguous())
        return torch.cat(blocks, dim=-1)

    def new_caches(self) -> list[list]:
        return [[None, None] for _ in self.layers]

    def greedy(self, ids: list[int], new_tokens: int, stop_token: int | None) -> tuple[list[int], list[float]]:
        """Greedy continuation with a KV cache -> the new tokens (ending before the stop token) and each step's
        top-1 minus top-2 logit in fp32. Every rank runs the same steps (the collectives need all of them)."""
        caches, start = self.new_caches(), 0

        def next_logits(ids: list[int]) -> torch.Tensor:
            nonlocal start
            logits = self.forward(torch.tensor([ids]), caches, start)[0, -1]
            start += len(ids)
            return logits

        return greedy(next_logits, ids, new_tokens, stop_token)


@dataclasses.dataclass
class Request:
    step_dir: Path
    config: NeoXConfig
    ranks: int
    dtype: torch.dtype
    prompts: list[list[int]]
    new_tokens: list[int]
    stop_token: int | None
    per_layer: bool
    workdir: Path  # rendezvous file, results, errors


def _worker(rank: int, request: Request) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // request.ranks))
    dist.init_process_group("gloo", init_method=f"file://{request.workdir / 'rendezvous'}", rank=rank,
                            world_size=request.ranks, timeout=TIMEOUT)
    try:
        try:
            model, error = Rank(request.step_dir, request.config, rank, request.ranks, request.dtype), ""
        except LoadError as e:
            model, error = None, str(e)
        # Every rank learns whether all loaded, so that none waits in a collective for a rank that stopped.
        failed = torch.tensor([float(bool(error))])
        dist.all_reduce(failed)
        if error:
            (request.workdir / f"error-{rank}").write_text(error)
        if failed.item():
            return
        out = {"logits": [], "hidden": [] if request.per_layer else None, "continuations": [], "margins": []}
        for ids, n in zip(request.prompts, request.new_tokens):
            hidden = [] if request.per_layer else None
            logits = model.forward(torch.tensor([ids]), model.new_caches(), 0, hidden)
            out["logits"].append(logits[0].float())
            if hidden is not None:
                out["hidden"].append(torch.stack(hidden)[:, 0])
            tokens, margins = model.greedy(ids, n, request.stop_token) if n else ([], [])
            out["continuations"].append(tokens)
            out["margins"].append(margins)
        if rank == 0:
            torch.save(out, request.workdir / "result.pt")
    except Exception:
        (request.workdir / f"error-{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run(path: str | Path, config: NeoXConfig, dtype: torch.dtype, prompts: list[list[int]], new_tokens: list[int],
        stop_token: int | None, per_layer: bool = False) -> dict:
    """Run the prompts through the checkpoint's R ranks as R processes -> rank 0's results: "logits" (per
    prompt [T, V] fp32), "hidden" ([L + 1, T, D] per prompt, with `per_layer`), "continuations" and
    "margins" (greedy, as `parity.model.GPTNeoX.generate`). Raises LoadError naming the file at fault."""
    import torch.multiprocessing as mp

    step_dir = find_step_dir(path)
    ranks = num_ranks(step_dir)
    for what, size in (("num_heads", config.num_heads), ("intermediate_size", config.intermediate_size),
                       ("vocab_size", config.vocab_size)):
        if size % ranks:
            raise LoadError(f"{step_dir}: {what} {size} does not split over its {ranks} tensor-parallel ranks")
    with tempfile.TemporaryDirectory(prefix="parity-tp-") as workdir:
        request = Request(step_dir, config, ranks, dtype, prompts, new_tokens, stop_token, per_layer, Path(workdir))
        try:
            mp.start_processes(_worker, args=(request,), nprocs=ranks, join=True, start_method="spawn")
            died = None
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            died = e  # a raised exception's message is in its error file too
        errors = sorted(Path(workdir).glob("error-*"))
        if errors:
            raise LoadError(errors[0].read_text().strip().splitlines()[-1])
        if died is not None:
            raise RuntimeError(f"a tensor-parallel reference process stopped: {died}")
        return torch.load(Path(workdir) / "result.pt", weights_only=True)
