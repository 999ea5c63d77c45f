"""Loop detection (text.is_loop): word loops, loops with no spaces, and prose that must not be flagged."""

import json
from pathlib import Path

from gemma_mlx.text import char_loop_coverage, is_loop, loop_coverage

DATA = Path(__file__).resolve().parent.parent / "data" / "bluey" / "conversations.jsonl"


def test_a_reply_with_no_spaces_is_a_loop():
    # the shape seen in a real reply: about 200 tokens of glued-together repeats, no word n-grams at all
    text = "are" * 70 + "thing" * 45
    assert loop_coverage(text) == 0.0  # the word measure cannot see it
    assert char_loop_coverage(text) == 1.0
    assert is_loop(text)
    assert is_loop("Well, " + "areareare" * 12 + "thingthing" * 12 + " okay")  # a little prose around it


def test_word_loops_are_still_found():
    assert is_loop("a big house with a big house with a big house with a big house")
    assert loop_coverage("a big house with a big house with a big house with a big house") == 1.0
    assert not is_loop("a big house with a big house")  # said twice is not a loop


def test_the_shipped_persona_replies_are_not_loops():
    replies = [json.loads(line)["messages"][-1]["content"] for line in DATA.read_text().splitlines() if line.strip()]
    assert len(replies) > 100
    flagged = [r for r in replies if is_loop(r)]
    assert flagged == []
    assert max(char_loop_coverage(r) for r in replies) < 0.3  # far from the 0.6 threshold


def test_prose_that_repeats_a_phrase_a_few_times_is_not_a_loop():
    text = ("I love playing Keepy Uppy with Bingo. Dad says Keepy Uppy is the best game, and Mum says "
            "Keepy Uppy is too loud for the lounge room, so we play it in the backyard after dinner.")
    assert not is_loop(text)
    assert char_loop_coverage(text) < 0.3


def test_short_text_is_never_a_loop():
    for text in ("", "ha", "hahaha", "Hooray!"):
        assert not is_loop(text)


def test_words_are_counted_in_scripts_without_spaces_too():
    """Chinese and Japanese write no spaces: each character is a word, so lengths (stats, fidelity,
    calibration) mean the same thing as in English; spaced scripts keep their words."""
    from gemma_mlx.text import word_count, words

    assert word_count("I don't know, Bingo's ball!") == 5
    assert word_count("我喜欢吃苹果。你呢？") == 8 and word_count("喜欢。") == 2
    assert word_count("ひらがなとカタカナ") == 9
    assert word_count("안녕하세요 친구") == 2 and word_count("Привет, мир") == 2
    assert words("mixed 中文 text") == ["mixed", "中", "文", "text"]
