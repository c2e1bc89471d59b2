// neox_jax._cpu_kernels: the matmuls as XLA FFI handlers for the CPU platform, and the Python module that hands
// them to jax.ffi.register_ffi_target (neox_jax/cpu_kernels.py).
//
//   weight_matmul(x f32[m, k], w s8|f8e4m3fn[n, k], scale f32[n], bias f32[n or 0]; isa: str, threads: i64,
//                 gelu: bool) -> f32[m, n]
//   matmul(x f32[m, k], w f32[n, k], bias f32[n or 0]; isa: str, threads: i64, gelu: bool) -> f32[m, n]
//   int8_dynamic_matmul(x f32[m, k], w s8[n, k], scale f32[n], bias f32[n or 0]; isa: str, threads: i64,
//                       gelu: bool) -> f32[m, n] (w8a8.cc)
//   decode_attention(q f32[B, N, T, H], positions s32[B, T], cache_k f32[B, N, S, H], cache_v f32[B, N, S, H],
//                    cache_positions s32[B, S], k f32[B, N, T, H], v f32[B, N, T, H]; isa: str, threads: i64)
//                    -> f32[B, N, T, H] (attention.h)
//
// isa names the kernels ("avx512", "avx2", "portable"); threads 0 means the pool's default; bias (an empty one:
// none) and gelu are the epilogue (matmul.h's Epilogue).
#include <Python.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "attention.h"
#include "matmul.h"
#include "thread_pool.h"
#include "vector_math.h"
#include "w8a8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace neox {

bool cpu_has(std::string_view isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "portable";
}

namespace {

// The epilogue's GELU, in vector_math.h's types: 4 lanes, or 8 with AVX2 (without FMA), the same bits at each.
// y = 0.5 * y * erfc(-y * fp32(sqrt 0.5)), erfc as chlo's f32 decomposition that XLA compiles jax.nn.gelu's lax.erfc
// to (the same constants, operations and order): |z| < 1 by 1 - z * erf's odd polynomial, else
// e^-z^2 / |z| times a polynomial in 1 / z^2 (one for |z| < 2, another above), 2 minus it for z < 0.
template <class F, class I>
NEOX_INLINE void gelu_exact(F& y) {
  const F z = -y * 0.707106769f;
  I magnitude;
  std::memcpy(&magnitude, &z, sizeof(magnitude));
  magnitude &= 0x7FFFFFFF;
  F a;
  std::memcpy(&a, &magnitude, sizeof(a));
  const F z2 = z * z;
  F p = z2 * 7.85386146e-05f - 0.000801019371f;
  for (const float c : {0.00518832775f, -0.0268538129f, 0.112835854f, -0.37612626f, 1.12837911f}) p = p * z2 + c;
  const F near = 1.0f - z * p;
  const F r = 1.0f / z2;
  F q = r * 0.0232682f - 0.138703942f;
  for (const float c : {0.368742466f, -0.582473278f, 0.621000469f, -0.494451523f, 0.340488f, -0.274112701f,
                        0.563825965f})
    q = q * r + c;
  F t = r * -10.477664f + 12.9772f;
  for (const float c : {-7.49551868f, 2.92101908f, -1.01526523f, 0.42184633f, -0.282076746f, 0.564189494f})
    t = t * r + c;
  F far = -z2;
  exp_nonpositive<F, I>(far);
  far = far * (1.0f / a) * (a < 2.0f ? q : t);
  far = -z2 < -88.7228394f ? (F{} + 0.0f) : far;
  far = z < 0.0f ? 2.0f - far : far;
  y = (y * 0.5f) * (a < 1.0f ? near : far);
}

// row[j] = GELU(row[j]) for j in [begin, end), whole vectors, then the last one padded with zeros (only its own
// lanes stored).
template <class F, class I>
NEOX_INLINE void gelu_span(float* row, int64_t begin, int64_t end) {
  constexpr int64_t kLanes = sizeof(F) / sizeof(float);
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    F v;
    std::memcpy(&v, row + j, sizeof(v));
    gelu_exact<F, I>(v);
    std::memcpy(row + j, &v, sizeof(v));
  }
  if (j < end) {
    F v = (F{} + 0.0f);
    std::memcpy(&v, row + j, (end - j) * sizeof(float));
    gelu_exact<F, I>(v);
    std::memcpy(row + j, &v, (end - j) * sizeof(float));
  }
}

void gelu_span4(float* row, int64_t begin, int64_t end) { gelu_span<F4, I4>(row, begin, end); }

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) void gelu_span8(float* row, int64_t begin, int64_t end) {
  gelu_span<F8, I8>(row, begin, end);
}
#endif

