// Arithmetic in GCC's portable vector types, shared by the epilogue (cpu_kernels.cc) and the attention kernels
// (attention_tiles.h): each lane is the same IEEE operations as one scalar, so every width and machine gives the
// same bits, and the loops need no auto-vectorizer. 4 lanes is the baseline ISA's width, 8 AVX2's, 16 AVX-512's
// (compiled inside functions that enable them).
#pragma once

#include <cstdint>
#include <cstring>

namespace neox {

using F4 = float __attribute__((vector_size(16)));
using I4 = int32_t __attribute__((vector_size(16)));
using F8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));
using F16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));
#define NEOX_INLINE [[gnu::always_inline]] inline

// x = e^x for x <= 0 (callers zero x < -88.72 themselves), within ~1 ulp: x = n ln 2 + r, |r| <= ln 2 / 2 (n rounded
// to nearest by adding 1.5 * 2^23, under the thread's default rounding), e^r by Cephes' expf polynomial, 2^n built
// in the exponent bits, in two factors where 2^n alone would not be a normal float. (In place, as gelu_exact: GCC
// warns of the ABI of a 32-byte vector returned by value without AVX, though these are always inlined; so is
// memcpy for std::bit_cast.)
template <class F, class I>
NEOX_INLINE void exp_nonpositive(F& x) {
  x = x < -88.8f ? (F{} + -88.8f) : x;
  const F n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  F r = x - n * 0.693359375f;  // ln 2 in two parts (Cephes' C1, C2)
  r = r - n * -2.12194440e-4f;
  F p = (F{} + 1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  const F er = p * (r * r) + r + 1.0f;
  const I k = __builtin_convertvector(n, I);  // in [-128, 0]
  const I low = k < -125 ? (I{} + 64) : (I{} + 0);  // 2^k = 2^(k + low) * 2^-low, each a normal float
  const I exponent = (k + low + 127) << 23;
  F scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  x = er * scale * (low != 0 ? (F{} + 0x1p-64f) : (F{} + 1.0f));
}

}  // namespace neox
