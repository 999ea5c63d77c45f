"""The one score that picks a run's "best" adapters, by what a reader of the replies judges.

A shared helper: training ranks its validations with it (train's `best_by: score`), and the
scoring modules re-export it, so the measure has one definition that every stage may import.
It takes numbers only (no model, no files): the share of greedy validation replies that ended
cleanly, their mean words, the validation replies' own mean words and, when known, the share of
replies on topic (training/validation.py measures it with the LoRA off).
"""

from __future__ import annotations


def length_fidelity(reply_words: float | None, reference_words: float | None) -> float | None:
    """min(r, 1/r) for r = mean reply words / mean reference words: 1 at the reference's length,
    0.5 at half or double it. None when either mean is unknown."""
    if not reply_words or not reference_words:
        return None if reply_words is None or not reference_words else 0.0
    ratio = reply_words / reference_words
    return min(ratio, 1 / ratio)


def checkpoint_score(clean_rate: float, mean_words: float | None, reference_words: float | None,
                     on_topic_rate: float | None = None) -> float:
    """One number in [0, 1] to rank a checkpoint's greedy validation replies (higher is better).

    The product clean_rate x length_fidelity x on_topic_rate: the three things a reader judges, each a
    share in [0, 1], so a checkpoint has to do all three well, and being twice as good at one cannot
    buy back failing another. "Most clean endings" alone cannot tell 8-word replies from 40-word ones
    when the persona talks in 40; length fidelity can. A measure that is not available (no reference
    lengths, no on-topic model) counts as 1, so the score falls back to what is known.
    """
    fidelity = length_fidelity(mean_words, reference_words)
    parts = [clean_rate, 1.0 if fidelity is None else fidelity, 1.0 if on_topic_rate is None else on_topic_rate]
    score = 1.0
    for part in parts:
        score *= min(max(part, 0.0), 1.0)
    return score
