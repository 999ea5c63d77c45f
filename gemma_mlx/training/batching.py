"""Training examples as token ids with a loss mask, and length-bucketed batches that drop nothing.

Each conversation is tokenized in segments (prompt, reply, prompt, ...) exactly as generation will
see it: the prompt as `chat_format.prompt_ids` encodes it, the reply up to and including
`<end_of_turn>`. With `response_only` the loss counts reply tokens only, so the model learns to
answer (and to end its turn) instead of learning to write user questions.

Batches fix gaps of mlx-lm's iterator: it drops `len % batch_size` examples every epoch, always
builds the same batches (only their order changes), and pads each batch up to a multiple of 32
tokens (28% padding on the benchmark's data). Here every example is used every epoch, each epoch's
shuffled order is sorted by length inside windows, and batches are padded to their longest example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..chat_format import encode
from ..families import DEFAULT, Family, family_of_tokenizer

# Examples are sorted by length inside windows of this many batches: small padding, varied batches.
SORT_WINDOW_BATCHES = 32


@dataclass
class Sequence:
    """One example: token ids and, per token, whether predicting it counts toward the loss."""

    ids: list[int]
    trained: list[bool]  # trained[j]: the loss includes the prediction of ids[j] (from ids[:j])
    source: str  # "file:line" of the example
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.trained[1:])


def chat_segments(messages: list[dict], family: Family = DEFAULT) -> list[tuple[str, bool]]:
    """The rendered turn text (the family's format) cut into (text, is_reply) pieces; a reply ends with the turn end."""
    full = family.render(messages)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(family.render(messages[:i], add_generation_prompt=True))
        end = len(family.render(messages[: i + 1])) - 1  # the "\n" after the turn end is prompt, not reply
        cuts.append((start, end))
    segments, position = [], 0
    for start, end in cuts:
        if start > position:
            segments.append((full[position:start], False))
        segments.append((full[start:end], True))
        position = end
    if position < len(full):
        segments.append((full[position:], False))
    return segments


def tokenize_example(tokenizer, example, response_only: bool = True, max_length: int = 0) -> Sequence:
    """Token ids and loss mask of a data.Example (chat or plain text)."""
    family = family_of_tokenizer(tokenizer)
    if example.messages is None:
        ids = encode(tokenizer, family.bos + example.text) + [family.eos_id]
        trained = [True] * len(ids)
    else:
        ids, trained = [], []
        segments = chat_segments(example.messages, family)
        if segments and segments[-1][1] is False and len(segments) > 1:
            segments = segments[:-1]  # nothing after the last reply is worth predicting
        for text, is_reply in segments:
            piece = encode(tokenizer, text)
            ids.extend(piece)
            trained.extend([is_reply or not response_only] * len(piece))
    trained[0] = False  # the first token has nothing before it to predict it from
    truncated = bool(max_length) and len(ids) > max_length
    if truncated:
        ids, trained = ids[:max_length], trained[:max_length]
    return Sequence(ids, trained, example.source, truncated)


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices per batch for one epoch: every example once, similar lengths together.

    Shuffled by (seed, epoch), sorted by length inside windows of SORT_WINDOW_BATCHES batches, cut
    into batches (the last one may be smaller: nothing is dropped), then the batch order shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_in_order(count: int, batch_size: int) -> list[list[int]]:
    """Batches in file order (what length bucketing is measured against)."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def plan_sorted(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Deterministic length-sorted batches, for validation (order does not matter there)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the token positions in padded batches that are padding."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1.0 - real / padded if padded else 0.0


@dataclass
class Batch:
    """Model inputs [B, L] and the flat positions (into B*L) whose next token is trained."""

    inputs: np.ndarray  # int32 [B, L]
    positions: np.ndarray  # int32 [N]: flat indices into inputs.reshape(-1)
    targets: np.ndarray  # int32 [N]: the token to predict at each position
    examples: int
    tokens: int  # real (unpadded) input tokens

    @property
    def trained_tokens(self) -> int:
        return int(self.positions.size)


def make_batch(sequences: list[Sequence], indices: list[int], pad_id: int = 0) -> Batch:
    """Pad one batch; inputs are ids[:-1], targets ids[1:], only trained targets are gathered."""
    chosen = [sequences[i] for i in indices]
    width = max(len(s) for s in chosen) - 1
    inputs = np.full((len(chosen), width), pad_id, dtype=np.int32)
    positions, targets, tokens = [], [], 0
    for row, seq in enumerate(chosen):
        ids = np.asarray(seq.ids, dtype=np.int32)
        inputs[row, : len(ids) - 1] = ids[:-1]
        tokens += len(ids) - 1
        where = np.nonzero(np.asarray(seq.trained[1:], dtype=bool))[0]
        positions.append(row * width + where)
        targets.append(ids[1:][where])
    return Batch(
        inputs=inputs,
        positions=np.concatenate(positions).astype(np.int32),
        targets=np.concatenate(targets).astype(np.int32),
        examples=len(chosen),
        tokens=tokens,
    )