RowsKernel kernel_for(std::string_view isa) {
  if (isa == "avx512") return avx512::rows;
  if (isa == "avx2") return avx2::rows;
  if (isa == "portable") return portable::rows;
  return nullptr;
}

const char* best_isa() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa)) return isa;
  return "portable";
}

// The output channels split into tasks of whole channel blocks on the pool, each task's outputs finished by the
// epilogue.
void run_matmul(const Matmul& p, const Epilogue& epilogue, RowsKernel kernel, int threads) {
  run_channels(p.n, kChannelBlock, p.m * p.n * p.k, threads, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end);
    apply_epilogue(epilogue, p.y, p.m, p.n, begin, end);
  });
}

std::string shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Checks the operands' shapes, the instruction set and thread count, then runs the kernels.
ffi::Error run_checked(const char* name, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, WeightType type,
                       const float* scale, ffi::Span<const int64_t> scale_dims, ffi::Buffer<ffi::F32> bias,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, std::string_view isa, int64_t threads, bool gelu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0] ||
      (scale && (scale_dims.size() != 1 || scale_dims[0] != wd[0])) || !bias_fits(bd, wd[0]))
    return ffi::Error::InvalidArgument(std::string(name) + ": expected x [m, k], w [n, k]" +
                                       (scale ? ", scale [n]" : "") + ", bias [n] or [0] -> [m, n], got x " +
                                       shape(xd) + ", w " + shape(wd) + (scale ? ", scale " + shape(scale_dims) : "") +
                                       ", bias " + shape(bd) + " -> " + shape(yd));
  const RowsKernel kernel = kernel_for(isa);
  if (kernel == nullptr || !cpu_has(isa))
    return ffi::Error::InvalidArgument(std::string(name) + ": isa '" + std::string(isa) +
                                       "' is not one of avx512, avx2, portable available on this CPU");
  if (threads < 0) return ffi::Error::InvalidArgument(std::string(name) + ": threads must be >= 0");
  const Matmul p{x.typed_data(), w.untyped_data(), type, scale, y->typed_data(), xd[0], wd[0], xd[1]};
  const Epilogue epilogue{bd[0] ? bias.typed_data() : nullptr, gelu};
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {  // an empty sum, then the epilogue
    std::fill(p.y, p.y + p.m * p.n, 0.0f);
    apply_epilogue(epilogue, p.y, p.m, p.n, 0, p.n);
    return ffi::Error::Success();
  }
  run_matmul(p, epilogue, kernel, threads ? static_cast<int>(threads) : ThreadPool::instance().threads());
  return ffi::Error::Success();
}

ffi::Error weight_matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, std::string_view isa,
                         int64_t threads, bool gelu) {
  WeightType type;
  if (w.element_type() == ffi::DataType::S8) {
    type = WeightType::kInt8;
  } else if (w.element_type() == ffi::DataType::F8E4M3FN) {
    type = WeightType::kFp8E4M3;
  } else {
    return ffi::Error::InvalidArgument("neox weight_matmul: weights must be int8 or float8_e4m3fn");
  }
  return run_checked("neox weight_matmul", x, w, type, scale.typed_data(), scale.dimensions(), bias, y, isa, threads,
                     gelu);
}

