"""Reverie: local language models that learn from their own conversations by sleeping.

Importing this package loads OpenBLAS before MLX (see :mod:`reverie.runtime.blas`), so
import ``reverie`` (or any of its modules) before ``mlx``.
"""

from reverie.runtime.blas import preload_openblas

preload_openblas()

__version__ = "0.1.0"
