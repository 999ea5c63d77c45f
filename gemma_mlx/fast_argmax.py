"""The greedy token without the full float32 output layer: a half-precision screen, then exact logits.

On a CPU, a batch-16 decode step of the 270M spends more time in the output layer (262,144 x 640
float32 weights, 670 MB read per step) than in the whole transformer. A greedy row needs only the
largest logit, so this module finds it in two passes:

1. a half-precision copy of the output weights gives approximate logits a_j for every token
   (torch's half-precision matmul on the CPU; MLX's own quantized and half-precision matmuls are
   5-10x *slower* than float32 on a CPU). The format is float16 or bfloat16, whichever this CPU
   multiplies faster (measured once, fastest_format): float16 took a quarter of float32's time on
   one of our machines and 2.3x it on another (no FP16 arithmetic), where bfloat16 took a third.
   bfloat16's coarser rounding (2^-8 against 2^-11) widens the bound, so more candidates pass;
   they are still a few hundred at most of 262,144;
2. a rigorous per-row bound beta >= |e_j - a_j|, where e_j is the float32 logit the plain path
   computes, rules out every token whose a_j is below a threshold T; the float32 logits of the
   few remaining tokens (and of every token the repetition penalty touches) are computed exactly,
   with MLX, from the same hidden state; the penalty is applied to them with the plain arithmetic.

The bound, for hidden state h (float32) and its half rounding h16, W_j and W16_j likewise (u16 is the
half format's unit roundoff):
|e_j - a_j| <= ||h - h16|| ||W_j|| + ||h16|| ||W_j - W16_j||   (the roundings of the inputs)
             + gamma (||h|| ||W_j|| + ||h16|| ||W16_j||)        (float32 sums of K terms, any order)
             + u16 |a_j|, |a_j| <= ||h16|| ||W16_j|| (1 + gamma)  (the result rounded to half)
with gamma = K u32 / (1 - K u32), taken at the largest norms over all tokens. It assumes the half
matmul adds in float32 and rounds once at the end; a check at start-up (the bound against the
float32 logits of probe hidden states) turns the screen off where that visibly does not hold.

A row's argmax is then exact: with m the row's best a_j and p its penalty, the top token's final
logit is at least low = pen(m - beta) (pen: the largest drop the penalty can cause), so a token
with a_j < T = low - beta has e_j < low, is not penalised, and cannot win. Each row is checked
(best exact logit >= T + beta) and, should that ever fail, or the candidates be too many, the step
falls back to the full float32 logits. Ties go to the lowest token id, as in the plain argmax.

Switch: GEMMA_MLX_FAST_ARGMAX=0 turns it off, =1 turns it on wherever it can run (a float32
output layer as an embedding or a bias-free linear, torch importable); unset, it is on for
vocabularies of 32k tokens or more on the CPU, in steps of 4 rows or more (one reply alone would
not win back the start-up), and in steps of any size once the model's head is made: chat and the
arena make it as they load a model (decode_step.warm_up), since a session serves many replies
(one greedy row of the 270M: 10.4 -> 14.1 tokens/s). GEMMA_MLX_SCREEN_FORMAT=float16 or bfloat16
forces the half format.
GEMMA_MLX_PLAIN_DECODE=1 turns off every decode shortcut, this one included. On Metal it is off by
default: a float16 copy read by MLX's own GPU kernels would be the way there, and it has not been
measured.
"""

from __future__ import annotations

import os
import weakref

import mlx.core as mx
import numpy as np

SWITCH_ENV = "GEMMA_MLX_FAST_ARGMAX"
AUTO_VOCAB = 32768  # the screen pays for itself on big output layers only,
AUTO_ROWS = 4  # and on batches: its start-up (a half copy, the norms, the check) takes seconds
MAX_CANDIDATES = 4096  # more distinct candidate tokens than this in a step: the full logits instead
SMALL_PRODUCT = 2**21  # candidates' rows x columns x width at least this: past OpenBLAS's small-matrix path
U32 = 2.0**-24
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # the unit roundoff of each half format
FORMAT_ENV = "GEMMA_MLX_SCREEN_FORMAT"  # float16 or bfloat16; unset: the faster on this machine (fastest_format)
# (id(model), switch, asked format) -> (weak references to it and to its output weight, its GreedyHead or None).
# A new weight (validation during training puts new turn-token rows in) makes a new head.
_HEADS: dict[int, tuple] = {}


def switch() -> str:
    """'on', 'off' or 'auto', from GEMMA_MLX_FAST_ARGMAX."""
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "on" if value in ("1", "on", "true", "yes") else "auto"


def format_from_env() -> str | None:
    """The half format GEMMA_MLX_SCREEN_FORMAT asks for, or None (unset: measure)."""
    value = os.environ.get(FORMAT_ENV, "").strip().lower()
    if not value:
        return None
    if value not in UNIT:
        from .errors import ConfigError

        raise ConfigError(f"{FORMAT_ENV}={value!r}: use one of {', '.join(UNIT)} (or unset it to use the faster "
                          "on this machine).")
    return value


