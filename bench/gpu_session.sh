#!/usr/bin/env bash
# The project's GPU checks, prepared for a session that is lent a GPU machine (see docs/gpu.md).
# The device image already has jax (CUDA), torch (CUDA), flax, transformers, tokenizers and pytest, so this
# runs from the working tree without installing. Two stages, each one `run` call well inside 10 minutes:
#   bash bench/gpu_session.sh checks   # test suite on CUDA, 20B compile time, fp16 parity (~4-5 min)
#   bash bench/gpu_session.sh bench    # python -m bench.gpu at GPT-NeoX-20B shapes       (< 8 min)
# Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PY=python3

"$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
  2>&1 | tee "$OUT/env.txt"

case "${1:-}" in
checks)
  # Modules whose numerics and compilation could differ on GPU; lm-eval is not installed there (skips).
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_decode.py tests/test_sampling.py \
    tests/test_streaming.py tests/test_hf_checkpoint.py tests/test_parity_model.py 2>&1 | tee "$OUT/pytest.txt"
  # GPT-NeoX-20B's prefill and decode programs compiled from abstract shapes (the layers are unrolled).
  timeout 120 "$PY" -m bench.compile 2>&1 | tee "$OUT/compile.txt"
  # fp16 parity on CUDA: a synthetic 2-rank DeepSpeed checkpoint, 8 layers of hidden 1024, 16 heads.
  "$PY" - <<'EOF' 2>&1 | tee "$OUT/make_ckpt.txt"
import numpy as np
from neox_jax.config import NeoXConfig
from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint
from neox_jax.tokenizer import demo_tokenizer
from neox_jax.checkpoints.synthetic import random_tensors
config = NeoXConfig(vocab_size=50432, hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=4096)
# Decisive weights, as a trained model's: attention scores and logits with a std of ~3, not near-uniform.
tensors = random_tensors(config)
d = config.hidden_size
for name in tensors:
    if name.endswith("query_key_value.weight"):
        tensors[name] *= 1.7 / np.sqrt(d) / 0.02
    elif name == "embed_out.weight":
        tensors[name] *= 3 / np.sqrt(d) / 0.02
write_deepspeed_checkpoint("/tmp/parity_ckpt", config, tensors, ranks=2, dtype=np.float16)
demo_tokenizer()._tokenizer.save("/tmp/parity_tokenizer.json")
EOF
  for dtype in float16 float32; do
    timeout 150 "$PY" -m parity.check --checkpoint /tmp/parity_ckpt --tokenizer /tmp/parity_tokenizer.json \
      --dtype "$dtype" --per-layer --json "$OUT/parity_$dtype.json" 2>&1 | tee "$OUT/parity_$dtype.txt"
  done
  ;;
bench)
  timeout 540 "$PY" -m bench.gpu --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
  ;;
*)
  echo "usage: bash bench/gpu_session.sh checks|bench" >&2
  exit 2
  ;;
esac
