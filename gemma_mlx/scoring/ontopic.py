"""Does a reply answer the message? An offline measure: how much the reply makes the message more likely.

Markers, clean endings and loop flags all look fine on a reply that is in voice but about something
else ("What do you do when it's raining?" -> "I keep my wet hair in my ears!"). To see that, we ask
an un-tuned *base* model how surprised it is by the message with and without the reply in front of it:

    on_topic_score = ( log p(message | "Answer: {reply}\\nQuestion:") - log p(message | "Question:") ) / tokens

the pointwise mutual information of message and reply, per message token. A reply that answers
the message names its subject, its words, its situation, so the message becomes easier to predict;
a reply about something else leaves it as surprising as before (the score stays near 0). Scoring
p(message | reply) rather than p(reply | message) is the maximum-mutual-information idea from neural
conversation models: it does not reward a bland reply that suits every message, and it does not
care how likely the reply's own style is, which is exactly what a persona changes.

The reply comes first in the frame because a causal model can only condition on what came before.
The message's tokens are encoded once and appended to both prefixes, so the two log-probabilities
are over identical tokens. All pairs run as padded rows of a few batched forward passes (right
padding: a causal model's earlier positions never see the pad), and the vocabulary-sized output
layer is applied only at the message positions, a chunk of rows at a time, so memory stays small.

The threshold and its agreement with a human reading are measured in docs/DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..chat_format import BOS_ID, PAD_ID, encode
from ..model_ref import ModelRef
from ..text import is_loop, words

# Fixed before 62 hand-labelled replies were scored by the real Gemma 3 270M base; the best threshold
# for those labels turned out to be 0.26 (docs/DESIGN.md, "On topic").
ON_TOPIC_THRESHOLD = 0.25
REPLY_PREFIX, QUESTION_PREFIX = "Answer: ", "Question:"
MAX_ROWS = 32  # sequences per forward pass (rows sorted by length, so each pass pads little)
HEAD_CHUNK = 256  # message positions per slice of the [positions, vocabulary] output layer
PROGRESS_SECONDS = 15.0  # a progress line at least this often while many replies are scored
MAX_REPLY_TOKENS = 96  # a longer reply is cut from the end: its opening says what it is about
ECHO_MIN_WORDS, ECHO_SHARE = 3, 0.6  # see echoes()


@dataclass(frozen=True)
class PairRows:
    """The token rows for one (message, reply) pair: the same message ids after two prefixes."""

    conditional: list[int]  # <bos> Answer: {reply}\nQuestion: {message}
    unconditional: list[int]  # <bos> Question: {message}
    message_tokens: int  # the last this-many tokens of both rows are the message


def pair_rows(tokenizer, message: str, reply: str) -> PairRows:
    """Token rows of one pair in the plain "Answer: ... / Question: ..." frame."""
    message_ids = encode(tokenizer, " " + " ".join(message.split()))
    reply_ids = encode(tokenizer, REPLY_PREFIX + " ".join(reply.split()))[:MAX_REPLY_TOKENS]
    prefix_ids = encode(tokenizer, "\n" + QUESTION_PREFIX)
    return PairRows(
        conditional=[BOS_ID, *reply_ids, *prefix_ids, *message_ids],
        unconditional=[BOS_ID, *encode(tokenizer, QUESTION_PREFIX), *message_ids],
        message_tokens=len(message_ids),
    )


def pad_rows(rows: list[list[int]], pad_id: int = PAD_ID) -> list[list[int]]:
    """Right-pad token rows to one length (a causal model's real positions never attend to the pad)."""
    width = max(len(r) for r in rows)
    return [r + [pad_id] * (width - len(r)) for r in rows]


def _output_layer(model):
    """(hidden states function, output layer function) of an mlx-lm Gemma text model.

    The output layer is the tied embedding or lm_head, then the final logit soft-cap where the
    model has one (Gemma 4), exactly as the model's own __call__ does it.
    """
    import mlx.core as mx

    model = getattr(model, "language_model", model)  # a multimodal wrapper: its text model
    inner = model.model
    if getattr(model, "lm_head", None) is not None and not getattr(model, "tie_word_embeddings", True):
        project = model.lm_head
    else:
        project = inner.embed_tokens.as_linear
    cap = getattr(model, "final_logit_softcapping", None)
    if not cap:
        return inner, project
    return inner, lambda hidden: mx.tanh(project(hidden) / cap) * cap


def tail_logprobs(model, rows: list[list[int]], tails: list[int], progress=None) -> list[float]:
    """Sum of log p(token | everything before it) over the last `tails[i]` tokens of each row.

    Rows run in padded forward passes of up to MAX_ROWS, sorted by length to waste little on pads.
    `progress` (a callable taking a line) hears how far it got at least every PROGRESS_SECONDS.
    """
    import time

    import mlx.core as mx

    from .. import fast_exp

    hidden_of, head = _output_layer(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    totals = [0.0] * len(rows)
    started = last_said = time.perf_counter()
    for start in range(0, len(order), MAX_ROWS):
        group = order[start:start + MAX_ROWS]
        padded = pad_rows([rows[i] for i in group])
        hidden = hidden_of(mx.array(padded))  # [rows, width, hidden]
        # the positions that predict each tail token: row r, positions len-tail-1 .. len-2
        where_row, where_pos, targets = [], [], []
        for r, i in enumerate(group):
            length = len(rows[i])
            for pos in range(length - tails[i] - 1, length - 1):
                where_row.append(r)
                where_pos.append(pos)
                targets.append(rows[i][pos + 1])
        picked = hidden[mx.array(where_row), mx.array(where_pos)]  # [positions, hidden]
        scores = []
        for chunk in range(0, len(targets), HEAD_CHUNK):
            logits = head(picked[chunk:chunk + HEAD_CHUNK]).astype(mx.float32)
            target = mx.array(targets[chunk:chunk + HEAD_CHUNK])
            chosen = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
            scores.append(chosen - fast_exp.logsumexp(logits, axis=-1))
        per_position = mx.concatenate(scores).tolist()
        for r, row_index in enumerate(where_row):
            totals[group[row_index]] += per_position[r]
        now = time.perf_counter()
        if progress is not None and now - last_said >= PROGRESS_SECONDS and start + MAX_ROWS < len(order):
            progress(f"on topic: {start + len(group)}/{len(rows)} rows scored in {now - started:.0f}s")
            last_said = now
    return totals


def on_topic_scores(model, tokenizer, pairs: list[tuple[str, str]], progress=None) -> list[float | None]:
    """The on-topic score of each (message, reply) pair under `model` (the base); None for an empty reply.

    All pairs' rows (two per pair) are scored together in padded batches: one call, not one per pair.
    """
    scored = [i for i, (message, reply) in enumerate(pairs) if reply.strip() and message.strip()]
    if not scored:
        return [None] * len(pairs)
    built = [pair_rows(tokenizer, *pairs[i]) for i in scored]
    rows = [b.conditional for b in built] + [b.unconditional for b in built]
    tails = [b.message_tokens for b in built] * 2
    logprobs = tail_logprobs(model, rows, tails, progress)
    result: list[float | None] = [None] * len(pairs)
    for k, i in enumerate(scored):
        result[i] = (logprobs[k] - logprobs[k + len(built)]) / built[k].message_tokens
    return result


def echoes(message: str, reply: str) -> bool:
    """True when the reply repeats a run of the message's words: at least ECHO_MIN_WORDS of them and
    ECHO_SHARE of the message ("Why is the sky blue? Why is the sky blue?").

    Copying is what makes a message most predictable, so the score rewards it most, yet a reply that
    restates the question answers nothing. An un-tuned base model does this all the time.
    """
    asked, said = words(message), words(reply)
    need = max(ECHO_MIN_WORDS, ECHO_SHARE * len(asked))
    if len(asked) < need:
        return False
    said_text = " " + " ".join(said) + " "
    longest = 0
    for start in range(len(asked)):
        for stop in range(start + longest + 1, len(asked) + 1):
            if " " + " ".join(asked[start:stop]) + " " not in said_text:
                break
            longest = stop - start
    return longest >= need


def is_on_topic(score: float | None, message: str = "", reply: str = "",
                threshold: float = ON_TOPIC_THRESHOLD) -> bool:
    """On topic: a score at or above the threshold, from a reply that neither loops nor echoes the message.

    An empty reply (score None) answers nothing. A loop or an echo scores high for the wrong reason
    (the message's words are in it), so neither counts, whatever its score.
    """
    if score is None or score < threshold:
        return False
    return not (reply and (is_loop(reply) or echoes(message, reply)))


def on_topic_rate(flags: list[bool | None]) -> float | None:
    """Share of replies that are on topic; None flags (no scoring model) are left out, None when all are."""
    scored = [f for f in flags if f is not None]
    return sum(scored) / len(scored) if scored else None


# ---------------------------------------------------------------------------- in compare

def default_scoring_model(refs: list[ModelRef]) -> str | None:
    """The base model to score with: a compared converted (un-tuned) model, else the base under
    BASE::ADAPTERS, else the base a fused model's manifest names; None when none is found."""
    for ref in refs:
        if ref.stage == "convert":
            return str(ref.dir)
    for ref in refs:
        if ref.adapters is not None:
            return str(ref.dir)
    for ref in refs:
        base = (ref.manifest or {}).get("base_model")
        if base and Path(base).is_dir():
            return str(base)
    return None


def score_reply_lists(ref: ModelRef, reply_lists: list[list], progress=None) -> list[list[float | None]]:
    """On-topic scores for several models' replies (generate.Reply: .prompt, .text), loading the
    scoring model once and scoring every pair in one call."""
    import gc
    import time

    import mlx.core as mx

    pairs = [(r.prompt, r.text) for replies in reply_lists for r in replies]
    started = time.perf_counter()
    loaded = ref.load()
    scores = on_topic_scores(loaded.model, loaded.tokenizer, pairs, progress)
    if progress is not None:
        progress(f"on topic: {len(pairs)} replies scored by {loaded.name} in {time.perf_counter() - started:.1f}s")
    del loaded
    gc.collect()
    mx.clear_cache()
    out, start = [], 0
    for replies in reply_lists:
        out.append(scores[start:start + len(replies)])
        start += len(replies)
    return out
