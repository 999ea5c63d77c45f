"""mlx-lm's batch decode step without the work gemma-mlx never reads.

mlx-lm's BatchGenerator, at every step and for every row, normalises the logits over the whole
vocabulary (a logsumexp: 262,144 exps per row per token on Gemma 3), hands each row's logits
processors that row alone, and keeps a log-probability vector per row. gemma-mlx reads only the
tokens, so its step (LeanGenerationBatch) does less:

- Greedy rows take the argmax of their logits. No normalisation: subtracting a row's logsumexp
  moves every logit of that row by the same amount, so the chosen token is the same (the one
  exception: two logits within float32 rounding of each other, where either choice is as right).
- The repetition penalty, which nearly every row has (compare's default is 1.1), runs for all its
  rows at once, one gather and one scatter, with mlx-lm's arithmetic; other processors still run
  row by row, on their own rows only.
- Only sampled rows are normalised, and each sampler sees its own row, as in mlx-lm.

It is installed by giving the generator's (persistent) generation batch this subclass: its state
and the rest of its code stay mlx-lm's. The prompt batch gets a subclass too (LeanPromptBatch), so a
new row's first token, made as its prompt is handed over to decoding, comes from the lean step as
well (mlx-lm's full step there cost about twice a lean one: 0.23 s of a 16-prompt batch). Where
mlx-lm's internals are not the ones this was written against (another version), or where
GEMMA_MLX_PLAIN_DECODE=1 is set, the generator is left as mlx-lm made it (and models.load_model leaves
the model's GELU mlx-lm's).

rows_that_fit sizes the batch: every row at once, unless their KV caches would not fit in memory.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import fast_exp

PLAIN_ENV = "GEMMA_MLX_PLAIN_DECODE"
MEMORY_SHARE = 0.5  # of the machine's memory, for the decoding rows' caches and logits (rows_that_fit)
# what LeanGenerationBatch._step reads and writes on mlx-lm's GenerationBatch
_STATE = ("model", "uids", "prompt_cache", "tokens", "samplers", "fallback_sampler", "logits_processors",
          "_token_context", "_current_tokens", "_current_logprobs", "_next_tokens", "_next_logprobs")
# what LeanPromptBatch.generate reads and resets on mlx-lm's PromptProcessingBatch
_PROMPT_STATE = ("model", "uids", "prompt_cache", "tokens", "samplers", "fallback_sampler", "logits_processors",
                 "stop_sequences", "max_tokens")


class RepetitionPenalty:
    """mlx-lm's repetition penalty (same rule, same arithmetic) as an object the lean step can batch.

    Logits of the last `context_size` context tokens are divided by `penalty` when positive and
    multiplied by it when negative. Called on one row, it is an ordinary mlx-lm logits processor.
    """

    def __init__(self, penalty: float, context_size: int = 20):
        if penalty < 0:
            raise ValueError(f"the repetition penalty must be >= 0, not {penalty}")
        self.penalty = float(penalty)
        self.context_size = context_size

    def __call__(self, tokens, logits):
        if len(tokens) == 0:
            return logits
        recent = tokens[-self.context_size:]
        logits[:, recent] = penalize(logits[:, recent], self.penalty)
        return logits


def penalize(selected: mx.array, penalty) -> mx.array:
    return mx.where(selected < 0, selected * penalty, selected / penalty)


def kv_bytes_per_token(model) -> int | None:
    """Bytes of KV cache one token of one row holds (every layer, keys and values), or None if unknown.

    Counts every layer at full length; Gemma's sliding-window layers hold less, so this errs on
    the side of fewer rows.
    """
    args = getattr(model, "args", None)
    try:
        layers, heads, width = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        itemsize = model.model.embed_tokens.weight.dtype.size
    except AttributeError:
        return None
    if not all(isinstance(v, int) for v in (layers, heads, width)):
        return None
    return layers * 2 * heads * width * max(itemsize, 2)


def rows_that_fit(model, rows: list, unknown: int, most: int) -> int:
    """How many of these rows (generate.Row) decode together: all of them, at most `most`, unless
    their caches and logits would need more than MEMORY_SHARE of the machine's memory (less what
    MLX holds already). `unknown` rows at most when the model's cache size is unknown."""
    from .backend import machine_memory

    per_token = kv_bytes_per_token(model)
    memory = machine_memory()
    if per_token is None or memory is None:
        return max(1, min(len(rows), unknown, most))
    longest = max(len(r.ids) + r.settings.max_tokens for r in rows)
    vocab = getattr(model.args, "vocab_size", 0) or 0
    per_row = per_token * longest + 4 * 4 * vocab  # the cache, and a few float32 copies of the row's logits
    budget = memory * MEMORY_SHARE - mx.get_active_memory()
    return max(1, min(len(rows), most, int(budget // per_row)))


def plain_forced() -> bool:
    return os.environ.get(PLAIN_ENV, "") not in ("", "0")


def warm_up(model) -> bool:
    """Make the model's greedy screen (fast_argmax) now, a few seconds, for a session (chat, the arena)
    whose one-row steps then use it; a one-off reply would not win the start-up back."""
    from .fast_argmax import greedy_head

    return not plain_forced() and greedy_head(model) is not None


def make_lean(generator) -> bool:
    """Give an mlx-lm BatchGenerator the lean step; False (generator untouched) where that cannot be done."""
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    batch = getattr(generator, "_generation_batch", None)
    if plain_forced() or type(batch) is not GenerationBatch or not all(hasattr(batch, a) for a in _STATE):
        return False
    if not callable(getattr(GenerationBatch, "_step", None)) or len(batch.uids):
        return False
    batch.__class__ = LeanGenerationBatch
    prompts = getattr(generator, "_prompt_batch", None)
    if type(prompts) is PromptProcessingBatch and not len(prompts.uids) and all(hasattr(prompts, a) for a in _PROMPT_STATE):
        prompts.__class__ = LeanPromptBatch
    return True


def _window(known: list[int], size: int, width: int) -> list[int]:
    """The last size - 1 tokens already in the cache, left-padded with -1 to width - 1 entries."""
    recent = known[max(0, len(known) - size + 1):] if size > 1 else []
    return [-1] * (width - 1 - len(recent)) + recent


def penalize_rows(logits: mx.array, inputs: mx.array, rows: list[int], known: list[list[int]],
                  penalties: list[RepetitionPenalty]) -> mx.array:
    """The repetition penalty on `rows` of logits [B, V] at once.

    A row's context is the tokens in its cache (`known`, Python ints) plus this step's input
    (still lazy); padding repeats the input, and a token listed twice is penalised once, as in
    mlx-lm (a gather from the unpenalised logits, then a scatter).
    """
    width = max(p.context_size for p in penalties)
    index = mx.array(rows) if len(rows) < logits.shape[0] else None
    current = (inputs if index is None else inputs[index]).astype(mx.int32)[:, None]
    earlier = mx.array([_window(k, p.context_size, width) for k, p in zip(known, penalties)], dtype=mx.int32)
    window = mx.concatenate([earlier.reshape(len(rows), width - 1), current], axis=1)
    window = mx.where(window < 0, current, window)
    part = logits if index is None else logits[index]
    factor = mx.array([p.penalty for p in penalties], dtype=logits.dtype)[:, None]
    part = mx.put_along_axis(part, window, penalize(mx.take_along_axis(part, window, axis=1), factor), axis=1)
    if index is None:
        return part
    logits[index] = part
    return logits


def choose(logits: mx.array, samplers: list) -> mx.array:
    """The next token of every row [B]: argmax for greedy rows, each other row's sampler on its log-probs.

    A sampler shared by every row gets the whole batch in one call, as mlx-lm does.
    """
    from mlx_lm.sample_utils import greedy_sampler

    if all(s is greedy_sampler for s in samplers):
        return mx.argmax(logits, axis=-1)
    if all(s is samplers[0] for s in samplers):
        return samplers[0](logits - fast_exp.logsumexp(logits, axis=-1, keepdims=True))
    sampled = [e for e, s in enumerate(samplers) if s is not greedy_sampler]
    part = logits[mx.array(sampled)] if len(sampled) < len(samplers) else logits
    logprobs = part - fast_exp.logsumexp(part, axis=-1, keepdims=True)
    picks = mx.concatenate([samplers[e](logprobs[k:k + 1]) for k, e in enumerate(sampled)], axis=0)
    if len(sampled) == len(samplers):
        return picks
    tokens = mx.argmax(logits, axis=-1)
    tokens[mx.array(sampled)] = picks.astype(tokens.dtype)
    return tokens


def _screened(batch, processors: list, samplers: list):
    """The model's GreedyHead (fast_argmax) when every row can use it: greedy, with at most the repetition
    penalty (a positive one) as processor."""
    from mlx_lm.sample_utils import greedy_sampler

    from .fast_argmax import AUTO_ROWS, greedy_head, made_head, switch

    if switch() == "auto" and len(samplers) < AUTO_ROWS and made_head(batch.model) is None:
        return None  # one reply: not worth the screen's start-up, unless a session made it (warm_up)
    if not all(s is greedy_sampler for s in samplers):
        return None
    if not all(not p or (len(p) == 1 and isinstance(p[0], RepetitionPenalty) and p[0].penalty > 0) for p in processors):
        return None
    return greedy_head(batch.model)


def _screened_tokens(head, hidden: mx.array, inputs: mx.array, known: list[list[int]], processors: list):
    """The greedy tokens through the screen, the repetition penalty applied to the exact candidate logits
    with penalize_rows' own arithmetic; None where the screen cannot prove them."""
    rows = [e for e, p in enumerate(processors) if p]
    current = inputs.tolist()
    recent = {e: known[e][max(0, len(known[e]) - processors[e][0].context_size + 1):]
              if processors[e][0].context_size > 1 else [] for e in rows}
    penalised = {e: (set(recent[e]) | {current[e]}, processors[e][0].penalty) for e in rows}

    def exact_penalty(exact: mx.array, columns) -> mx.array:
        if not rows:
            return exact
        column = {int(t): c for c, t in enumerate(columns)}
        inputs_at = mx.array([column.get(t, 0) for t in current], dtype=mx.int32)
        return penalize_rows(exact, inputs_at, rows, [[column[t] for t in recent[e]] for e in rows],
                             [processors[e][0] for e in rows])

    return head.argmax(hidden, penalised, exact_penalty)


def _lean_step(batch):
    """One decode step of every row: mlx-lm's GenerationBatch._step, less what no one reads."""
    batch._current_tokens = batch._next_tokens
    batch._current_logprobs = batch._next_logprobs
    inputs = batch._current_tokens
    processors = batch.logits_processors or [[] for _ in batch.uids]
    samplers = [batch.fallback_sampler if s is None else s for s in (batch.samplers or [None] * len(batch.uids))]
    head = _screened(batch, processors, samplers)
    tokens = None
    if head is not None:
        hidden = head.hidden(inputs[:, None], batch.prompt_cache)
        tokens = _screened_tokens(head, hidden, inputs, batch.tokens, processors)
    if tokens is None:
        if head is None:
            logits = batch.model(inputs[:, None], cache=batch.prompt_cache)[:, -1, :]
        else:  # the screen could not prove a row: the full logits of the hidden states already made
            logits = head.logits(hidden)
        tokens, contexts = _tokens_from_logits(batch, logits, inputs, processors, samplers)
    else:
        contexts = []
    batch._next_tokens = tokens
    batch._next_logprobs = [None] * len(batch.uids)
    mx.async_eval(tokens, contexts)
    mx.eval(inputs)
    inputs = inputs.tolist()
    for known, token in zip(batch.tokens, inputs):
        known.append(token)
    return inputs, batch._current_logprobs


def _tokens_from_logits(batch, logits: mx.array, inputs: mx.array, processors: list, samplers: list):
    """The next tokens from the full logits: the batched penalty, the other processors row by row, choose()."""
    batched = [e for e, p in enumerate(processors) if p and isinstance(p[0], RepetitionPenalty)]
    if batched:
        logits = penalize_rows(logits, inputs, batched, [batch.tokens[e] for e in batched],
                               [processors[e][0] for e in batched])
    contexts = []
    rest = [(e, p[1:] if e in set(batched) else p) for e, p in enumerate(processors)]
    rest = [(e, p) for e, p in rest if p]
    if rest:
        rows = []
        for e, row_processors in rest:
            context = batch._token_context[e].update_and_fetch(inputs[e:e + 1])
            contexts.append(context)
            row = logits[e:e + 1]
            for processor in row_processors:
                row = processor(context, row)
            rows.append(row)
        logits[mx.array([e for e, _ in rest])] = mx.concatenate(rows, axis=0)
    return choose(logits, samplers), contexts


def _generation_batch_class():
    from mlx_lm.generate import GenerationBatch

    class LeanGenerationBatch(GenerationBatch):
        """mlx-lm's GenerationBatch with the lean step (see the module's docstring)."""

        def _step(self):
            return _lean_step(self)

    return LeanGenerationBatch


LeanGenerationBatch = _generation_batch_class()


def _prompt_batch_class():
    from mlx_lm.generate import PromptProcessingBatch

    class LeanPromptBatch(PromptProcessingBatch):
        """mlx-lm's PromptProcessingBatch whose hand-over to decoding makes a LeanGenerationBatch, so the rows'
        first token comes from the lean step too. The same hand-over as mlx-lm's `generate` otherwise: the
        prompts' last token becomes the first input, the rest is prefilled, and this batch is emptied."""

        def generate(self, tokens: list[list[int]]):
            if any(len(t) > 1 for t in tokens):
                self.prompt([t[:-1] for t in tokens])
            generation = LeanGenerationBatch(
                self.model, self.uids, mx.array([t[-1] for t in tokens]), self.prompt_cache, self.tokens,
                self.samplers, self.fallback_sampler, self.logits_processors, self.stop_sequences, self.max_tokens,
            )
            self.uids, self.prompt_cache, self.tokens = [], [], []
            self.samplers, self.logits_processors, self.max_tokens = [], [], []
            return generation

    return LeanPromptBatch


LeanPromptBatch = _prompt_batch_class()
