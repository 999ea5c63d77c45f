"""gemma-mlx: give a small Gemma 3 model a personality with LoRA on MLX."""

from .backend import preload_blas

# Must run before anything imports mlx.core (see backend.py for why); it only loads a shared library.
preload_blas()

__version__ = "0.1.0"
