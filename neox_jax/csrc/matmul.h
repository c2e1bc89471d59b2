// The weight-only matmul's problem and the per-ISA row kernels (one translation unit each, compiled for its
// instruction set; cpu_kernels.cc picks one at run time).
#pragma once

#include <cstdint>
#include <string_view>

namespace neox {

enum class WeightType { kInt8, kFp8E4M3, kFp32 };

// An fp8 e4m3fn value (1 sign, 4 exponent bits biased by 7, 3 mantissa bits; finite values only: quantized
// weights are clipped to +-448).
struct Fp8 {
  uint8_t bits;
};

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]: x fp32 [m, k], w [n, k] (row-major, as stored), y fp32 [m, n];
// no scale (nullptr) for fp32 weights.
struct Matmul {
  const float* x;
  const void* w;
  WeightType w_type;
  const float* scale;  // nullptr: none
  float* y;
  int64_t m, n, k;
};

// What a call applies to its outputs after the matmul (and scale), on the thread that computed them while they are
// in cache: y[b, j] += bias[j], then with `gelu` y = GELU(y), the exact (erf) form as XLA computes jax.nn.gelu:
// 0.5 * y * erfc(-y / sqrt 2) by chlo's erfc polynomials (neox_jax.cpu_kernels.xla_epilogue is its definition).
// Saves the decode step an XLA fusion after the MLP's up-projection, which XLA splits over two threads while
// the pool's workers still hold the cores.
struct Epilogue {
  const float* bias;  // [n], or nullptr: none
  bool gelu;
};

// Whether a call's bias operand has the shape it must: [n], or [0] for no bias.
template <class Dims>
bool bias_fits(const Dims& bias_dims, int64_t n) {
  return bias_dims.size() == 1 && (bias_dims[0] == n || bias_dims[0] == 0);
}

// Applies `e` to output channels [begin, end) of every row of y [m, n]: plain fp32 operations (no FMA) at the
// vector width the CPU allows, each lane the same operations, so its bits depend neither on the width nor on the
// kernels' instruction set (cpu_kernels.cc).
void apply_epilogue(const Epilogue& e, float* y, int64_t m, int64_t n, int64_t begin, int64_t end);

// Computes output channels [n_begin, n_end) of every row of `p.y`.
using RowsKernel = void (*)(const Matmul& p, int64_t n_begin, int64_t n_end);

namespace avx512 { void rows(const Matmul& p, int64_t n_begin, int64_t n_end); }
namespace avx2 { void rows(const Matmul& p, int64_t n_begin, int64_t n_end); }
namespace portable { void rows(const Matmul& p, int64_t n_begin, int64_t n_end); }

// Whether this CPU runs the kernels of `isa` ("avx512", "avx2" or "portable").
bool cpu_has(std::string_view isa);

// Prefetch distance up to which the kernels' lines go into L1 (its size); beyond, into L2. Lines prefetched into
// L1 that far ahead evict the tile's own before it has used them: int8 [8192, 8192] at batch 1 (tiles of 64 KiB)
// streamed 12.8 GB/s on one core prefetching into L1, 25.6 into L2; [50304, 512] (tiles of 4 KiB) 24.1 and 20.3.
// At exactly that distance (two tiles of 16 KiB) the weight's type decides, as measured on the 2-core AMD EPYC
// (Zen 4) at batch 1, one thread, chains of calls whose weights come from memory: int8 streamed 13.6-13.9 GB/s into
// L1 and 22.3-23.5 into L2 ([512, 2048] by AVX-512's 8 channels: Pythia-70M's MLP down-projection), 11.8-12.2 and
// 24.7-25.0 ([1024, 4096] by AVX2's 4: Pythia-410M's); fp32 [2048, 512] (AVX-512) 22.4-23.9 into L1, 18.7-21.7
// into L2; int8-dynamic's tiles (tiles_w8a8.h) at batch 8, [1024, 4096] by AVX-512's 4 channels x 4 rows: 10.0-10.3
// into L1, 15.9-16.3 into L2. A likely reason: at the same distance a 1-byte weight's k is 4x fp32's, and so are the
// x rows that stay in L1 beside the prefetched lines (fp32 x: 8 KiB against 2 KiB; int8 qx, 4 rows: 16 KiB).
constexpr int64_t kL1PrefetchBytes = 32 * 1024;
constexpr bool prefetch_into_l1(int64_t distance, int64_t weight_bytes) {
  return weight_bytes == 4 ? distance <= kL1PrefetchBytes : distance < kL1PrefetchBytes;
}

// Output channels handled together by every kernel (a task's channel range is a multiple of it, but the last).
constexpr int64_t kChannelBlock = 8;

}  // namespace neox
