"""Route MLX's CPU matrix products to OpenBLAS.

The ``mlx-cpu`` wheel links the reference (netlib) BLAS it bundles: a 1024^3 float32 matmul
runs at about 6 GFLOP/s on a 2-core x86-64 machine, 90-195 GFLOP/s with OpenBLAS, and
SmolLM2-135M's prefill is about 17x faster (measured, ../shared/FINDINGS.md). Loading
Debian's ``libopenblas.so.0`` with ``RTLD_GLOBAL`` before ``mlx.core`` is first imported puts
its ``cblas_*`` symbols in the global scope, which the dynamic linker searches before
libmlx's own dependencies. numpy's and scipy-openblas' copies do not work: their symbols
are prefixed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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


def _load_openblas() -> str | None:
    """Load the first OpenBLAS found into the global symbol scope; its name, or None."""
    for candidate in ("libopenblas.so.0", "libopenblas.so", ctypes.util.find_library("openblas")):
        if not candidate:
            continue
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            return candidate
        except OSError:
            continue
    return None
