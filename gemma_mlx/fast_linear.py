"""Narrowing projections (o_proj, down_proj, ...) of a batch from a transposed copy of their weights, on the CPU.

An nn.Linear multiplies by its [out, in] weight transposed. On the CPU (OpenBLAS), for the projections
that narrow the width (in > out: in the 270M the attention's o_proj 1024 -> 640 and k_proj, v_proj
640 -> 256, and the MLP's down_proj 2048 -> 640), that product ran at about half speed: at 16 rows,
o_proj and down_proj took 0.38 and 0.76 ms a layer, against 0.21 and 0.40 ms for the same product
from a contiguous [in, out] copy. The copy gives the same bits (OpenBLAS sums each dot product in the
same order either way) wherever the product is past OpenBLAS's small-matrix kernel (rows x in x out
of about two million multiply-adds or more, fast_argmax.SMALL_PRODUCT); below that, the small
kernel adds in another order for each layout, so small batches (one chat reply) keep the original
product.

The copy is made the first time a batch that big passes (so a chat session never pays for it),
and only when the two products agree bit for bit on a probe batch; the weight itself stays the
parameter (adapters, fusing and saving see the model unchanged). It costs the copied weights'
memory once more: 165 MB for the 270M in float32. Decoding 16 rows of the real 270M: about 5%
faster, every reply identical. GEMMA_MLX_PLAIN_DECODE=1 leaves every projection mlx-lm's; Metal
always does.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .fast_argmax import SMALL_PRODUCT


def _copy_agrees(weight: mx.array, copy: mx.array) -> bool:
    """Both layouts give the same bits on a probe batch just past the small-matrix kernel."""
    rows = -(-SMALL_PRODUCT // weight.size)
    probe = mx.random.normal((rows, weight.shape[1]), key=mx.random.key(0)).astype(weight.dtype)
    return bool(mx.array_equal(probe @ weight.T, probe @ copy).item())


class BatchedLinear(nn.Linear):
    """nn.Linear whose batches past the small-matrix kernel multiply by the transposed copy (made on first use)."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows * self.weight.size < SMALL_PRODUCT:
            return x @ self.weight.T
        if self._copy_of is not self.weight:  # first use, or new weights loaded since: (re)make the copy
            copy = mx.contiguous(self.weight.T)
            mx.eval(copy)
            self._weight_t = copy if _copy_agrees(self.weight, copy) else False
            self._copy_of = self.weight
        if self._weight_t is False:  # the layouts disagree on this machine: the original product
            return x @ self.weight.T
        return x @ self._weight_t


def use_transposed_copies(lm: nn.Module) -> int:
    """Give the narrowing, bias-free, float32 nn.Linear layers of this model instance the batched product;
    return how many. Only this instance's layers change class, so other models keep mlx-lm's layers;
    a LoRA layer's inner linear qualifies too (its adapter's own product is unchanged)."""
    patched = 0
    for _, module in lm.named_modules():
        if type(module) is not nn.Linear or "bias" in module:
            continue
        weight = module.weight
        if weight.dtype != mx.float32 or weight.ndim != 2 or weight.shape[1] <= weight.shape[0]:
            continue
        module.__class__ = BatchedLinear
        module._weight_t = module._copy_of = None  # a leading underscore: never a parameter
        patched += 1
    return patched
