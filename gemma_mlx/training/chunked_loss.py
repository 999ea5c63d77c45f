"""Cross-entropy over a large vocabulary without the [N, V] logits ("cut cross-entropy").

Gemma 3's output layer has 262,144 rows. Materialized in float32, the logits of a batch's trained
positions are most of a step's memory, and the loss, the softmax and the gradient each pass over
all of them. Here the output matrix is walked in chunks of rows:

- forward: each chunk's logits [N, C] give a logsumexp [N]; the chunks' logsumexps combine into
  the full one. The target logit is one dot product per position, outside the chunked part, so
  ordinary autodiff gives its gradient (the "- onehot" half of softmax - onehot).
- gradient (a custom vjp): d logsumexp / d hidden = softmax @ matrix is accumulated during the
  forward pass itself, chunk by chunk, with an online softmax; the backward only scales it by each
  position's incoming gradient. So each chunk's logits are computed once per step (recomputing
  them in the backward cost a third more output-layer matmul), and the backward never holds [N, V]
  either. The output matrix is frozen (the tied embedding), so only the trainable turn-token
  rows, spliced in as columns of the logits, get a weight gradient.

`GEMMA_MLX_FULL_LOGITS=1` in the environment forces the plain path (full logits), for comparison.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from .. import fast_exp

# Rows of the output matrix per chunk: 16 chunks for Gemma 3; at 600 trained positions a float32
# chunk of logits is about 40 MB (and a few live at once) instead of 630 MB for the full logits.
CHUNK_ROWS = 16384

FULL_LOGITS_ENV = "GEMMA_MLX_FULL_LOGITS"


def full_logits_forced() -> bool:
    return os.environ.get(FULL_LOGITS_ENV, "") not in ("", "0")


class QuantizedRows:
    """A quantized output matrix read like a plain [V, H] one, chunk by chunk, never de-quantized whole.

    A 4-bit base (QLoRA) quantizes the tied embedding too. A chunk's logits and its softmax-weighted
    rows are quantized matmuls on that chunk's slice of the packed weights. De-quantizing each chunk
    to float rows instead held every chunk at once: the backends allocate an op's output when they
    queue it, and the chunks queue before the first is done (a whole float copy of the table, 0.67
    GB for the 270M, 2.7 GB for a 4B). A slice or a gather (`matrix[targets]`) gives float rows.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.shape = (layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits)

    def _packed(self, index):
        layer, biases = self.layer, self.layer.get("biases")
        return (layer.weight[index], layer.scales[index], biases[index] if biases is not None else None)

    def _options(self) -> dict:
        return {"group_size": self.layer.group_size, "bits": self.layer.bits, "mode": getattr(self.layer, "mode", "affine")}

    def __getitem__(self, index) -> mx.array:
        weight, scales, biases = self._packed(index)
        return mx.dequantize(weight, scales=scales, biases=biases, **self._options())

    def times_rows(self, x: mx.array, start: int, stop: int) -> mx.array:
        """x [N, H] @ rows[start:stop].T: [N, C]."""
        return mx.quantized_matmul(x, *self._packed(slice(start, stop)), transpose=True, **self._options())

    def weigh_rows(self, p: mx.array, start: int, stop: int) -> mx.array:
        """p [N, C] @ rows[start:stop]: [N, H]."""
        return mx.quantized_matmul(p, *self._packed(slice(start, stop)), transpose=False, **self._options())


def output_matrix(lm: nn.Module) -> mx.array | QuantizedRows | None:
    """The [V, H] output matrix when the chunked loss can use it, else None (use full logits).

    A quantized output layer comes as QuantizedRows (quantized matmuls chunk by chunk). None for one
    with a bias or softcapped logits, one that trains (the chunked backward gives no gradient to
    the matrix), or when forced by the env.
    """
    if full_logits_forced() or getattr(lm.args, "final_logit_softcapping", None):
        return None
    layer = lm["lm_head"] if "lm_head" in lm else lm.model.embed_tokens
    if type(layer) in (nn.QuantizedLinear, nn.QuantizedEmbedding) and "bias" not in layer:
        return QuantizedRows(layer)
    plain = type(layer) is nn.Linear if "lm_head" in lm else type(layer) is nn.Embedding
    if not plain or "bias" in layer or "weight" in layer.trainable_parameters():
        return None
    return layer.weight


