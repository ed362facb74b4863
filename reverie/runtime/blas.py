"""Route MLX's CPU matrix products to OpenBLAS.

The ``mlx-cpu`` wheel links the reference (netlib) BLAS it bundles: a 1024^3 float32 matmul
runs at about 6 GFLOP/s on a 2-core x86-64 machine, 90-195 GFLOP/s with OpenBLAS, and
SmolLM2-135M's prefill is about 17x faster (measured, ../shared/FINDINGS.md). Loading
Debian's ``libopenblas.so.0`` with ``RTLD_GLOBAL`` before ``mlx.core`` is first imported puts
its ``cblas_*`` symbols in the global scope, which the dynamic linker searches before
libmlx's own dependencies. numpy's and scipy-openblas' copies do not work: their symbols
are prefixed.

OpenBLAS picks its kernels for the processor it finds when it is loaded. An OpenBLAS older
than the processor (Debian 12's 0.3.21 on a Sapphire Rapids Xeon, measured 2026-12-07) does
not know it and falls back to its generic "Prescott" kernels: 26-30 GFLOP/s where the
SkylakeX kernels run at 116 GFLOP/s with the same results (largest difference from a
float64 product 1e-4 either way), and the sleep model prefilled at ~22 tok/s instead of
~100. So when ``OPENBLAS_CORETYPE`` is unset and a probe (a child process, since the choice
is made once per process) finds the generic kernels on a processor with AVX-512 or AVX2,
the matching core type is set before the library is loaded (:func:`core_type`). A core
type set in the environment is always left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import warnings

INSTALL_HINT = "sudo apt-get install -y libopenblas0"
_state: dict[str, object] = {}


def preload_openblas(mode: str | None = None) -> str | None:
    """Load OpenBLAS globally, once, before MLX is imported.

    Args:
        mode: ``"auto"`` (load when found, warn once when not), or ``"off"``. ``None`` reads
            the ``REVERIE_OPENBLAS`` environment variable (default ``"auto"``); benchmarks
            use it to measure both ways in child processes.

    Returns:
        The path of the loaded library, or ``None`` when not loaded (not Linux, turned
        off, not installed, or ``mlx.core`` was already imported without it).
    """
    if "path" in _state:
        return _state["path"]  # type: ignore[return-value]
    mode = mode or os.environ.get("REVERIE_OPENBLAS", "auto")
    path = None
    if sys.platform.startswith("linux") and mode != "off":
        if "mlx.core" in sys.modules:
            warnings.warn("mlx.core was imported before reverie: OpenBLAS was not preloaded; "
                          "import reverie first for fast CPU matrix products", stacklevel=2)
        else:
            path = _load_openblas()
            if path is None:
                warnings.warn("libopenblas.so.0 not found: MLX falls back to its reference BLAS, "
                              f"about 17x slower prefill on the CPU. Install it: {INSTALL_HINT}",
                              stacklevel=2)
    _state["path"] = path
    return path


def openblas_path() -> str | None:
    """The OpenBLAS library loaded by :func:`preload_openblas`, or ``None``."""
    return _state.get("path")  # type: ignore[return-value]


# The kernels OpenBLAS falls back to on an x86-64 processor it does not know.
GENERIC_CORES = frozenset({"Prescott", "Core2", "Nehalem", "Katmai", "Northwood"})
_PROBE = ("import ctypes,sys; lib=ctypes.CDLL(sys.argv[1]); "
          "lib.openblas_get_corename.restype=ctypes.c_char_p; "
          "print(lib.openblas_get_corename().decode())")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The processor's feature flags (``avx2``, ``avx512f``, ...) from ``/proc/cpuinfo``;
    empty where it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def core_type(detected: str, flags: set[str]) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to set when OpenBLAS ``detected`` its generic kernels on a
    processor whose ``flags`` allow better ones: ``"SkylakeX"`` (AVX-512), ``"Haswell"``
    (AVX2 and FMA); ``None`` when it found a real core type or nothing better is there."""
    if detected not in GENERIC_CORES:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _probe_core(candidate: str) -> str:
    """The kernels OpenBLAS ``candidate`` picks on its own (in a child process); ``""``
    when the probe fails."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, candidate], capture_output=True,
                             text=True, timeout=30, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _load_openblas() -> str | None:
    """Load the first OpenBLAS found into the global symbol scope (with a better core type
    than its generic one where :func:`core_type` says so); its name, or None."""
    for candidate in ("libopenblas.so.0", "libopenblas.so", ctypes.util.find_library("openblas")):
        if not candidate:
            continue
        if "OPENBLAS_CORETYPE" not in os.environ and ctypes.util.find_library("openblas"):
            better = core_type(_probe_core(candidate), cpu_flags())
            if better:
                os.environ["OPENBLAS_CORETYPE"] = better
                _state["core_type"] = better
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            return candidate
        except OSError:
            continue
    return None
