"""The on-topic measure (scoring/ontopic.py) and the choices built on it (scoring/best_of.py)."""

import math

import pytest

from gemma_mlx.scoring import best_of, ontopic
from gemma_mlx.scoring.best_of import Candidate, checkpoint_score, length_fidelity, pick_best

PAIRS = [
    ("Why is the sky blue?", "Sunlight bounces off the air, and blue bounces most."),
    ("I lost my favourite teddy.", "Oh no! Look under the bed."),
    ("Tell me a story", "Once upon a time a small dog found a very long stick in the backyard and carried it home."),
    ("Is it okay to be angry?", ""),  # empty: nothing to score
    ("What should I do today?", "Play!"),
]


@pytest.fixture(scope="module")
def tiny(converted_models):
    from gemma_mlx.generate import load_model

    return load_model(converted_models["pt"])


def _reference_logprob(model, row: list[int], tail: int) -> float:
    """Plain full-logits log-probability of a row's last `tail` tokens, one unpadded row at a time."""
    import mlx.core as mx

    logits = model(mx.array([row]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(logprobs[pos, row[pos + 1]].item() for pos in range(len(row) - tail - 1, len(row) - 1))


def test_pair_rows_end_in_the_same_message_tokens(tiny):
    rows = ontopic.pair_rows(tiny.tokenizer, "Why is the sky blue?", "Sunlight bounces.")
    n = rows.message_tokens
    assert n > 0
    assert rows.conditional[-n:] == rows.unconditional[-n:]
    assert rows.conditional[0] == rows.unconditional[0] == 2  # <bos>
    assert len(rows.conditional) > len(rows.unconditional)  # the reply sits in front


def test_batched_scores_equal_one_pair_at_a_time_with_full_logits(tiny):
    """Padding, length sorting and the chunked output layer do not change any score."""
    scores = ontopic.on_topic_scores(tiny.model, tiny.tokenizer, PAIRS)
    assert scores[3] is None
    for (message, reply), score in zip(PAIRS, scores):
        if not reply:
            continue
        rows = ontopic.pair_rows(tiny.tokenizer, message, reply)
        n = rows.message_tokens
        expected = (_reference_logprob(tiny.model, rows.conditional, n)
                    - _reference_logprob(tiny.model, rows.unconditional, n)) / n
        assert score == pytest.approx(expected, abs=2e-4)


def test_gemma4_scores_use_its_logit_softcap(tmp_path):
    """A tiny Gemma 4 model (final logit soft-cap, per-layer inputs): the same scores as its own logits."""
    from gemma_mlx.convert import convert_checkpoint
    from gemma_mlx.generate import load_model
    from gemma_mlx.tiny import write_tiny_gemma4_pair

    hf = write_tiny_gemma4_pair(tmp_path / "hf")["tiny-gemma-4-pt"]
    loaded = load_model(convert_checkpoint(str(hf), out=tmp_path / "mlx", dtype="float32").path)
    assert getattr(loaded.model, "final_logit_softcapping", None)
    loaded.model.final_logit_softcapping = 0.5  # a random tiny model's logits are too small for the real cap to bite
    pairs = PAIRS[:3]
    scores = ontopic.on_topic_scores(loaded.model, loaded.tokenizer, pairs)
    for (message, reply), score in zip(pairs, scores):
        rows = ontopic.pair_rows(loaded.tokenizer, message, reply)
        n = rows.message_tokens
        expected = (_reference_logprob(loaded.model, rows.conditional, n)
                    - _reference_logprob(loaded.model, rows.unconditional, n)) / n
        assert score == pytest.approx(expected, abs=2e-4)


def test_several_forward_passes_and_head_chunks_give_the_same_scores(tiny, monkeypatch):
    whole = ontopic.on_topic_scores(tiny.model, tiny.tokenizer, PAIRS)
    monkeypatch.setattr(ontopic, "MAX_ROWS", 3)
    monkeypatch.setattr(ontopic, "HEAD_CHUNK", 5)
    monkeypatch.setattr(ontopic, "PROGRESS_SECONDS", 0.0)
    lines = []
    split = ontopic.on_topic_scores(tiny.model, tiny.tokenizer, PAIRS, lines.append)
    assert [s is None for s in split] == [s is None for s in whole]
    assert [s for s in split if s is not None] == pytest.approx([s for s in whole if s is not None], abs=1e-5)
    rows = 2 * sum(1 for message, reply in PAIRS if message.strip() and reply.strip())
    assert lines and lines[0].startswith(f"on topic: 3/{rows} rows scored in ")  # progress between the passes
    assert all(f"/{rows} rows" in line for line in lines) and len(lines) == (rows - 1) // 3


def test_threshold_and_rate():
    assert ontopic.is_on_topic(ontopic.ON_TOPIC_THRESHOLD)
    assert not ontopic.is_on_topic(ontopic.ON_TOPIC_THRESHOLD - 0.01)
    assert not ontopic.is_on_topic(None)  # an empty reply answers nothing
    assert ontopic.on_topic_rate([True, False, True, True]) == 0.75
    assert ontopic.on_topic_rate([None, None]) is None


@pytest.mark.parametrize("message, reply, echo", [
    ("Why is the sky blue?", "Why is the sky blue? Why is the sky blue?", True),
    ("Can you help me with my homework?", "Can you help me with my homework? user", True),
    ("I'm feeling sad", "I'm feeling sad patient", True),
    ("Why is the sky blue?", "Sunlight bounces off the air, and the sky looks blue.", False),  # shares words, not a run
    ("Explain quantum physics", "I don't know what quantum physics is!", False),  # 2 of 3 words: below the minimum run
    ("I lost my favourite teddy.", "Oh no! Your favourite teddy? Look under the bed.", False),  # 2 of 5
])
def test_echoes(message, reply, echo):
    assert ontopic.echoes(message, reply) is echo


def test_a_loop_or_an_echo_is_never_on_topic_whatever_its_score():
    high = ontopic.ON_TOPIC_THRESHOLD + 5
    assert ontopic.is_on_topic(high, "Why is the sky blue?", "Because the air scatters blue light most.")
    assert not ontopic.is_on_topic(high, "Why is the sky blue?", "Why is the sky blue? I wonder.")
    assert not ontopic.is_on_topic(high, "Tell me a story", "a big house with " * 10)


def test_an_echo_gets_no_credit_for_its_score_in_best_of():
    question = "Why is the sky blue?"
    echo = Candidate("Why is the sky blue? That is a question.", "stop", 4.0, question)
    answer = Candidate("The air scatters blue light the most.", "stop", 0.3, question)
    assert pick_best([echo, answer]) == 1
    assert pick_best([Candidate(echo.text, "stop", 4.0), answer]) == 0  # without the message it cannot tell


# ---------------------------------------------------------------------------- best of N

def test_a_clean_ending_beats_a_higher_score_that_is_cut_or_loops():
    loop = "a big house with " * 12
    candidates = [Candidate("I like it. And then the", "length", 2.0),
                  Candidate(loop.strip() + ".", "stop", 3.0),
                  Candidate("I like the park.", "stop", 0.1)]
    assert pick_best(candidates) == 2


def test_inside_the_length_band_the_on_topic_score_decides():
    ten = "one two three four five six seven eight nine ten."
    twelve = "one two three four five six seven eight nine ten eleven twelve."
    candidates = [Candidate(ten, "stop", 0.2), Candidate(twelve, "stop", 0.9)]
    assert pick_best(candidates, target_words=10) == 1  # both in band: the more on-topic one


def test_outside_the_band_the_nearest_length_wins_and_in_band_beats_out_of_band():
    short = "Yes."
    medium = " ".join(f"word{i}" for i in range(14)) + "."
    long = " ".join(f"word{i}" for i in range(40)) + "."  # distinct words: not a loop
    # 1 and 40 words against a 10-word persona: both out of band; 40 is 4x, 1 is 10x away
    assert pick_best([Candidate(short, "stop", 5.0), Candidate(long, "stop", 0.0)], target_words=10) == 1
    # a lower score in the band beats a higher one outside it
    assert pick_best([Candidate(long, "stop", 5.0), Candidate(medium, "stop", 0.0)], target_words=10) == 1


def test_ties_keep_the_first_candidate_and_no_target_means_every_length_fits():
    same = [Candidate("I like the park.", "stop", 0.5), Candidate("I like the zoo.", "stop", 0.5)]
    assert pick_best(same) == 0
    assert pick_best([Candidate("Yes.", "stop", 0.1), Candidate(" ".join(f"w{i}" for i in range(90)) + ".", "stop", 0.2)]) == 1
    with pytest.raises(ValueError):
        pick_best([])


def test_an_empty_reply_ranks_last():
    assert pick_best([Candidate("", "stop", None), Candidate("Ok then and", "length", None)]) == 1


# ---------------------------------------------------------------------------- the best checkpoint

def test_length_fidelity():
    assert length_fidelity(40, 40) == 1.0
    assert length_fidelity(20, 40) == 0.5
    assert length_fidelity(80, 40) == 0.5
    assert length_fidelity(0, 40) == 0.0
    assert length_fidelity(None, 40) is None and length_fidelity(20, None) is None


def test_checkpoint_score_tells_short_clean_replies_from_ones_of_the_persona_length():
    """The issue's case: all clean at 8 words and all clean at 20, for a persona that talks in 40."""
    eight, twenty = checkpoint_score(1.0, 8, 40), checkpoint_score(1.0, 20, 40)
    assert eight == pytest.approx(0.2) and twenty == pytest.approx(0.5)
    assert checkpoint_score(1.0, 40, 40, on_topic_rate=0.5) == pytest.approx(0.5)
    assert checkpoint_score(0.9, None, None) == pytest.approx(0.9)  # nothing but clean endings known
    assert checkpoint_score(1.0, 40, 40, on_topic_rate=0.0) == 0.0
    assert math.isclose(checkpoint_score(0.5, 30, 40, 0.8), 0.5 * 0.75 * 0.8)



def test_candidate_rows_keep_the_given_settings_first_and_sample_the_rest():
    from gemma_mlx.config import GenerationSettings

    greedy = GenerationSettings(max_tokens=8, seed=5)
    prompts, settings = best_of.candidate_rows(["a", "b"], greedy, 3)
    assert prompts == ["a", "a", "a", "b", "b", "b"]
    assert settings[0] == greedy and settings[3] == greedy
    assert [s.seed for s in settings[:3]] == [5, 6, 7]
    assert [s.temperature for s in settings[:3]] == [0.0, best_of.BEST_OF_TEMPERATURE, best_of.BEST_OF_TEMPERATURE]
    warm = GenerationSettings(temperature=1.2)
    assert {s.temperature for s in best_of.candidate_rows(["a"], warm, 4)[1]} == {1.2}


# ---------------------------------------------------------------------------- in compare

def test_compare_best_of_keeps_the_candidate_pick_best_chooses(converted_models, tmp_path):
    """compare --best-of 3: one reply per prompt, each the one pick_best picks among that prompt's
    candidates as generate makes them, with the on-topic scores of the base (here: the compared model)."""
    from gemma_mlx.compare import compare_models
    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.generate import generate_replies, load_model

    model = str(converted_models["pt"])
    prompts = ["Tell me a story", "Why is the sky blue?"]
    settings = GenerationSettings(max_tokens=6)
    result = compare_models([model], prompts, settings=settings, out=tmp_path / "cmp", best_of=3)
    entry = result.results["models"][0]
    assert result.results["best_of"] == 3 and result.results["on_topic"]["model"] == model
    assert [r["prompt_index"] for r in entry["replies"]] == [0, 1]
    card = entry["scorecard"]
    assert card["on_topic_rate"] == sum(r["on_topic"] for r in entry["replies"]) / 2

    loaded = load_model(model)
    rows, row_settings = best_of.candidate_rows(prompts, settings, 3)
    candidates = generate_replies(loaded, rows, row_settings)
    scores = ontopic.on_topic_scores(loaded.model, loaded.tokenizer, [(r.prompt, r.text) for r in candidates])
    for p, kept in enumerate(entry["replies"]):
        mine = [Candidate(c.text, c.finish_reason, s, c.prompt) for c, s in zip(candidates[3 * p:3 * p + 3], scores[3 * p:3 * p + 3])]
        chosen = mine[pick_best(mine)]
        assert kept["text"] == chosen.text
        assert kept["on_topic_score"] == pytest.approx(chosen.on_topic, abs=1e-4)
    assert "best of 3" in (tmp_path / "cmp" / "comparison.txt").read_text()


def test_compare_without_a_base_has_no_on_topic_numbers(converted_models, tmp_path):
    """A model dir with no manifest (not a converted base, no adapters): nothing to score with, and the
    scorecard says n/a rather than 0%."""
    import shutil

    from gemma_mlx.compare import compare_models
    from gemma_mlx.config import GenerationSettings

    bare = shutil.copytree(converted_models["pt"], tmp_path / "bare")
    (bare / "manifest.json").unlink()
    result = compare_models([str(bare)], ["Hello"], settings=GenerationSettings(max_tokens=4), out=tmp_path / "cmp")
    assert result.results["on_topic"] is None
    assert result.results["models"][0]["scorecard"]["on_topic_rate"] is None
    assert "on topic" not in (tmp_path / "cmp" / "comparison.txt").read_text()


def test_cli_best_of_out_of_range_is_refused_before_loading(converted_models, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    result = CliRunner().invoke(cli, ["compare", str(converted_models["pt"]), "--prompt", "Hi", "--best-of", "0",
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code != 0 and "--best-of" in result.output
    assert not (tmp_path / "cmp").exists()


@pytest.mark.real
def test_real_base_scores_an_answer_above_an_in_voice_reply_about_something_else(real_model):
    """On the real 270M base, as measured in docs/DESIGN.md: answers score above wandering replies."""
    from gemma_mlx.generate import load_model

    loaded = load_model(real_model)
    pairs = [("Why is the sky blue?", "I reckon someone painted it. Mum says it's the sunlight bouncing about up in the sky."),
             ("Why is the sky blue?", "I keep my wet hair in my ears!"),
             ("Mum says I have to tidy my room.", "Make it a game! Whoever puts the most toys in the box wins."),
             ("Mum says I have to tidy my room.", "Dinosaurs are the best animals because they roar!")]
    on_sky, off_sky, on_room, off_room = ontopic.on_topic_scores(loaded.model, loaded.tokenizer, pairs)
    assert on_sky > off_sky and on_room > off_room
    assert ontopic.is_on_topic(on_sky, *pairs[0]) and ontopic.is_on_topic(on_room, *pairs[2])
