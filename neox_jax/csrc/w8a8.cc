// neox_jax._cpu_kernels' activation-quantized matmul as an XLA FFI handler:
//
//   int8_dynamic_matmul(x f32[m, k], w s8[n, k], scale f32[n], bias f32[n or 0]; isa: str, threads: i64,
//                       gelu: bool) -> f32[m, n]
//
// x is quantized here, on the calling thread, by one function for every instruction set (so each ISA's
// kernel sees the same qx, and their exact int32 sums agree bit for bit); the output channels are then split
// over the thread pool as the weight-only matmul's are.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "matmul.h"
#include "thread_pool.h"
#include "w8a8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace neox {
namespace {

// max |x[i]|, NaN if x holds one: |x|'s bits ordered as integers are ordered as the values (NaN's above inf's),
// and an integer maximum is exact and vectorises without fast-math.
float abs_max(const float* x, int64_t k) {
  int32_t most = 0;
  for (int64_t i = 0; i < k; ++i) {
    int32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    most = std::max(most, bits & 0x7FFFFFFF);
  }
  float amax;
  std::memcpy(&amax, &most, sizeof(amax));
  return amax;
}

// q[i] = round(x[i] * inv), ties to even (the thread's rounding mode, which XLA leaves at its default); returns
// sum_i q[i]. inv = 127 / max |x|, so |q| <= 127.
int32_t quantize_scaled(const float* x, int64_t k, float inv, int8_t* q) {
  int32_t total = 0;
  int64_t i = 0;
#if defined(__x86_64__) || defined(__i386__)
  const __m128 inv4 = _mm_set1_ps(inv);
  __m128i total4 = _mm_setzero_si128();
  for (; i + 4 <= k; i += 4) {
    const __m128i v = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i), inv4));
    total4 = _mm_add_epi32(total4, v);
    const __m128i bytes = _mm_packs_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
    const int32_t packed = _mm_cvtsi128_si32(bytes);
    std::memcpy(q + i, &packed, 4);
  }
  alignas(16) int32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), total4);
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < k; ++i) {
    const int32_t v = _mm_cvtss_si32(_mm_set_ss(x[i] * inv));
    q[i] = static_cast<int8_t>(v);
    total += v;
  }
#else
  for (; i < k; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[i] * inv));
    q[i] = static_cast<int8_t>(v);
    total += v;
  }
#endif
  return total;
}

// Row b of x quantized symmetrically by its absolute maximum (neox_jax.quantize's XLA formulation is the same
// definition): scale = amax * fp32(1 / 127), q = round(x * (127 / amax)) when kMinRowMax <= amax <= FLT_MAX;
// a row below (zeros among them) gets q = 0 (so y = 0), a row holding inf or NaN q = 0 and scale inf or NaN
// (so y = NaN).
constexpr float kMinRowMax = 0x1p-120f;  // neox_jax.quantize.MIN_ROW_MAX: 127 / amax stays finite above it

struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<int32_t> sum;
  std::vector<float> scale;
  int64_t ldq;
};

void quantize_rows(const float* x, int64_t m, int64_t k, QuantizedX& out) {
  out.ldq = (k + kQxAlign - 1) / kQxAlign * kQxAlign;
  out.q.assign(m * out.ldq, 0);
  out.sum.assign(m, 0);
  out.scale.resize(m);
  for (int64_t b = 0; b < m; ++b) {
    const float amax = abs_max(x + b * k, k);
    out.scale[b] = amax * (1.0f / 127);  // as neox_jax.quantize.INVERSE_127 (XLA turns `/ 127` into this multiply)
    if (amax >= kMinRowMax && amax <= FLT_MAX)
      out.sum[b] = quantize_scaled(x + b * k, k, 127.0f / amax, &out.q[b * out.ldq]);
  }
}

bool w8a8_runs(std::string_view isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") return cpu_has("avx512") && __builtin_cpu_supports("avx512vnni");
#endif
  return cpu_has(isa);
}

W8A8Kernel w8a8_kernel_for(std::string_view isa) {
  if (isa == "avx512") return avx512::w8a8_rows;
  if (isa == "avx2") return avx2::w8a8_rows;
  if (isa == "portable") return portable::w8a8_rows;
  return nullptr;
}

constexpr int64_t kChannels = 8;  // a task's channels are a multiple of it (every tile's channel count divides it)

// The output channels split over the pool as the weight-only kernel's are (one-row calls are bound by reading
// the weights in both, so the same threshold), each task under the caller's floating-point mode and its outputs
// finished by the epilogue.
void run_w8a8(const W8A8& p, const Epilogue& epilogue, W8A8Kernel kernel, int threads) {
  run_channels(p.n, kChannels, p.m * p.n * p.k, threads, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end);
    apply_epilogue(epilogue, p.y, p.m, p.n, begin, end);
  });
}

std::string shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error int8_dynamic_matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, std::string_view isa,
                               int64_t threads, bool gelu) {
  constexpr const char* kName = "neox int8_dynamic_matmul";
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), bd = bias.dimensions(),
             yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 1 || yd.size() != 2 || xd[1] != wd[1] || sd[0] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[0] || !bias_fits(bd, wd[0]))
    return ffi::Error::InvalidArgument(std::string(kName) + ": expected x [m, k], w [n, k], scale [n], bias [n] or [0] " +
                                       "-> [m, n], got x " + shape(xd) + ", w " + shape(wd) + ", scale " + shape(sd) +
                                       ", bias " + shape(bd) + " -> " + shape(yd));
  if (xd[1] > kMaxW8A8K)
    return ffi::Error::InvalidArgument(std::string(kName) + ": k = " + std::to_string(xd[1]) + " is over " +
                                       std::to_string(kMaxW8A8K) + ", where the int32 sums could overflow");
  const W8A8Kernel kernel = w8a8_kernel_for(isa);
  if (kernel == nullptr || !w8a8_runs(isa))
    return ffi::Error::InvalidArgument(std::string(kName) + ": isa '" + std::string(isa) +
                                       "' is not one of avx512 (with VNNI), avx2, portable available on this CPU");
  if (threads < 0) return ffi::Error::InvalidArgument(std::string(kName) + ": threads must be >= 0");
  const int64_t m = xd[0], n = wd[0], k = xd[1];
  const Epilogue epilogue{bd[0] ? bias.typed_data() : nullptr, gelu};
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum, then the epilogue
    std::fill(y->typed_data(), y->typed_data() + m * n, 0.0f);
    apply_epilogue(epilogue, y->typed_data(), m, n, 0, n);
    return ffi::Error::Success();
  }
  thread_local QuantizedX qx;  // reused by the calls on this thread: no allocation per decode step
  quantize_rows(x.typed_data(), m, k, qx);
  const W8A8 p{qx.q.data(), qx.sum.data(), qx.scale.data(), w.typed_data(), scale.typed_data(), y->typed_data(),
               m, n, k, qx.ldq};
  run_w8a8(p, epilogue, kernel, threads ? static_cast<int>(threads) : ThreadPool::instance().threads());
  return ffi::Error::Success();
}

}  // namespace

const char* best_w8a8_isa() {
  for (const char* isa : {"avx512", "avx2"})
    if (w8a8_runs(isa)) return isa;
  return "portable";
}

}  // namespace neox

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxInt8DynamicMatmul, neox::int8_dynamic_matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("isa")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("gelu"));
