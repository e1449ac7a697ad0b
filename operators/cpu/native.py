"""Build and load the C sources beside this file (`*.c`, with the `*.h` they include) as one
library on first use.

The library is compiled once per set of sources, compiler flags and CPU into a cache folder
(`$STREAMCTX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/streamctx/kernels`, else
`~/.cache/streamctx/kernels`) with `cc -O3 -march=native -fopenmp` (well under a second), under a
file lock so that concurrent processes (Ray workers) build it once. It is loaded after torch, so
its `libgomp.so.1` is the one torch already loaded: its parallel regions run on torch's OpenMP
threads and follow `torch.set_num_threads`.

`library()` returns the loaded library, or None where it cannot be had (no C compiler, a CPU
without AVX-512, `STREAMCTX_NATIVE_KERNELS=0`); `why_unavailable()` then says why. Callers fall
back to their torch paths: the kernels change speed, never results beyond fp32 rounding.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loaded first: the library must bind to torch's libgomp)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # included by the sources: part of the build key
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-Wall",
         "-Werror")
ENV_SWITCH = "STREAMCTX_NATIVE_KERNELS"

_state: dict[str, object] = {}


def cache_dir() -> Path:
    if os.environ.get("STREAMCTX_KERNEL_CACHE"):
        return Path(os.environ["STREAMCTX_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "streamctx" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str) -> Path:
    source = b"".join(path.name.encode() + b"\0" + path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + cc.encode() + _cpu_flags().encode()
                         + sys.platform.encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # only this user writes what gets loaded
    target = folder / f"libstreamctx_cpu-{key}.so"
    if target.exists():
        return target
    with open(folder / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # built by another process while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                names = ", ".join(path.name for path in SOURCES)
                raise RuntimeError(f"{cc} failed on {names}:\n{proc.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: a reader never sees a half-written library
    return target


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures of every source's entry points (the library's whole ABI, in one place)."""
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.sc_version.restype = ctypes.c_int
    lib.sc_has_avx512.restype = ctypes.c_int
    lib.sc_matmul_nt.argtypes = [p, i64, p, p, p, i64, i64, i64, i64]
    lib.sc_matmul_nt.restype = None
    lib.sc_paged_decode_attention.argtypes = [p, p, p, i64, p, p, p, i64, i64, i64, i64, i64, f32, p, p]
    lib.sc_paged_decode_attention.restype = ctypes.c_int
    lib.sc_rms_norm.argtypes = [p, i64, p, f32, p, i64, i64]
    lib.sc_rms_norm.restype = None
    lib.sc_silu_mul.argtypes = [p, p, p, i64]
    lib.sc_silu_mul.restype = None
    lib.sc_rope_append.argtypes = [p, i64, p, p, i64, p, p, p, p, p, p, p, i64, p, i64, i64, i64, i64]
    lib.sc_rope_append.restype = None
    lib.sc_decode_scratch_floats.argtypes = [p, i64]  # (sc_layer_weights *, rows)
    lib.sc_decode_scratch_floats.restype = i64
    lib.sc_decode_layer.argtypes = [p, p, p, i64, p]  # (sc_layer_weights *, sc_layer_cache *, x, B, scratch)
    lib.sc_decode_layer.restype = ctypes.c_int
    lib.sc_causal_attention.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64, f32,
                                        p, i64, i64, p]
    lib.sc_causal_attention.restype = ctypes.c_int
    lib.sc_gemm_nt.argtypes = [p, i64, p, p, p, f32, p, i64, p, i64, i64, i64, i64]
    lib.sc_gemm_nt.restype = ctypes.c_int
    lib.sc_gemm_nt_swiglu.argtypes = [p, i64, p, p, p, f32, p, i64, i64, i64, i64]
    lib.sc_gemm_nt_swiglu.restype = ctypes.c_int
    lib.sc_pack_weights.argtypes = [p, p, i64, i64, p]
    lib.sc_pack_weights.restype = None
    lib.sc_gemm_packed.argtypes = [p, i64, p, ctypes.c_int, p, p, f32, p, i64, p, i64, i64, i64, i64]
    lib.sc_gemm_packed.restype = ctypes.c_int


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _state["why"] = f"switched off by {ENV_SWITCH}=0"
        return None
    if not sys.platform.startswith("linux"):
        _state["why"] = f"native kernels are built on Linux only (this is {sys.platform})"
        return None
    if "avx512f" not in _cpu_flags():
        _state["why"] = "this CPU has no AVX-512 (avx512f)"
        return None
    cc = _compiler()
    if cc is None:
        _state["why"] = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError) as exc:
        _state["why"] = f"could not build or load the native kernels: {exc}"
        return None
    _declare(lib)
    if not lib.sc_has_avx512():
        _state["why"] = "the compiler did not target AVX-512"
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call; None where unavailable (see `why_unavailable`)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _state.get("why")  # type: ignore[return-value]

