// The activation-quantized matmul's kernels for AVX2: 32 int8 products per vpmaddubsw.
//
// vpmaddubsw multiplies unsigned bytes by signed bytes and adds adjacent pairs into int16 with saturation,
// which w + 128 (as the VNNI kernel reads weights) would hit: 2 * 255 * 127 > 2^15. So the weight's sign moves
// onto x instead: |w| (vpabsb; |-128| = 128 as an unsigned byte) times sign(w) * qx (vpsignb: qx, -qx or 0;
// |qx| <= 127, so -qx fits), each product w * qx exactly, a pair at most 2 * 128 * 127 = 32512 < 2^15: no
// saturation. vpmaddwd then widens the pairs to int32 lanes (exact).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "w8a8.h"

#define NEOX_TARGET __attribute__((target("avx2")))

namespace neox::avx2 {
namespace {

struct Isa8 {
  using Stream = Isa8;  // the one-row kernel's vectors: the same
  using Acc = __m256i;
  struct W {
    __m256i magnitude, sign;
  };
  using X = __m256i;
  static constexpr int kBytes = 32;
  static constexpr int32_t kWeightOffset = 0;
  static constexpr int kTileR1 = 4;
  static constexpr int kTileR = 2, kTileB = 3;  // 6 accumulators + 4 weight and 3 x vectors of 16 registers

  NEOX_TARGET static Acc zero() { return _mm256_setzero_si256(); }
  NEOX_TARGET static X load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  NEOX_TARGET static W load_w(const int8_t* p) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_abs_epi8(w), w};
  }
  NEOX_TARGET static W load_w_tail(const int8_t* p, int64_t count) {
    alignas(32) int8_t tail[kBytes] = {};
    std::memcpy(tail, p, count);
    return load_w(tail);
  }
  NEOX_TARGET static Acc dot(Acc acc, const W& w, X x) {
    const __m256i pairs = _mm256_maddubs_epi16(w.magnitude, _mm256_sign_epi8(x, w.sign));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  NEOX_TARGET static int32_t sum(Acc acc) {
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
    return _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
  }
};

}  // namespace

#include "tiles_w8a8.h"

}  // namespace neox::avx2
