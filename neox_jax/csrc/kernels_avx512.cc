// The row kernels and the decode attention (attention_tiles.h) for AVX-512 (F, BW, VL, DQ) with FMA: 16 floats
// per vector.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "matmul.h"
#include "vector_math.h"

#define NEOX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace neox::avx512 {
namespace {

struct Isa {
  using V = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kTileR1 = 8;  // decode: 8 independent accumulators hide the FMA latency
  static constexpr int kTileR = 4, kTileB = 4;  // 16 accumulators + 4 weight and 4 x vectors of 32 registers

  NEOX_TARGET static V zero() { return _mm512_setzero_ps(); }
  NEOX_TARGET static V load_x(const float* p) { return _mm512_loadu_ps(p); }
  NEOX_TARGET static V load_w(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  NEOX_TARGET static V load_w(const Fp8* p) {
    // Normal values: the 7 magnitude bits shifted into fp32's exponent and mantissa, the exponent rebiased
    // (127 - 7); subnormals (exponent 0): mantissa * 2^-9. Integer arithmetic, so no denormal-flushing mode
    // of the thread can change the result.
    const __m512i bits = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x80)), 24);
    const __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(magnitude, 20), _mm512_set1_epi32(120 << 23));
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.0f / 512));
    const __mmask16 is_normal = _mm512_cmpge_epi32_mask(magnitude, _mm512_set1_epi32(8));
    const __m512 value = _mm512_mask_blend_ps(is_normal, subnormal, _mm512_castsi512_ps(normal));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
  }
  NEOX_TARGET static V load_w(const float* p) { return _mm512_loadu_ps(p); }
  NEOX_TARGET static V fma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
  NEOX_TARGET static float sum(V v) {
    const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
  }
  NEOX_TARGET static V broadcast(float x) { return _mm512_set1_ps(x); }
  NEOX_TARGET static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  // out[g] = sum(v[g]) for 4 vectors at once, each lane's additions paired as sum's (the same bits).
  NEOX_TARGET static void sum4(const V (&v)[4], float* out) {
    const V lo01 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), hi01 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
    const V lo23 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), hi23 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
    const V eight01 = _mm512_add_ps(lo01, hi01), eight23 = _mm512_add_ps(lo23, hi23);  // [v0's 8 | v1's 8] ...
    const V four = _mm512_add_ps(_mm512_shuffle_f32x4(eight01, eight23, 0x88),  // 128-bit lanes: v0..v3's 4
                                 _mm512_shuffle_f32x4(eight01, eight23, 0xDD));
    const V two = _mm512_add_ps(four, _mm512_shuffle_ps(four, four, 0xEE));
    const V one = _mm512_add_ps(two, _mm512_movehdup_ps(two));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0,
                                                                                       0, 0, 0, 0, 0, 0), one)));
  }
  static constexpr int kQueryTile = 4;  // attention: queries x kValueVectors accumulators in registers
  using F = F16;  // the attention's exponentials
  using I = I16;
};

}  // namespace

#include "tiles.h"
#include "attention_tiles.h"

}  // namespace neox::avx512
