"""Measures of reply text shared by `data stats`, training validation and the compare scorecard.

Kept in one place so that the training data, a validation reply and a compared reply are counted
the same way: words (with curly apostrophes read as straight ones), lengths, and loops.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

# Words: letters/digits with inner apostrophes ("don't", "Bingo's"); punctuation and emoji are not words.
# Chinese and Japanese write no spaces, so each Han, hiragana or katakana character counts as a word (a
# 90-character Chinese reply would otherwise be a handful of "words", and every length measure with it).
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD = re.compile(rf"[{_UNSPACED}]|(?:(?![{_UNSPACED}])[^\W_])+(?:'(?:(?![{_UNSPACED}])[^\W_])+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def fold_apostrophes(text: str) -> str:
    """Curly apostrophes as straight ones, one character for one (so match offsets still fit the text)."""
    return text.translate(_APOSTROPHES)


def words(text: str) -> list[str]:
    """The words of a reply, lowercased, curly apostrophes folded to straight ones."""
    return [w.lower() for w in _WORD.findall(fold_apostrophes(text))]


def word_count(text: str) -> int:
    return len(_WORD.findall(fold_apostrophes(text)))


def length_stats(counts: list[int]) -> dict:
    """n, min, quartiles, median, mean, max, spread (stdev and coefficient of variation) of word or token counts.

    The one summary of lengths: `data stats` prints it for the training data, the scorecard for replies.
    """
    if not counts:
        return {"n": 0, "min": None, "q1": None, "median": None, "q3": None, "mean": None, "max": None,
                "stdev": None, "cv": None}
    mean = statistics.fmean(counts)
    stdev = statistics.pstdev(counts)
    q1, median, q3 = statistics.quantiles(counts, n=4, method="inclusive") if len(counts) > 1 else (counts[0],) * 3
    return {"n": len(counts), "min": min(counts), "q1": float(q1), "median": float(median), "q3": float(q3),
            "mean": mean, "max": max(counts), "stdev": stdev, "cv": stdev / mean if mean else None}


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# A reply is a loop when word 4-grams that occur 3+ times in it cover at least half of its words,
# or when character 12-grams that occur 3+ times cover most of its characters. The second catches
# loops with no spaces ("areareare...thingthing..."), which have no word n-grams at all. On the
# shipped persona replies the character measure stays at or below 0.12; loops reach about 1.0.
LOOP_NGRAM, LOOP_REPEATS, LOOP_COVERAGE = 4, 3, 0.5
LOOP_CHAR_NGRAM, LOOP_CHAR_COVERAGE = 12, 0.6


def _covered_share(items: list | str, n: int, repeats: int) -> float:
    """Share of `items` (words, or the characters of a string) inside an n-gram of them that occurs
    `repeats` or more times. A string's n-grams are its substrings (cheap to hash: chat checks every piece)."""
    if isinstance(items, str):
        grams = [items[i : i + n] for i in range(len(items) - n + 1)]
    else:
        grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(items)
    for start, gram in enumerate(grams):
        if counts[gram] >= repeats:
            covered[start : start + n] = [True] * n
    return sum(covered) / len(items)


def loop_coverage(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> float:
    """Share of a reply's words inside a word n-gram that occurs `repeats` or more times in it.

    "a big house with a big house with a big house" is covered entirely; a reply that repeats one
    phrase once or twice ("I'm going to the zoo! Today I'm going to see...") stays near zero.
    """
    return _covered_share(words(text), n, repeats)


def char_loop_coverage(text: str, n: int = LOOP_CHAR_NGRAM, repeats: int = LOOP_REPEATS) -> float:
    """Share of a reply's characters (lowercased, runs of whitespace as one space) inside a character
    n-gram that occurs `repeats` or more times. Unlike loop_coverage it needs no spaces between words."""
    return _covered_share(" ".join(fold_apostrophes(text).lower().split()), n, repeats)


def is_loop(text: str) -> bool:
    """A degenerate reply that goes round in circles, in words or in characters (see the two coverages)."""
    return loop_coverage(text) >= LOOP_COVERAGE or char_loop_coverage(text) >= LOOP_CHAR_COVERAGE


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 word', '2 words', '0 loops' (or `many` for an irregular plural): counts read as a person writes them."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
