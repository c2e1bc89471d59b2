// The activation-quantized matmul's kernels in plain C++ (any CPU): one int8 product per "vector". The model
// does not choose them; they keep the kernel's contract testable and usable everywhere.
#include <algorithm>
#include <cstdint>

#include "w8a8.h"

#define NEOX_TARGET

namespace neox::portable {
namespace {

struct Isa8 {
  using Stream = Isa8;  // the one-row kernel's vectors: the same
  using Acc = int32_t;
  using W = int32_t;
  using X = int32_t;
  static constexpr int kBytes = 1;
  static constexpr int32_t kWeightOffset = 0;
  static constexpr int kTileR1 = 4;
  static constexpr int kTileR = 2, kTileB = 2;

  static Acc zero() { return 0; }
  static X load_x(const int8_t* p) { return *p; }
  static W load_w(const int8_t* p) { return *p; }
  static W load_w_tail(const int8_t*, int64_t) { return 0; }  // never called: k is whole "vectors" of one
  static Acc dot(Acc acc, W w, X x) { return acc + w * x; }  // partial sums are bounded as the result is
  static int32_t sum(Acc acc) { return acc; }
};

}  // namespace

#include "tiles_w8a8.h"

}  // namespace neox::portable