def _turns_in(start: int, stop: int, turn_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """(k, column within the chunk) of each turn token whose row falls in rows start:stop."""
    return [(k, t - start) for k, t in enumerate(turn_ids) if start <= t < stop]


def _chunk(weight: mx.array, start: int, stop: int, turn_ids: tuple[int, ...], turn_rows: mx.array | None):
    """Rows start:stop of a float output matrix, with the trainable turn-token rows in place of their own."""
    rows = weight[start:stop]
    inside = _turns_in(start, stop, turn_ids)
    if inside:
        rows[mx.array([local for _, local in inside])] = turn_rows[mx.array([k for k, _ in inside])].astype(rows.dtype)
    return rows


def _bounds(vocab: int, chunk: int | None) -> list[tuple[int, int]]:
    chunk = chunk or CHUNK_ROWS
    return [(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]


def _logits(hidden, weight, start, stop, turn_ids, turn_rows):
    """Float32 logits [N, C] of one chunk, turn columns from `turn_rows`, and a function giving p [N, C] @ those rows."""
    if not isinstance(weight, QuantizedRows):
        rows = _chunk(weight, start, stop, turn_ids, turn_rows)
        return (hidden @ rows.T).astype(mx.float32), lambda p: p @ rows
    logits = weight.times_rows(hidden, start, stop)
    inside = _turns_in(start, stop, turn_ids)
    if not inside:
        return logits.astype(mx.float32), lambda p: weight.weigh_rows(p, start, stop)
    columns, own = mx.array([local for _, local in inside]), turn_rows[mx.array([k for k, _ in inside])].astype(hidden.dtype)
    logits[:, columns] = hidden @ own.T

    def weigh(p):  # the packed rows for every column but the turn tokens', whose rows are the trainable ones
        return weight.weigh_rows(_zero_columns(p, columns), start, stop) + p[:, columns] @ own

    return logits.astype(mx.float32), weigh


def _zero_columns(p: mx.array, columns: mx.array) -> mx.array:
    """p with the given columns set to 0 (a new array; p itself is left alone)."""
    mask = mx.ones((p.shape[1],), dtype=p.dtype)
    mask[columns] = 0
    return p * mask


def chunked_logsumexp(hidden: mx.array, weight: mx.array, turn_ids: tuple[int, ...] = (),
                      turn_rows: mx.array | None = None, chunk: int | None = None) -> mx.array:
    """logsumexp over the vocabulary of the float32 logits hidden @ weight.T, [N], never holding [N, V].

    Columns `turn_ids` of the logits come from `turn_rows` [T, H] instead of the matrix. No gradient
    (validation); `logsumexp_with_gradient` is the training twin. `chunk` defaults to CHUNK_ROWS.
    """
    parts = [fast_exp.logsumexp(_logits(hidden, weight, start, stop, turn_ids, turn_rows)[0], axis=-1)
             for start, stop in _bounds(weight.shape[0], chunk)]
    return fast_exp.logsumexp(mx.stack(parts), axis=0)


def logsumexp_with_gradient(hidden: mx.array, weight: mx.array, turn_ids: tuple[int, ...] = (),
                            turn_rows: mx.array | None = None, chunk: int | None = None) -> mx.array:
    """chunked_logsumexp whose gradient reaches `hidden` and `turn_rows` (the matrix is a constant).

    d lse / d hidden = softmax @ weight, [N, H], is accumulated in the forward pass, chunk by chunk,
    with an online softmax (a running max and sum rescale what came before, as in flash attention):
    the logits are computed once per step, as on the full-logits path, instead of again in the
    backward. The backward only scales it by each position's incoming gradient.
    """
    if turn_rows is None:
        turn_rows = mx.zeros((0, weight.shape[1]), dtype=mx.float32)
    bounds = _bounds(weight.shape[0], chunk)

    @mx.custom_function
    def lse(h, rows_t):
        peak = mx.full((h.shape[0],), -mx.inf, dtype=mx.float32)  # running max [N]
        total = mx.zeros((h.shape[0],), dtype=mx.float32)  # running sum of exp(logit - peak) [N]
        toward = mx.zeros(h.shape, dtype=mx.float32)  # running sum of exp(logit - peak) * row [N, H]
        turn_logits = [None] * len(turn_ids)
        for start, stop in bounds:
            logits, weigh = _logits(h, weight, start, stop, turn_ids, rows_t)
            new_peak = mx.maximum(peak, logits.max(axis=-1))
            rescale = mx.exp(peak - new_peak)
            scaled = fast_exp.exp(logits - new_peak[:, None])  # [N, C]: most of the step's non-matmul time
            total = total * rescale + scaled.sum(axis=-1)
            toward = toward * rescale[:, None] + weigh(scaled.astype(h.dtype)).astype(mx.float32)
            peak = new_peak
            for k, token in enumerate(turn_ids):
                if start <= token < stop:
                    turn_logits[k] = logits[:, token - start]
        result = peak + mx.log(total)
        # softmax @ weight [N, H], and the turn tokens' logits [N, T] (their softmax needs the final lse)
        turns = mx.stack(turn_logits, axis=-1) if turn_ids else mx.zeros((h.shape[0], 0), dtype=mx.float32)
        return result, toward / total[:, None], turns

    @lse.vjp
    def lse_vjp(primals, cotangents, outputs):
        h, rows_t = primals
        result, toward, turns = outputs
        upstream = cotangents[0][:, None]  # [N, 1]; the other two outputs are not used downstream
        d_hidden = (upstream * toward).astype(h.dtype)
        d_rows = ((upstream * mx.exp(turns - result[:, None])).astype(h.dtype).T @ h).astype(rows_t.dtype)
        return d_hidden, d_rows

    return lse(hidden, turn_rows)[0]


def target_logits(hidden: mx.array, weight: mx.array, targets: mx.array, turn_ids: tuple[int, ...] = (),
                  turn_rows: mx.array | None = None) -> mx.array:
    """The float32 logit of each position's target, [N], rounded like the matmul's output would be."""
    rows = weight[targets]  # [N, H]
    for k, token in enumerate(turn_ids):
        rows = mx.where((targets == token)[:, None], turn_rows[k].astype(rows.dtype), rows)
    dots = (hidden.astype(mx.float32) * rows.astype(mx.float32)).sum(axis=-1)
    return dots.astype(hidden.dtype).astype(mx.float32)


def chunked_cross_entropy(hidden: mx.array, weight: mx.array, targets: mx.array, turn_ids: tuple[int, ...] = (),
                          turn_rows: mx.array | None = None, chunk: int | None = None,
                          gradient: bool = True) -> tuple[mx.array, mx.array]:
    """Per-position cross-entropy [N] of the logits hidden @ weight.T (turn columns spliced), and the logsumexp [N].

    `gradient=False` (validation) skips the forward-pass gradient work; the loss is then not differentiable.
    """
    lse = (logsumexp_with_gradient if gradient else chunked_logsumexp)(hidden, weight, turn_ids, turn_rows, chunk)
    return lse - target_logits(hidden, weight, targets, turn_ids, turn_rows), lse