ffi::Error matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                  std::string_view isa, int64_t threads, bool gelu) {
  if (w.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("neox matmul: weights must be float32");
  return run_checked("neox matmul", x, w, WeightType::kFp32, nullptr, {}, bias, y, isa, threads, gelu);
}

AttendKernel attend_kernel_for(std::string_view isa) {
  if (isa == "avx512") return avx512::attend;
  if (isa == "avx2") return avx2::attend;
  if (isa == "portable") return portable::attend;
  return nullptr;
}

ffi::Error decode_attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> cache_k,
                            ffi::Buffer<ffi::F32> cache_v, ffi::Buffer<ffi::S32> cache_positions,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            std::string_view isa, int64_t threads) {
  const auto qd = q.dimensions(), pd = positions.dimensions(), ckd = cache_k.dimensions(),
             cvd = cache_v.dimensions(), cpd = cache_positions.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             od = out->dimensions();
  const auto same = [](auto a, auto b) { return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()); };
  if (qd.size() != 4 || !same(qd, kd) || !same(qd, vd) || !same(qd, od) || !same(ckd, cvd) || ckd.size() != 4 ||
      ckd[0] != qd[0] || ckd[1] != qd[1] || ckd[3] != qd[3] || pd.size() != 2 || pd[0] != qd[0] || pd[1] != qd[2] ||
      cpd.size() != 2 || cpd[0] != qd[0] || cpd[1] != ckd[2])
    return ffi::Error::InvalidArgument(
        "neox decode_attention: expected q, k, v [B, N, T, H], positions [B, T], cache_k, cache_v [B, N, S, H], "
        "cache_positions [B, S] -> [B, N, T, H], got q " + shape(qd) + ", positions " + shape(pd) + ", cache_k " +
        shape(ckd) + ", cache_v " + shape(cvd) + ", cache_positions " + shape(cpd) + ", k " + shape(kd) + ", v " +
        shape(vd) + " -> " + shape(od));
  const AttendKernel kernel = attend_kernel_for(isa);
  if (kernel == nullptr || !cpu_has(isa))
    return ffi::Error::InvalidArgument("neox decode_attention: isa '" + std::string(isa) +
                                       "' is not one of avx512, avx2, portable available on this CPU");
  if (threads < 0) return ffi::Error::InvalidArgument("neox decode_attention: threads must be >= 0");
  const DecodeAttention p{q.typed_data(), positions.typed_data(),
                          {{cache_k.typed_data(), cache_v.typed_data(), cache_positions.typed_data(), ckd[2]},
                           {k.typed_data(), v.typed_data(), positions.typed_data(), qd[2]}},
                          out->typed_data(), qd[0], qd[1], qd[2], qd[3]};
  if (p.b * p.n * p.t * p.h == 0) return ffi::Error::Success();
  // A (batch, head) pair's multiply-adds: its queries' scores and weighted values over every slot.
  const int64_t pair_work = 2 * p.t * (ckd[2] + p.t) * p.h;
  const int pool_threads = threads ? static_cast<int>(threads) : ThreadPool::instance().threads();
  run_channels(p.b * p.n, 1, p.b * p.n * pair_work, pool_threads,
               [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
  return ffi::Error::Success();
}

// The GELU over a span at the widest of the epilogue's vector widths this CPU runs (the same bits at each).
void gelu_in_place(float* row, int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return gelu_span8(row, begin, end);
#endif
  gelu_span4(row, begin, end);
}

}  // namespace

void apply_epilogue(const Epilogue& e, float* y, int64_t m, int64_t n, int64_t begin, int64_t end) {
  for (int64_t b = 0; b < m; ++b) {
    float* row = y + b * n;
    if (e.bias)
      for (int64_t j = begin; j < end; ++j) row[j] += e.bias[j];
    if (e.gelu) gelu_in_place(row, begin, end);
  }
}

}  // namespace neox

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxWeightMatmul, neox::weight_matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("isa")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("gelu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxMatmul, neox::matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("isa")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("gelu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxDecodeAttention, neox::decode_attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("isa")
                                  .Attr<int64_t>("threads"));

// ---- the Python module ----

static PyObject* weight_matmul_handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(NeoxWeightMatmul), nullptr, nullptr);
}

static PyObject* matmul_handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(NeoxMatmul), nullptr, nullptr);
}

static PyObject* int8_dynamic_matmul_handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(NeoxInt8DynamicMatmul), nullptr, nullptr);
}

static PyObject* decode_attention_handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(NeoxDecodeAttention), nullptr, nullptr);
}

static PyObject* best_int8_dynamic_isa(PyObject*, PyObject*) { return PyUnicode_FromString(neox::best_w8a8_isa()); }

static PyObject* best_isa(PyObject*, PyObject*) { return PyUnicode_FromString(neox::best_isa()); }

static PyObject* default_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(neox::ThreadPool::instance().threads());
}

static PyMethodDef methods[] = {
    {"weight_matmul_handler", weight_matmul_handler, METH_NOARGS, "The weight-only matmul's FFI handler (a capsule)."},
    {"matmul_handler", matmul_handler, METH_NOARGS, "The fp32 matmul's FFI handler (a capsule)."},
    {"int8_dynamic_matmul_handler", int8_dynamic_matmul_handler, METH_NOARGS,
     "The activation-quantized matmul's FFI handler (a capsule)."},
    {"decode_attention_handler", decode_attention_handler, METH_NOARGS,
     "The decode step's attention over a KV cache's FFI handler (a capsule)."},
    {"best_int8_dynamic_isa", best_int8_dynamic_isa, METH_NOARGS,
     "The fastest activation-quantized kernels this CPU runs: avx512 (with VNNI), avx2 or portable."},
    {"best_isa", best_isa, METH_NOARGS, "The fastest kernels this CPU runs: avx512, avx2 or portable."},
    {"default_threads", default_threads, METH_NOARGS, "Threads a call uses (NEOX_JAX_CPU_THREADS or the CPUs)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "neox-jax's native CPU kernels (XLA FFI).", -1,
                             methods};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&module); }
