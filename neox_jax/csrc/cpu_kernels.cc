// neox_jax._cpu_kernels: the matmuls as XLA FFI handlers for the CPU platform, and the Python module that hands
// them to jax.ffi.register_ffi_target (neox_jax/cpu_kernels.py).
//
//   weight_matmul(x f32[m, k], w s8|f8e4m3fn[n, k], scale f32[n]; isa: str, threads: i64) -> f32[m, n]
//   matmul(x f32[m, k], w f32[n, k]; isa: str, threads: i64) -> f32[m, n]
//   int8_dynamic_matmul(x f32[m, k], w s8[n, k], scale f32[n]; isa: str, threads: i64) -> f32[m, n] (w8a8.cc)
//
// isa names the kernels ("avx512", "avx2", "portable"); threads 0 means the pool's default.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "matmul.h"
#include "thread_pool.h"
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

// The output channels split into tasks of whole channel blocks on the pool.
void run_matmul(const Matmul& p, RowsKernel kernel, int threads) {
  run_channels(p.n, kChannelBlock, p.m * p.n * p.k, threads,
               [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

std::string shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Checks the operands' shapes, the instruction set and thread count, then runs the kernels.
ffi::Error run_checked(const char* name, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, WeightType type,
                       const float* scale, ffi::Span<const int64_t> scale_dims, ffi::Result<ffi::Buffer<ffi::F32>> y,
                       std::string_view isa, int64_t threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0] ||
      (scale && (scale_dims.size() != 1 || scale_dims[0] != wd[0])))
    return ffi::Error::InvalidArgument(std::string(name) + ": expected x [m, k], w [n, k]" +
                                       (scale ? ", scale [n]" : "") + " -> [m, n], got x " + shape(xd) + ", w " +
                                       shape(wd) + (scale ? ", scale " + shape(scale_dims) : "") + " -> " + shape(yd));
  const RowsKernel kernel = kernel_for(isa);
  if (kernel == nullptr || !cpu_has(isa))
    return ffi::Error::InvalidArgument(std::string(name) + ": isa '" + std::string(isa) +
                                       "' is not one of avx512, avx2, portable available on this CPU");
  if (threads < 0) return ffi::Error::InvalidArgument(std::string(name) + ": threads must be >= 0");
  const Matmul p{x.typed_data(), w.untyped_data(), type, scale, y->typed_data(), xd[0], wd[0], xd[1]};
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::fill(p.y, p.y + p.m * p.n, 0.0f);
    return ffi::Error::Success();
  }
  run_matmul(p, kernel, threads ? static_cast<int>(threads) : ThreadPool::instance().threads());
  return ffi::Error::Success();
}

ffi::Error weight_matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                         ffi::ResultBuffer<ffi::F32> y, std::string_view isa, int64_t threads) {
  WeightType type;
  if (w.element_type() == ffi::DataType::S8) {
    type = WeightType::kInt8;
  } else if (w.element_type() == ffi::DataType::F8E4M3FN) {
    type = WeightType::kFp8E4M3;
  } else {
    return ffi::Error::InvalidArgument("neox weight_matmul: weights must be int8 or float8_e4m3fn");
  }
  return run_checked("neox weight_matmul", x, w, type, scale.typed_data(), scale.dimensions(), y, isa, threads);
}

ffi::Error matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y, std::string_view isa,
                  int64_t threads) {
  if (w.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("neox matmul: weights must be float32");
  return run_checked("neox matmul", x, w, WeightType::kFp32, nullptr, {}, y, isa, threads);
}

}  // namespace
}  // namespace neox

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxWeightMatmul, neox::weight_matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoxMatmul, neox::matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
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
    {"best_int8_dynamic_isa", best_int8_dynamic_isa, METH_NOARGS,
     "The fastest activation-quantized kernels this CPU runs: avx512 (with VNNI), avx2 or portable."},
    {"best_isa", best_isa, METH_NOARGS, "The fastest kernels this CPU runs: avx512, avx2 or portable."},
    {"default_threads", default_threads, METH_NOARGS, "Threads a call uses (NEOX_JAX_CPU_THREADS or the CPUs)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "neox-jax's native CPU kernels (XLA FFI).", -1,
                             methods};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&module); }
