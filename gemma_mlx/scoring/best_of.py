"""Choosing by what a reader judges: the best of N replies to one prompt (compare, chat, the arena).

A reader rejects a reply that is cut off or trails off, one that goes round in circles, one far
shorter or longer than the character talks, and one about something else. The functions here rank
by exactly those, in that order, and take no model and no files: the on-topic scores come from
scoring/ontopic.py and the lengths from the training or validation replies.

The best checkpoint's score (checkpoint_score, length_fidelity) lives in the shared helper
selection.py, so training may use it; it is re-exported here.

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

from pathlib import Path

from ..config import LARGEST_INT, GenerationSettings
from ..selection import checkpoint_score, length_fidelity  # noqa: F401  (the best checkpoint: re-exported)
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
    variants = candidate_settings(settings, n)
    return [p for p in prompts for _ in range(n)], [v for _ in prompts for v in variants]


def candidate_settings(settings: GenerationSettings, n: int) -> list[GenerationSettings]:
    """The settings of one prompt's n candidates (see candidate_rows); chat and the arena use these too."""
    variants = [settings]
    for k in range(1, n):
        temperature = settings.temperature or BEST_OF_TEMPERATURE
        variants.append(dataclasses.replace(settings, seed=(settings.seed + k) % (LARGEST_INT + 1),
                                            temperature=temperature))
    return variants


def pick_reply(replies: list, message: str, target_words: float | None = None,
               scores: list[float | None] | None = None) -> int:
    """pick_best over replies to one message (anything with .text and .finish_reason)."""
    return pick_best([Candidate(r.text, r.finish_reason, scores[i] if scores else None, message)
                      for i, r in enumerate(replies)], target_words)


def on_topic_flags(model, tokenizer, pairs: list[tuple[str, str]]) -> list[bool]:
    """Whether each (message, reply) is on topic under `model` (a base model), by ontopic's score and rule,
    all pairs in one scoring call. Training gets this from the CLI and `run` (validation.OnTopic)."""
    from .ontopic import is_on_topic, on_topic_scores

    scores = on_topic_scores(model, tokenizer, pairs)
    return [is_on_topic(score, message, reply) for score, (message, reply) in zip(scores, pairs)]


def persona_words(loaded) -> float | None:
    """The persona's mean reply words for a loaded model (models.LoadedModel), from the training run
    that made its adapters (summary "train_reply_words"); None for a base model or an older run."""
    from ..models import train_manifest_of

    manifest = loaded.manifest or {}
    trained = manifest.get("train_manifest") if manifest.get("stage") == "fuse" else None
    if getattr(loaded, "adapter_dir", None) is not None:
        trained = train_manifest_of(Path(loaded.adapter_dir))
    words = ((trained or {}).get("summary") or {}).get("train_reply_words")
    return float(words) if isinstance(words, (int, float)) and words > 0 else None


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
