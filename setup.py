"""Builds neox_jax._cpu_kernels, the native CPU matmul and decode-attention kernels XLA calls through its FFI
(neox_jax/cpu_kernels.py; the rest of the package is declared in pyproject.toml).

The XLA FFI headers ship inside jaxlib (`jax.ffi.include_dir()`), so the build needs jax and jaxlib: pyproject.toml's
build-system requires them, and pip's isolated build environment installs the same newest release a fresh
environment gets at run time (the headers' FFI API version must not be newer than the runtime's XLA; in an
environment with an older jaxlib, `pip install --no-build-isolation -e .` builds against the installed one).
The extension is optional: without a C++ compiler, or without jax in the build environment, the package
installs without it and the model runs its XLA path (neox_jax.cpu_kernels logs one line saying so).
"""

from setuptools import Extension, setup


def ffi_include_dir() -> str | None:
    try:
        import jax.ffi
    except ImportError:
        print("warning: jax is not importable in the build environment: neox_jax._cpu_kernels is not built")
        return None
    return jax.ffi.include_dir()


def extensions() -> list[Extension]:
    include = ffi_include_dir()
    if include is None:
        return []
    sources = ["cpu_kernels.cc", "thread_pool.cc", "kernels_avx512.cc", "kernels_avx2.cc", "kernels_portable.cc",
               "w8a8.cc", "w8a8_avx512.cc", "w8a8_avx2.cc", "w8a8_portable.cc"]
    return [Extension(
        "neox_jax._cpu_kernels", [f"neox_jax/csrc/{name}" for name in sources], include_dirs=[include],
        depends=[f"neox_jax/csrc/{name}" for name in ("matmul.h", "thread_pool.h", "tiles.h", "w8a8.h", "tiles_w8a8.h",
                                                      "attention.h", "attention_tiles.h", "vector_math.h")],
        language="c++", optional=True,
        # No -march: each ISA's kernels carry their own target attribute and are chosen at run time, so one
        # build runs on every x86-64 CPU (and the portable kernels elsewhere).
        # -Wno-*uninitialized: GCC 12's own intrinsics headers trip them.
        extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden", "-Wno-uninitialized",
                            "-Wno-maybe-uninitialized"])]


setup(ext_modules=extensions())
