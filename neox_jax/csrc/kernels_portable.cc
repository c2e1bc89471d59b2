// The row kernels and the decode attention (attention_tiles.h) in plain C++ (any CPU): one float per "vector". The
// model does not choose them (the XLA path is as fast); they keep the kernels' contract testable and usable
// everywhere.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "matmul.h"
#include "vector_math.h"

#define NEOX_TARGET

namespace neox::portable {
namespace {

struct Isa {
  using V = float;
  static constexpr int kWidth = 1;
  static constexpr int kTileR1 = 4;
  static constexpr int kTileR = 2, kTileB = 2;

  static V zero() { return 0.0f; }
  static V load_x(const float* p) { return *p; }
  static V load_w(const int8_t* p) { return static_cast<float>(*p); }
  static V load_w(const Fp8* p) {
    const int magnitude = p->bits & 0x7F, exponent = magnitude >> 3, mantissa = magnitude & 7;
    const float value = exponent ? std::ldexp(static_cast<float>(8 + mantissa), exponent - 10)
                                 : std::ldexp(static_cast<float>(mantissa), -9);
    return (p->bits & 0x80) ? -value : value;
  }
  static V load_w(const float* p) { return *p; }
  static V fma(V a, V b, V acc) { return std::fma(a, b, acc); }
  static float sum(V v) { return v; }
  static V broadcast(float x) { return x; }
  static void store(float* p, V v) { *p = v; }
  static void sum4(const V (&v)[4], float* out) { std::copy(v, v + 4, out); }
  static constexpr int kQueryTile = 4;  // attention: queries x kValueVectors accumulators in registers
  using F = F4;  // the attention's exponentials
  using I = I4;
};

}  // namespace

#include "tiles.h"
#include "attention_tiles.h"

}  // namespace neox::portable
