"""Which MLX backend we run on, and the Linux CPU BLAS preload.

`mlx[cpu]` on Linux ships a slow reference BLAS (~6 GFLOPS on a 2-core VM). If an optimized
OpenBLAS is installed (Debian: `libopenblas0-pthread`), loading it with RTLD_GLOBAL *before*
`mlx.core` is first imported makes MLX's float32 matmuls resolve to it: ~30x faster, same
results. bf16 and quantized matmuls never use BLAS on the CPU, hence float32 on Linux.

Set GEMMA_MLX_NO_BLAS_PRELOAD=1 to turn the preload off.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass

NO_PRELOAD_ENV = "GEMMA_MLX_NO_BLAS_PRELOAD"
_BLAS_CANDIDATES = ("libopenblas.so.0", "libopenblas.so")

# What preload_blas() did, so `gemma-mlx info` can say it; set once per process.
_preload_state: dict = {"attempted": False, "library": None, "reason": "not attempted"}


def preload_blas() -> str | None:
    """Load an optimized OpenBLAS into the process if we are on Linux and mlx is not imported yet.

    Returns the library name that was loaded, or None (with the reason kept for `info`).
    """
    if _preload_state["attempted"]:
        return _preload_state["library"]
    _preload_state["attempted"] = True
    if sys.platform != "linux":
        _preload_state["reason"] = "not Linux (MLX uses Accelerate/Metal)"
        return None
    if os.environ.get(NO_PRELOAD_ENV, "").strip() not in ("", "0"):
        _preload_state["reason"] = f"disabled by {NO_PRELOAD_ENV}"
        return None
    if "mlx.core" in sys.modules:
        _preload_state["reason"] = "mlx.core was imported before gemma_mlx; preload must come first"
        return None
    for name in _BLAS_CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _preload_state["library"] = name
        _preload_state["reason"] = "loaded"
        return name
    _preload_state["reason"] = "no libopenblas.so.0 found (apt-get install libopenblas0-pthread)"
    return None


@dataclass(frozen=True)
class BackendInfo:
    platform: str
    mlx_version: str
    device: str
    metal: bool
    blas: str
    default_dtype: str
    distributed: str = ""

    def lines(self) -> list[str]:
        return [
            f"platform:      {self.platform}",
            f"mlx:           {self.mlx_version}",
            f"device:        {self.device} (metal: {'yes' if self.metal else 'no'})",
            f"blas:          {self.blas}",
            f"dtype policy:  {self.default_dtype} (default for convert)",
            f"distributed:   {self.distributed}",
        ]


def is_metal() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available())


def default_dtype() -> str:
    """float32 on the CPU (BLAS-backed, fast), bfloat16 with Metal (native, half the memory)."""
    return "bfloat16" if is_metal() else "float32"


def backend_info() -> BackendInfo:
    import mlx.core as mx

    metal = is_metal()
    if metal:
        blas = "Accelerate (macOS)"
    elif _preload_state["library"]:
        blas = f"OpenBLAS preloaded ({_preload_state['library']})"
    else:
        blas = f"MLX built-in reference BLAS (slow): {_preload_state['reason']}"
    return BackendInfo(
        platform=f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        mlx_version=mx.__version__,
        device=str(mx.default_device()),
        metal=metal,
        blas=blas,
        default_dtype=default_dtype(),
        distributed=_distributed_line(),
    )


def _distributed_line() -> str:
    """Which mx.distributed backends this build has, and this process's rank (mlx.launch sets one)."""
    from .distributed import available_backends, world

    here = world()
    backends = ", ".join(available_backends()) or "none"
    return f"backends {backends}; rank {here.rank} of {here.size}" + ("" if here.distributed else " (not launched)")


def machine_memory() -> int | None:
    """Physical RAM in bytes (unified memory on a Mac), or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class _DropInfoLines:
    """A stdout stand-in while mlx-lm runs: its "[INFO] Loading" style lines are dropped, because our
    stages report their own progress; anything else it prints goes to stderr (stdout is for results)."""

    def __init__(self, target):
        self.target, self.partial = target, ""

    def write(self, text: str) -> int:
        self.partial += text  # print() writes a line in pieces: keep the unfinished one
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if not line.startswith("[INFO]"):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_line(self) -> None:
        if self.partial and not self.partial.startswith("[INFO]"):
            self.target.write(self.partial)
        self.partial = ""


@contextlib.contextmanager
def quiet_mlx_lm():
    """Run mlx-lm code (convert, save) without its [INFO] lines in our output."""
    sink = _DropInfoLines(sys.stderr)
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.close_line()
