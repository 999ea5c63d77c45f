"""The persona scorecard: small pure functions over reply texts, no model and no files.

Each number answers one question a person asks when reading two models side by side: how long are
the replies (and is that the training data's spread, or one copied length), were they cut off or do
they trail off mid-sentence, do they sound like the character, do they break character, do they
repeat themselves, and were the prompts really held out. compare.py feeds these functions; the report
explains them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable

from ..examples import NEAR_DUPLICATE_JACCARD, near_duplicate_pairs
from ..persona import find_phrases
from .ontopic import on_topic_rate
from ..text import _ngrams, fold_apostrophes, is_loop, length_stats, word_count, words

_SENTENCE_END = ".!?\u2026"  # ... counts as an ending too
_CLOSERS = "\"')]}\u201d\u2019\u00bb*_"

# Only used to keep mined phrases meaningful: a phrase made only of these says nothing about a voice.
STOPWORDS = frozenset(
    """a about after again all also am an and any are around as at away back be because been before
    being but by can can't could day did didn't do does doesn't don't down each even every for from
    get gets go goes going good got had has have he her here him his how i i'd i'll i'm i've if in
    into is isn't it it's its just know like little lot make makes maybe me more most much my new
    no not now of off oh ok okay on one only or other our out over really right said say says see
    she so some something sometimes still such sure take tell than that that's the their them then
    there there's these they thing things think this those time to too two up us very want wants was
    way we we're well were what when where which while who why will with would yes you you're your
    yeah""".split()
)


def _is_trailing_decoration(char: str) -> bool:
    """Closing quotes/brackets, emoji and their joiners may follow the final . ! or ?"""
    if char in _CLOSERS or char.isspace():
        return True
    return unicodedata.category(char) in ("So", "Sk", "Mn", "Cf")  # emoji, modifiers, VS16, ZWJ


def ends_mid_sentence(text: str) -> bool:
    """True when a non-empty reply does not end in . ! ? (optionally followed by quotes or emoji).

    Only meaningful for replies that stopped by themselves: a reply cut by the token limit is
    counted as cut, not as trailing off.
    """
    stripped = text.rstrip()
    if not stripped:
        return False
    end = len(stripped)
    while end and _is_trailing_decoration(stripped[end - 1]):
        end -= 1
    return end == 0 or stripped[end - 1] not in _SENTENCE_END


def marker_rate(texts: list[str], markers: list[str]) -> float | None:
    """Share of replies containing at least one marker (None when there are no markers or replies)."""
    if not markers or not texts:
        return None
    return sum(1 for t in texts if find_phrases(t, markers)) / len(texts)


def marker_counts(texts: list[str], markers: list[str]) -> dict[str, int]:
    """For each marker, how many replies contain it (a marker said twice in one reply counts once)."""
    return {m: sum(1 for t in texts if find_phrases(t, [m])) for m in markers}


def distinct_n(texts: list[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams across the replies: low means repetitive output."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def find_overlaps(prompts: list[str], training_prompts: list[tuple[str, str]],
                  threshold: float = NEAR_DUPLICATE_JACCARD) -> list[dict]:
    """Compare prompts that (nearly) appear among the training prompts ((text, source) pairs).

    A model answering a prompt it was trained on is recalling, not generalising, so the report
    flags those numbers as not held out.
    """
    # data check's pair search (each text normalised once, pairs pruned by size), keeping the
    # closest (first, on a tie) training prompt for each compare prompt
    n = len(training_prompts)
    best: dict[int, tuple[float, int]] = {}
    texts = [t for t, _ in training_prompts] + list(prompts)
    for i, j, score in near_duplicate_pairs(texts, threshold):
        if i < n <= j and score > best.get(j - n, (-1.0, 0))[0]:
            best[j - n] = (score, i)
    return [{"prompt_index": index, "prompt": prompts[index], "training_prompt": training_prompts[i][0],
             "training_source": training_prompts[i][1], "similarity": score}
            for index, (score, i) in sorted(best.items())]


def _contains(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    return any(outer[i : i + len(inner)] == inner for i in range(len(outer) - len(inner) + 1))


_NAME = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]+)")  # a capitalised word inside a sentence: a name


def _candidate_grams(text: str, max_n: int) -> set[tuple[str, ...]]:
    """Phrases of 2..max_n words that neither start nor end with a common word, plus names."""
    tokens = words(text)
    grams = {g for n in range(2, max_n + 1) for g in _ngrams(tokens, n)
             if g[0] not in STOPWORDS and g[-1] not in STOPWORDS}
    grams.update((name.lower(),) for name in _NAME.findall(fold_apostrophes(text)) if name.lower() not in STOPWORDS)
    return grams


def mine_markers(
    training_replies: list[str],
    base_replies: list[str],
    exclude: Iterable[str] = (),
    max_phrases: int = 12,
    min_train_share: float = 0.02,
    max_base_share: float = 0.02,
    max_n: int = 3,
    min_base_words: int = 50,
) -> list[str]:
    """Phrases typical of the training replies that the base model rarely says.

    Candidates are phrases of 2 to max_n words that do not start or end with a common word
    ("ask a grown", "guinea pig") and names (capitalised words inside a sentence). One qualifies
    when it occurs in at least `min_train_share` of the training replies (and at least 3 of them)
    and in at most `max_base_share` of the base model's replies. The most frequent win; one
    overlapping a chosen phrase or an `exclude`d marker is skipped. When the base replies hold
    fewer than `min_base_words` words in all, nothing is mined: "rare in the base model" cannot
    be judged from a model that said (almost) nothing.
    """
    if not training_replies or sum(word_count(t) for t in base_replies) < min_base_words:
        return []
    excluded = [tuple(words(e)) for e in exclude]
    train_df = Counter(g for t in training_replies for g in _candidate_grams(t, max_n))
    base_df = Counter(g for t in base_replies for g in {g for n in range(1, max_n + 1) for g in _ngrams(words(t), n)})
    need = max(3, min_train_share * len(training_replies))
    candidates = [g for g, count in train_df.items()
                  if count >= need and base_df[g] <= max_base_share * len(base_replies)]
    candidates.sort(key=lambda g: (-train_df[g], -len(g), g))
    chosen: list[tuple[str, ...]] = []
    for gram in candidates:
        if any(_contains(gram, c) or _contains(c, gram) for c in [*chosen, *excluded]):
            continue
        chosen.append(gram)
        if len(chosen) == max_phrases:
            break
    return [" ".join(g) for g in chosen]


def reply_flags(text: str, finish_reason: str, markers: list[str], out_of_character: list[str]) -> dict:
    """What the scorecard needs to know about one reply."""
    cut = finish_reason == "length"
    return {
        "words": word_count(text),
        "cut": cut,
        "empty": not text.strip(),
        "mid_sentence": (not cut) and ends_mid_sentence(text),
        "loop": is_loop(text),
        "markers": find_phrases(text, markers),
        "out_of_character": find_phrases(text, out_of_character),
    }


def summarise(texts: list[str], flags: list[dict], has_markers: bool, training_words: dict | None = None) -> dict:
    """Aggregate per-reply flags (from reply_flags) into scorecard numbers; rates are in [0, 1].

    mid_sentence_rate counts only replies that were not cut (None when all were cut), so a model
    is not blamed twice for the token limit.
    """
    n = len(flags)
    stats = length_stats([f["words"] for f in flags])
    not_cut = [f for f in flags if not f["cut"]]
    train_mean = (training_words or {}).get("mean")
    return {
        "replies": n,
        "mean_words": stats["mean"],
        "median_words": stats["median"],
        "words_stdev": stats["stdev"],
        "words_cv": stats["cv"],
        "min_words": stats["min"],
        "max_words": stats["max"],
        "mean_words_vs_training": stats["mean"] / train_mean if train_mean and stats["mean"] is not None else None,
        "cut_rate": sum(f["cut"] for f in flags) / n if n else None,
        "stop_rate": sum(not f["cut"] for f in flags) / n if n else None,
        "loop_rate": sum(f["loop"] for f in flags) / n if n else None,
        # stopped by itself without looping: the count training keeps its adapters by (gen_clean)
        "clean_rate": sum(not f["cut"] and not f["loop"] for f in flags) / n if n else None,
        "mid_sentence_rate": sum(f["mid_sentence"] for f in not_cut) / len(not_cut) if not_cut else None,
        "empty_rate": sum(f["empty"] for f in flags) / n if n else None,
        "persona_marker_rate": (sum(1 for f in flags if f["markers"]) / n) if has_markers and n else None,
        "out_of_character_hits": sum(len(f["out_of_character"]) for f in flags),
        "out_of_character_rate": sum(1 for f in flags if f["out_of_character"]) / n if n else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        # share answering their prompt (scoring/ontopic.py); None when no base model scored them
        "on_topic_rate": on_topic_rate([f.get("on_topic") for f in flags]),
    }
