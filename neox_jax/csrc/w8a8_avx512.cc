// The activation-quantized matmul's kernels for AVX-512 with VNNI: 64 int8 products per instruction.
//
// vpdpbusd multiplies unsigned bytes by signed bytes, four per int32 lane, and adds them to the lane without
// saturation (modulo 2^32). The weights are signed, so each is read as w + 128: flipping the sign bit
// (w ^ 0x80) maps [-128, 127] onto [0, 255] exactly. The lanes then sum qx * (w + 128) = qx * w + 128 * qx,
// and tiles_w8a8.h subtracts 128 * sum_k qx once per row (the offset's correction, summed while x is
// quantized). Offsetting the weights rather than x keeps that correction per row: offsetting x would need
// 128 * sum_k w per channel, another pass over the weights or a second dot product per channel.
// Exact: the products (at most 255 * 127) and the lanes are integers; wrapping modulo 2^32 along the way
// cancels, because the corrected result fits in int32 (w8a8.h's kMaxW8A8K).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "w8a8.h"

#define NEOX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2")))

namespace neox::avx512 {
namespace {

// The one-row (decode) kernel's vectors: the same instruction on 256 bits (AVX512-VL). Streaming the weights, it
// read them ~4% faster than on 512 bits on the 2-core AMD EPYC (Zen 4, which splits a 512-bit operation in two),
// and no slower than the AVX2 kernel; see tiles_w8a8.h's w8a8_stream_tile.
struct Isa8Stream {
  using Acc = __m256i;
  using W = __m256i;
  using X = __m256i;
  static constexpr int kBytes = 32;
  static constexpr int32_t kWeightOffset = 128;

  NEOX_TARGET static Acc zero() { return _mm256_setzero_si256(); }
  NEOX_TARGET static X load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  NEOX_TARGET static W offset(__m256i w) { return _mm256_xor_si256(w, _mm256_set1_epi8(-128)); }
  NEOX_TARGET static W load_w(const int8_t* p) { return offset(load_x(p)); }
  NEOX_TARGET static W load_w_tail(const int8_t* p, int64_t count) {  // as Isa8's
    return offset(_mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t{1} << count) - 1), p));
  }
  NEOX_TARGET static Acc dot(Acc acc, W w, X x) {  // as Isa8's
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "vm"(x));
    return acc;
  }
  NEOX_TARGET static int32_t sum(Acc acc) {
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
    return _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
  }
};

struct Isa8 {
  using Stream = Isa8Stream;
  using Acc = __m512i;
  using W = __m512i;
  using X = __m512i;
  static constexpr int kBytes = 64;
  static constexpr int32_t kWeightOffset = 128;
  static constexpr int kTileR1 = 8;  // decode: channels per w8a8_stream_tile
  static constexpr int kTileR = 4, kTileB = 4;  // 16 accumulators + 4 weight and 4 x vectors of 32 registers

  NEOX_TARGET static Acc zero() { return _mm512_setzero_si512(); }
  NEOX_TARGET static X load_x(const int8_t* p) { return _mm512_loadu_si512(p); }
  NEOX_TARGET static W offset(__m512i w) { return _mm512_xor_si512(w, _mm512_set1_epi8(-128)); }
  NEOX_TARGET static W load_w(const int8_t* p) { return offset(_mm512_loadu_si512(p)); }
  NEOX_TARGET static W load_w_tail(const int8_t* p, int64_t count) {  // the masked lanes are not read
    return offset(_mm512_maskz_loadu_epi8((__mmask64{1} << count) - 1, p));  // a zero weight reads as 128:
  }                                                                         // qx is zero there
  // _mm512_dpbusd_epi32(acc, w, x) written out: around the intrinsic, GCC 12 copies the accumulator into another
  // register and back on every step of a loop (two moves per vpdpbusd, ~15% slower streaming the weights).
  NEOX_TARGET static Acc dot(Acc acc, W w, X x) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "vm"(x));
    return acc;
  }
  NEOX_TARGET static int32_t sum(Acc acc) { return _mm512_reduce_add_epi32(acc); }
};

}  // namespace

#include "tiles_w8a8.h"

}  // namespace neox::avx512
