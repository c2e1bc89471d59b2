// The row kernels and the decode attention (attention_tiles.h) for AVX2 with FMA: 8 floats per vector.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "matmul.h"
#include "vector_math.h"

#define NEOX_TARGET __attribute__((target("avx2,fma")))

namespace neox::avx2 {
namespace {

struct Isa {
  using V = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kTileR1 = 4;
  static constexpr int kTileR = 2, kTileB = 4;  // 8 accumulators + 2 weight and 4 x vectors of 16 registers

  NEOX_TARGET static V zero() { return _mm256_setzero_ps(); }
  NEOX_TARGET static V load_x(const float* p) { return _mm256_loadu_ps(p); }
  NEOX_TARGET static V load_w(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  NEOX_TARGET static V load_w(const Fp8* p) {  // as the AVX-512 kernel's
    const __m256i bits = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7F));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x80)), 24);
    const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23));
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0f / 512));
    const __m256 is_normal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(7)));
    const __m256 value = _mm256_blendv_ps(subnormal, _mm256_castsi256_ps(normal), is_normal);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign));
  }
  NEOX_TARGET static V load_w(const float* p) { return _mm256_loadu_ps(p); }
  NEOX_TARGET static V fma(V a, V b, V acc) { return _mm256_fmadd_ps(a, b, acc); }
  NEOX_TARGET static float sum(V v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
  NEOX_TARGET static V broadcast(float x) { return _mm256_set1_ps(x); }
  NEOX_TARGET static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  // out[g] = sum(v[g]) for 4 vectors at once, each lane's additions paired as sum's (the same bits).
  NEOX_TARGET static void sum4(const V (&v)[4], float* out) {
    const V half01 = _mm256_add_ps(_mm256_permute2f128_ps(v[0], v[1], 0x20),
                                   _mm256_permute2f128_ps(v[0], v[1], 0x31));
    const V half23 = _mm256_add_ps(_mm256_permute2f128_ps(v[2], v[3], 0x20),
                                   _mm256_permute2f128_ps(v[2], v[3], 0x31));
    // 128-bit lanes [v0's 4 | v1's 4], [v2's 4 | v3's 4]; then lanes 0, 1 of each: its first two sums paired
    const V pair01 = _mm256_add_ps(half01, _mm256_shuffle_ps(half01, half01, 0xEE));
    const V pair23 = _mm256_add_ps(half23, _mm256_shuffle_ps(half23, half23, 0xEE));
    const V one01 = _mm256_add_ps(pair01, _mm256_movehdup_ps(pair01));
    const V one23 = _mm256_add_ps(pair23, _mm256_movehdup_ps(pair23));
    const V all = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(one01, one23, 0x00),  // [v0 v0 v2 v2 | v1 v1 v3 v3]
                                           _mm256_setr_epi32(0, 4, 2, 6, 0, 0, 0, 0));
    _mm_storeu_ps(out, _mm256_castps256_ps128(all));
  }
  static constexpr int kQueryTile = 2;  // attention: queries x kValueVectors accumulators in registers
  using F = F8;  // the attention's exponentials
  using I = I8;
};

}  // namespace

#include "tiles.h"
#include "attention_tiles.h"

}  // namespace neox::avx2