def fastest_format(weight: np.ndarray) -> str:
    """float16 or bfloat16, whichever multiplies a batch of 16 rows by (a slice of) the output layer faster
    on this CPU (the rule: pick_format). Which one wins depends on the chip: one of our machines ran
    float16 at a quarter of float32's time, another (AVX512-BF16, no FP16 arithmetic) at 2.3x
    float32's, while bfloat16 took a third."""
    import time

    import torch

    part = torch.from_numpy(np.ascontiguousarray(weight[:32768]))
    rows = part[:16].clone()
    seconds = {}
    for name in UNIT:
        w, h = part.to(getattr(torch, name)), rows.to(getattr(torch, name))
        torch.nn.functional.linear(h, w)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.linear(h, w)
        seconds[name] = time.perf_counter() - started
    return pick_format(seconds)


def pick_format(seconds: dict[str, float]) -> str:
    """The half format to screen with, given each one's time: float16 unless bfloat16 is 1.5x faster or more
    (float16's bound is 8x tighter, so fewer candidates pass)."""
    return "bfloat16" if seconds["bfloat16"] * 1.5 <= seconds["float16"] else "float16"


def penalty_floor(x: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """The least a logit x can become under the repetition penalty (divided when positive, multiplied
    when negative; penalty 1: unchanged)."""
    return np.minimum(x, np.where(x < 0, x * penalty, x / penalty))


class GreedyHead:
    """A model split into its hidden states and its output layer, with the half-precision screen
    (`half`: float16 or bfloat16; None: the faster on this machine)."""

    def __init__(self, inner, weight: mx.array, half: str | None = None):
        import torch  # (gemma_mlx/__init__ sets OMP_WAIT_POLICY=PASSIVE: spinning threads halved the gain)

        self.inner, self.weight = inner, weight  # never the model itself: the cache holds a head, not a model
        self.torch = torch
        full = np.asarray(weight)
        self.format = half or fastest_format(full)
        self.unit = UNIT[self.format]
        self.half = torch.from_numpy(full).to(getattr(torch, self.format))
        norms = np.zeros(3)  # the largest ||W_j||, ||W_j - W16_j||, ||W16_j|| over all tokens
        for start in range(0, full.shape[0], 16384):
            part = full[start:start + 16384].astype(np.float64)
            rounded = self.half[start:start + 16384].to(torch.float64).numpy()
            norms = np.maximum(norms, [np.linalg.norm(part, axis=1).max(), np.linalg.norm(part - rounded, axis=1).max(),
                                       np.linalg.norm(rounded, axis=1).max()])
        self.w_norm, self.w_diff, self.w16_norm = norms
        self.gamma = full.shape[1] * U32 / (1 - full.shape[1] * U32)

    # ----- the two halves of the model's forward pass ---------------------------------------------
    def hidden(self, inputs: mx.array, cache) -> mx.array:
        return self.inner(inputs, cache=cache)[:, -1, :]

    def logits(self, hidden: mx.array) -> mx.array:
        return hidden @ self.weight.T

    def exact_logits(self, hidden: mx.array, candidates: set[int]) -> tuple[mx.array, np.ndarray]:
        """The float32 logits [B, C] of the candidate tokens, bit for bit the full layer's, and their ids [C].

        A small product goes down another path in OpenBLAS (its small-matrix kernel, on AVX-512 CPUs,
        for rows x columns x width below about a million), which adds in another order: a few candidates
        alone would get logits a rounding step away from the full layer's. So the candidates are padded
        with the lowest other token ids up to a product of SMALL_PRODUCT (an extra candidate's exact
        logit can only confirm the argmax, never change it). _proved checks this at start-up.
        """
        rows, width = hidden.shape[0], self.weight.shape[1]
        need = min(self.weight.shape[0], -(-SMALL_PRODUCT // (rows * width)))
        if len(candidates) < need:
            extra = (t for t in range(self.weight.shape[0]) if t not in candidates)
            candidates = candidates | {next(extra) for _ in range(need - len(candidates))}
        columns = np.array(sorted(candidates), dtype=np.int32)
        return hidden @ self.weight[mx.array(columns)].T, columns

    # ----- the screen -----------------------------------------------------------------------------
    def screen(self, hidden: mx.array):
        """Approximate logits [B, V] (half precision, torch) and the bound beta [B] (float64) on their error."""
        torch = self.torch
        h = np.asarray(hidden.astype(mx.float32)).astype(np.float32)
        h16 = torch.from_numpy(h).to(self.half.dtype)
        approx = torch.nn.functional.linear(h16, self.half)
        h64, r64 = h.astype(np.float64), h16.to(torch.float64).numpy()
        h_norm, r_norm, dh = (np.linalg.norm(v, axis=1) for v in (h64, r64, h64 - r64))
        largest = r_norm * self.w16_norm * (1 + self.gamma)  # >= |a_j|, without another pass over approx
        beta = (dh * self.w_norm + r_norm * self.w_diff + self.gamma * (h_norm * self.w_norm + r_norm * self.w16_norm)
                + self.unit * largest / (1 - self.unit))
        return approx, beta * 1.01 + 1e-6

    def argmax(self, hidden: mx.array, penalised: dict[int, tuple[list[int], float]], exact_penalty):
        """Every row's greedy token [B] (mx.int32), or None when the screen cannot prove it (full logits then).

        penalised: row -> (the tokens its repetition penalty touches, its penalty). exact_penalty(E, columns)
        applies the penalty to exact logits E [B, U] whose column c is token columns[c], as the plain step would.
        """
        torch = self.torch
        approx, beta = self.screen(hidden)
        rows = approx.shape[0]
        best = approx.amax(dim=1).to(torch.float64).numpy()  # (max(dim=1) also finds the indices: 7x slower)
        penalty = np.array([penalised.get(b, ((), 1.0))[1] for b in range(rows)], dtype=np.float64)
        threshold = penalty_floor(best - beta, penalty) - beta
        # compared in float32 (exact for either half format), the threshold rounded down: a token left out has
        # a_j < T still
        below = threshold.astype(np.float32)
        below = np.where(below.astype(np.float64) > threshold, np.nextafter(below, np.float32(-np.inf)), below)
        chosen = approx >= torch.from_numpy(below)[:, None]
        candidates = set(torch.nonzero(chosen)[:, 1].tolist())
        for tokens, _ in penalised.values():
            candidates.update(tokens)
        if len(candidates) > MAX_CANDIDATES:
            return None
        exact, columns = self.exact_logits(hidden, candidates)
        exact = exact_penalty(exact, columns)
        pick = mx.argmax(exact, axis=-1)
        top = np.asarray(mx.take_along_axis(exact, pick[:, None], axis=1)[:, 0].astype(mx.float32)).astype(np.float64)
        if not np.all(top >= threshold + beta):
            return None
        return mx.array(columns)[pick]


def _parts(model):
    """(inner model, output weight) when model(x) is exactly inner(x) @ weight.T, else None."""
    import mlx.nn as nn

    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    head = getattr(model, "lm_head", None)
    if head is not None:
        if type(head) is not nn.Linear or "bias" in head:
            return None
        return inner, head.weight
    embed = getattr(inner, "embed_tokens", None)
    if type(embed) is not nn.Embedding:
        return None
    return inner, embed.weight


def _proved(model, head: GreedyHead) -> bool:
    """The split gives the model's own logits, bit for bit, the screen's error stays within its bound, and
    candidates' exact logits are the full layer's bit for bit (checked on a few probe rows of one token, as
    decode steps have)."""
    probe = mx.array([[t % head.weight.shape[0]] for t in (2, 10, 100, 1000)])  # rows of one token, as in a step
    for rows in (probe[:1], probe):
        if not mx.array_equal(model(rows)[:, -1, :], head.logits(head.inner(rows)[:, -1, :])).item():
            return False
    hidden = head.inner(probe)[:, -1, :]
    for scale in (1.0, 0.01, 30.0):
        h = hidden * scale
        approx, beta = head.screen(h)
        full = head.logits(h)
        exact = np.asarray(full).astype(np.float64)
        if not np.all(np.abs(exact - approx.to(head.torch.float64).numpy()) <= beta[:, None]):
            return False
        for rows in (slice(0, 1), slice(0, 4)):  # a few candidates, padded: the full layer's bits
            candidates, columns = head.exact_logits(h[rows], {1, 1000 % head.weight.shape[0]})
            if not mx.array_equal(candidates, full[rows][:, mx.array(columns)]).item():
                return False
    return True


def _forget(key: tuple) -> None:
    if _HEADS is not None:  # None while the interpreter shuts down
        _HEADS.pop(key, None)


def _head_key(model) -> tuple:
    return id(model), switch(), format_from_env()  # auto may say no where on says yes


def made_head(model) -> GreedyHead | None:
    """The head greedy_head already made for this model under the current settings, without making one."""
    known = _HEADS.get(_head_key(model))
    return known[2] if known is not None and known[0]() is model else None


def greedy_head(model) -> GreedyHead | None:
    """The model's GreedyHead where the switch and the model allow one (made once per model and output
    weight), else None."""
    if switch() == "off":
        return None
    parts = _parts(model)
    weight = None if parts is None else parts[1]
    key = _head_key(model)
    known = _HEADS.get(key)
    if known is not None and known[0]() is model and known[1]() is weight:
        return known[2]
    head = None
    if weight is not None and weight.dtype == mx.float32 and weight.ndim == 2:
        big = weight.shape[0] >= AUTO_VOCAB and mx.default_device().type == mx.cpu
        if switch() == "on" or big:
            half = format_from_env()  # a misspelt format is the user's to fix, not a silent fallback
            try:
                head = GreedyHead(*parts, half=half)
                head = head if _proved(model, head) else None
            except ImportError:  # no torch: the plain output layer
                head = None
            except Exception:  # a model whose parts do not split as expected: the plain output layer
                head = None
    _HEADS[key] = (weakref.ref(model, lambda _, key=key: _forget(key)),
                         weakref.ref(weight) if weight is not None else (lambda: None), head)
    return head
