// The activation-quantized matmul (`--quantize int8-dynamic`): each row of x quantized to int8 when the call
// runs, multiplied into the stored int8 weights with exact int32 sums, scaled once in fp32.
//
//   y[b, n] = (float(sum_k qx[b, k] * w[n, k]) * x_scale[b]) * w_scale[n]
//
// w8a8.cc quantizes x (one function for every instruction set, so they all see the same qx) and splits the
// output channels over the thread pool; tiles_w8a8.h holds the per-ISA dot products' shared loop.
#pragma once

#include <cstdint>

#include "matmul.h"
#include "xla/ffi/api/c_api.h"

namespace neox {

// Rows of x quantized, and the int8 weights. qx rows are zero-padded to `ldq` (a multiple of kQxAlign bytes),
// so every kernel reads whole vectors of x; the weights are read as stored ([n, k], row-major).
struct W8A8 {
  const int8_t* qx;       // [m, ldq], |qx| <= 127
  const int32_t* qx_sum;  // [m]: sum_k qx[b, k] (the VNNI kernel's offset correction, see w8a8_avx512.cc)
  const float* x_scale;   // [m]
  const int8_t* w;        // [n, k]
  const float* w_scale;   // [n]
  float* y;               // [m, n]
  int64_t m, n, k, ldq;
};

constexpr int64_t kQxAlign = 64;  // the widest vector's bytes (AVX-512)

// The int32 sums are exact while |sum_k qx * w| <= 127 * 128 * k < 2^31: k up to 2^17 (GPT-NeoX-20B's widest
// is 24576). Larger k is refused.
constexpr int64_t kMaxW8A8K = int64_t{1} << 17;

// Computes output channels [n_begin, n_end) of every row of `p.y`.
using W8A8Kernel = void (*)(const W8A8& p, int64_t n_begin, int64_t n_end);

// The fastest kernels this CPU runs: avx512 (with VNNI), avx2 or portable.
const char* best_w8a8_isa();

namespace avx512 { void w8a8_rows(const W8A8& p, int64_t n_begin, int64_t n_end); }
namespace avx2 { void w8a8_rows(const W8A8& p, int64_t n_begin, int64_t n_end); }
namespace portable { void w8a8_rows(const W8A8& p, int64_t n_begin, int64_t n_end); }

}  // namespace neox

// The FFI handler (w8a8.cc), handed to Python by cpu_kernels.cc's module.
extern "C" XLA_FFI_Error* NeoxInt8DynamicMatmul(XLA_FFI_CallFrame* call_frame);
