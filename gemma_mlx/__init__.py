"""gemma-mlx: give a small Gemma 3 model a personality with LoRA on MLX."""

import os

from .backend import preload_blas

# torch (imported by transformers, and used by fast_argmax's screen) reads this once, when it loads its
# OpenMP runtime: idle threads then sleep instead of spinning on the cores MLX's next step needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Must run before anything imports mlx.core (see backend.py for why); it only loads a shared library.
preload_blas()

__version__ = "0.1.0"
