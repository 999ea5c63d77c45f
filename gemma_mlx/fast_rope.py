"""Gemma 3's query/key norms and rotary positions of a decode step from shared tables, on the CPU.

On the CPU MLX has no kernel for `mx.fast.rope` or `mx.fast.rms_norm`: each call runs the
generic ops they are defined by. A batch decode step of the 270M calls RoPE 36 times (queries and
keys of 18 layers), and every call computes its cosines and sines again from the positions: about
20 small ops, 4.7 ms of a 16-row step, and the two norms add 1.7 ms more. Here the cosines and
sines of every position are computed once per rotary setting (the same ops on the same float32
values, so the same bits), a step gathers each row's line, and one compiled function does the two
norms and both rotations: 2.4 ms instead of 6.3 in a like-for-like measurement. Every output is
checked bit for bit against mlx-lm's path on a probe before a model uses it; where it differs
(another MLX, another machine) the layer keeps mlx-lm's code.

Only single-token steps through mlx-lm's batch caches (one offset per row) take this path, in the
models `models.load_model` loads (compare, chat, the arena, prefs, length calibration); prompts and
training keep mlx-lm's code.
GEMMA_MLX_PLAIN_DECODE=1 and Metal keep mlx-lm's attention everywhere (models.fast_positions).
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

ATTENTION_MODULE = "mlx_lm.models.gemma3_text"
FIRST_ROWS = 1024  # positions a table holds at first; it doubles when a longer context needs more


class RotaryTable:
    """cos and sin of every position below `rows` for one RoPE setting, as mx.fast.rope computes them on the CPU."""

    def __init__(self, dims: int, base: float, scale: float):
        self.dims, self.base, self.scale = dims, base, scale
        self.rows = 0
        self.both = None  # [rows, 2, dims / 2]: cos, sin

    def grow(self, rows: int) -> None:
        """Hold at least `rows` positions. The arithmetic is mx.fast.rope's CPU fallback, op for op."""
        if rows <= self.rows:
            return
        rows = max(FIRST_ROWS, 1 << (rows - 1).bit_length())
        half = self.dims // 2
        positions = mx.arange(rows, dtype=mx.float32) * mx.array(self.scale, mx.float32)
        inverse = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32)
                         * mx.array(math.log(self.base) / half, mx.float32))
        theta = positions[:, None] * inverse
        self.both = mx.stack([mx.cos(theta), mx.sin(theta)], axis=1)
        mx.eval(self.both)
        self.rows = rows

    def lines(self, offsets: mx.array, bound: int) -> mx.array:
        """[B, 2, 1, 1, dims / 2] cos/sin of each row's position (offsets <= bound, known without a sync)."""
        self.grow(bound + 1)
        picked = self.both[offsets]
        return picked.reshape(picked.shape[0], 2, 1, 1, picked.shape[-1])


_TABLES: dict[tuple, RotaryTable] = {}


def table_for(rope) -> RotaryTable:
    key = (rope.dims, float(rope.base), float(rope.scale))
    if key not in _TABLES:
        _TABLES[key] = RotaryTable(*key)
    return _TABLES[key]


def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """mx.fast.rope's CPU fallback (not traditional, all dims rotated) with cos and sin given."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@lru_cache(maxsize=None)
def _norms_and_rotations(eps: float):
    """The compiled step for one norm epsilon: both norms (mlx-lm's Gemma RMSNorm) and both rotations."""

    def step(queries, keys, q_weight, k_weight, lines):
        cos, sin = lines[:, 0], lines[:, 1]
        queries = mx.fast.rms_norm(queries, 1.0 + q_weight, eps)
        keys = mx.fast.rms_norm(keys, 1.0 + k_weight, eps)
        return _rotate(queries, cos, sin), _rotate(keys, cos, sin)

    return mx.compile(step)


# where each of mlx-lm's batch caches keeps, as a Python int, a count no row's position exceeds
_BOUNDS = {"BatchKVCache": "_idx",  # tokens held (a row's position: those minus its left padding)
           "BatchRotatingKVCache": "_offset"}  # tokens seen (its _idx is a place in the window)


def _position_bound(cache) -> int | None:
    """The largest position a batch cache's rows can be at, without a sync; None for another cache."""
    name = _BOUNDS.get(type(cache).__name__)
    value = getattr(cache, name, None) if name else None
    return value if isinstance(value, int) else None


class TableRopeAttention(nn.Module):
    """Mixed into a Gemma 3 attention layer: its single-token batch steps take the tables' path."""

    def __call__(self, x, mask=None, cache=None):
        offsets = getattr(cache, "offset", None)
        bound = _position_bound(cache) if cache is not None else None
        if x.shape[1] != 1 or not isinstance(offsets, mx.array) or offsets.ndim != 1 or bound is None:
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        lines = table_for(self.rope).lines(offsets, bound)
        step = _norms_and_rotations(float(self.q_norm.eps))
        queries, keys = step(queries, keys, self.q_norm.weight, self.k_norm.weight, lines)
        keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _qualifies(layer) -> bool:
    rope, q_norm, k_norm = (getattr(layer, name, None) for name in ("rope", "q_norm", "k_norm"))
    return (type(layer).__module__ == ATTENTION_MODULE and type(layer).__name__ == "Attention"
            and type(rope) is nn.RoPE and not rope.traditional and rope.dims == layer.head_dim
            and q_norm is not None and k_norm is not None and q_norm.eps == k_norm.eps
            and layer.q_norm.weight.dtype == mx.float32)


def agrees_with_mlx_lm(layer, rows: int = 3) -> bool:
    """The tables' path gives mlx-lm's bits for this layer's settings on a probe."""
    position = FIRST_ROWS - 1
    heads, width = layer.n_heads, layer.head_dim
    key = mx.random.key(1)
    queries = mx.random.normal((rows, heads, 1, width), key=key)
    keys = mx.random.normal((rows, layer.n_kv_heads, 1, width), key=mx.random.split(key)[0])
    offsets = mx.array([1, position // 2, position][:rows], dtype=mx.int32)
    eps = float(layer.q_norm.eps)
    expected_q = layer.rope(mx.fast.rms_norm(queries, 1.0 + layer.q_norm.weight, eps), offset=offsets)
    expected_k = layer.rope(mx.fast.rms_norm(keys, 1.0 + layer.k_norm.weight, eps), offset=offsets)
    lines = table_for(layer.rope).lines(offsets, position)
    got_q, got_k = _norms_and_rotations(eps)(queries, keys, layer.q_norm.weight, layer.k_norm.weight, lines)
    return bool(mx.array_equal(expected_q, got_q).item() and mx.array_equal(expected_k, got_k).item())


def use_rotary_tables(lm: nn.Module) -> int:
    """Give this model instance's Gemma 3 attention layers the tables' decode step, where it gives mlx-lm's
    bits; return how many. Per-instance classes, so other models in the process keep mlx-lm's."""
    patched = 0
    for _, module in lm.named_modules():
        if not _qualifies(module) or not agrees_with_mlx_lm(module):
            continue
        module.__class__ = _subclass(type(module))
        patched += 1
    return patched


@lru_cache(maxsize=None)
def _subclass(attention: type) -> type:
    return type("TableRope" + attention.__name__, (TableRopeAttention, attention), {})
