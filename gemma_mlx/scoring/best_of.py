"""Choosing by what a reader judges: the best of N replies to one prompt, and the best checkpoint.

A reader rejects a reply that is cut off or trails off, one that goes round in circles, one far
shorter or longer than the character talks, and one about something else. The functions here rank
by exactly those, in that order, and take no model and no files: the on-topic scores come from
scoring/ontopic.py and the lengths from the training or validation replies.

Best of N (compare --best-of N): candidate 0 is the reply the settings give (greedy by default), the
others are sampled; `pick_best` keeps one. Ranking, highest first:
  1. ends cleanly (stopped by itself, not empty, ends a sentence) and does not loop;
     then: does not loop; then the rest;
  2. length within LENGTH_BAND of the persona's mean reply (every reply is, when no length is known);
  3. inside the band, the highest on-topic score (none for a reply that echoes the prompt); outside
     it, the nearest length;
  4. on a tie, the earlier candidate (so greedy wins when nothing separates them).
The band rather than "nearest length" alone is deliberate: replies rarely tie on length, so a strict
order would let the length decide every time and the on-topic measure never.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import GenerationSettings

from ..text import is_loop, word_count
from .ontopic import echoes
from .scorecard import ends_mid_sentence

# A reply between half and twice the persona's mean length is "the persona's length" for best-of.
LENGTH_BAND = (0.5, 2.0)
# Sampling for best-of's extra candidates when the settings are greedy (temperature 0).
BEST_OF_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Candidate:
    text: str
    finish_reason: str  # "stop" | "length"
    on_topic: float | None = None  # ontopic.on_topic_scores; None: empty reply or no scoring model
    message: str = ""  # the prompt it answers: a reply that echoes it gets no credit for its score


def ends_cleanly(text: str, finish_reason: str) -> bool:
    """Stopped by itself, says something, and ends a sentence: a reply a reader sees as finished."""
    return finish_reason == "stop" and bool(text.strip()) and not ends_mid_sentence(text)


def length_ratio(words: int, target_words: float | None) -> float | None:
    """Reply words over the persona's mean words (None when no target is known)."""
    if not target_words:
        return None
    return max(words, 1) / target_words


def candidate_key(candidate: Candidate, target_words: float | None) -> tuple:
    """The sort key of one candidate (higher is better); see the module docstring for the order."""
    loop = is_loop(candidate.text)
    clean = ends_cleanly(candidate.text, candidate.finish_reason)
    tier = 2 if clean and not loop else 1 if not loop and candidate.text.strip() else 0
    ratio = length_ratio(word_count(candidate.text), target_words)
    in_band = ratio is None or LENGTH_BAND[0] <= ratio <= LENGTH_BAND[1]
    echo = bool(candidate.message) and echoes(candidate.message, candidate.text)
    topic = candidate.on_topic if candidate.on_topic is not None and not echo else -math.inf
    return (tier, in_band, topic if in_band else -abs(math.log(ratio)))


def pick_best(candidates: list[Candidate], target_words: float | None = None) -> int:
    """Index of the candidate to keep (the first of equals)."""
    if not candidates:
        raise ValueError("pick_best needs at least one candidate")
    keys = [candidate_key(c, target_words) for c in candidates]
    return max(range(len(candidates)), key=lambda i: (keys[i], -i))


def candidate_rows(prompts: list, settings: GenerationSettings, n: int) -> tuple[list, list[GenerationSettings]]:
    """Prompts and settings for generate_replies: each prompt n times in a row, all in one batch.

    Candidate 0 uses the settings as given; candidate k uses seed + k, and when the settings are
    greedy, samples at BEST_OF_TEMPERATURE (n greedy rows would be n copies of one reply).
    """
    variants = [settings]
    for k in range(1, n):
        temperature = settings.temperature or BEST_OF_TEMPERATURE
        variants.append(dataclasses.replace(settings, seed=settings.seed + k, temperature=temperature))
    return [p for p in prompts for _ in range(n)], [v for _ in prompts for v in variants]


def choose(replies: list, n: int, scores: list[float | None] | None, target_words: float | None):
    """Keep one reply of every n candidates (replies ordered as candidate_rows made them).

    Returns (kept replies with their prompt_index mapped back to the real prompt, their on-topic
    scores or None, the kept candidate's index for each). `replies` are generate.Reply objects.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, reply in enumerate(replies):
        groups.setdefault((reply.prompt_index // n, reply.sample_index), []).append(i)
    kept, kept_scores, picks = [], [], []
    for (prompt_index, _), members in sorted(groups.items()):
        members.sort(key=lambda i: replies[i].prompt_index)  # candidate order
        candidates = [Candidate(replies[i].text, replies[i].finish_reason, scores[i] if scores else None,
                                replies[i].prompt) for i in members]
        pick = pick_best(candidates, target_words)
        kept.append(dataclasses.replace(replies[members[pick]], prompt_index=prompt_index))
        kept_scores.append(scores[members[pick]] if scores else None)
        picks.append(pick)
    return kept, (kept_scores if scores else None), picks


# ---------------------------------------------------------------------------- the best checkpoint

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
