// The decode step's attention over a KV cache (neox_jax.model.attend is the definition) and the per-ISA kernels
// (attention_tiles.h, compiled into each kernels_*.cc; cpu_kernels.cc picks one at run time).
#pragma once

#include <cstdint>

namespace neox {

// Keys and values at `slots` slots, [B, N, slots, H] each, and their positions [B, slots] (-1: empty).
struct KeyPart {
  const float* k;
  const float* v;
  const int32_t* positions;
  int64_t slots;
};

// out[b, n, t] = softmax over both parts' keys visible from query t (0 <= key position <= the query's) of
// q[b, n, t] . k / sqrt(H), times the values; a query that sees no key averages every value, as the XLA path's
// all-masked row does. q, out [B, N, T, H]; query_positions [B, T]. The parts are the cache and the new tokens.
struct DecodeAttention {
  const float* q;
  const int32_t* query_positions;
  KeyPart parts[2];
  float* out;
  int64_t b, n, t, h;
};

// Computes the (batch, head) pairs [begin, end) of `p.out`, pair i being batch i / N, head i % N.
using AttendKernel = void (*)(const DecodeAttention& p, int64_t begin, int64_t end);

namespace avx512 { void attend(const DecodeAttention& p, int64_t begin, int64_t end); }
namespace avx2 { void attend(const DecodeAttention& p, int64_t begin, int64_t end); }
namespace portable { void attend(const DecodeAttention& p, int64_t begin, int64_t end); }

}  // namespace neox
