"""The float16 screen (fast_argmax) gives the plain step's greedy tokens, with and without the repetition penalty."""

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import decode_step, fast_argmax
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import generate_replies
from tests.test_generate import PROMPTS, lively  # noqa: F401  (lively is a fixture)

MANY = [f"{p} ({i})" if i else p for i in range(6) for p in PROMPTS]  # 30 prompts


def screened_steps(monkeypatch) -> list:
    """Record every screened step's outcome (True: proved; False: fell back to the full logits)."""
    outcomes, real = [], fast_argmax.GreedyHead.argmax

    def recording(self, *args):
        tokens = real(self, *args)
        outcomes.append(tokens is not None)
        return tokens

    monkeypatch.setattr(fast_argmax.GreedyHead, "argmax", recording)
    return outcomes


def replies(loaded, prompts, settings, monkeypatch, mode: str):
    monkeypatch.delenv(decode_step.PLAIN_ENV, raising=False)
    monkeypatch.setenv(fast_argmax.SWITCH_ENV, "0")
    if mode == "plain":
        monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    elif mode == "screen":
        monkeypatch.setenv(fast_argmax.SWITCH_ENV, "1")
    return [(r.text, r.tokens, r.finish_reason, r.stop_token) for r in generate_replies(loaded, prompts, settings)]


@pytest.mark.parametrize("penalty,half", [(1.0, "float16"), (1.1, "float16"), (1.5, "float16"), (0.8, "float16"),
                                          (1.0, "bfloat16"), (1.1, "bfloat16")])
def test_the_screen_gives_the_plain_replies(lively, monkeypatch, penalty, half):
    """30 prompts, 24 tokens each: the screened step (either half format), the lean step without it and mlx-lm's
    own step all agree, and the screen really decided (nearly) every step."""
    monkeypatch.setenv(fast_argmax.FORMAT_ENV, half)
    settings = G(max_tokens=24, repetition_penalty=penalty)
    outcomes = screened_steps(monkeypatch)
    screened = replies(lively, MANY, settings, monkeypatch, "screen")
    assert len(outcomes) >= 20 and sum(outcomes) >= 0.9 * len(outcomes)
    assert screened == replies(lively, MANY, settings, monkeypatch, "plain")
    assert screened == replies(lively, MANY, settings, monkeypatch, "lean")
    assert len({text for text, *_ in screened}) > len(PROMPTS)  # the prompts led to different replies


def test_rows_the_screen_cannot_take_use_the_full_logits(lively, monkeypatch):
    """A sampled row or another processor in the batch: no screening; too many candidates: the full logits.
    The replies stay the plain ones either way."""
    mixed = [G(max_tokens=12), G(max_tokens=12, temperature=0.8, seed=3), G(max_tokens=12, no_repeat_ngram=2),
             G(max_tokens=12), G(max_tokens=12, repetition_penalty=1.0)]
    outcomes = screened_steps(monkeypatch)
    assert replies(lively, PROMPTS, mixed, monkeypatch, "screen") == replies(lively, PROMPTS, mixed, monkeypatch, "plain")
    assert outcomes == []
    monkeypatch.setattr(fast_argmax, "MAX_CANDIDATES", 0)
    settings = G(max_tokens=12)
    assert replies(lively, PROMPTS, settings, monkeypatch, "screen") == replies(lively, PROMPTS, settings, monkeypatch,
                                                                                 "plain")
    assert outcomes and not any(outcomes)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_the_bound_holds_and_the_candidates_logits_are_the_full_ones(lively, monkeypatch, half):
    """On hidden states of real prompts (and scaled ones): |exact - approx| <= beta for every token, in either
    half format, and a candidate's exact logit is bit for bit the full layer's."""
    monkeypatch.setenv(fast_argmax.SWITCH_ENV, "1")
    monkeypatch.setenv(fast_argmax.FORMAT_ENV, half)
    head = fast_argmax.greedy_head(lively.model)
    assert head is not None and fast_argmax.greedy_head(lively.model) is head  # made once per model
    assert head.format == half and head.half.dtype == getattr(head.torch, half)
    ids = mx.array([lively.tokenizer.encode(" ".join(MANY))[:40]])
    hidden = head.inner(ids).reshape(-1, head.weight.shape[1])
    for scale in (1.0, 0.1, 10.0):
        h = hidden * scale
        approx, beta = head.screen(h)
        full = head.logits(h)
        error = np.abs(np.asarray(full).astype(np.float64) - approx.double().numpy())
        assert np.all(error <= beta[:, None]) and np.all(beta < (1.0 if half == "float16" else 8.0))
        assert error.max() > 0  # the half copy really is approximate (else the bound is untested)
        asked = {3, 17, 250, head.weight.shape[0] - 1}
        for rows in (slice(0, 1), slice(0, 4), slice(None)):
            exact, columns = head.exact_logits(h[rows], asked)
            assert asked <= set(columns.tolist()) and sorted(set(columns.tolist())) == columns.tolist()
            assert mx.array_equal(exact, full[rows][:, mx.array(columns)]).item()


def test_the_switch(lively, monkeypatch):
    monkeypatch.setenv(fast_argmax.SWITCH_ENV, "0")
    assert fast_argmax.switch() == "off" and fast_argmax.greedy_head(lively.model) is None
    monkeypatch.delenv(fast_argmax.SWITCH_ENV)
    assert fast_argmax.switch() == "auto"
    if lively.model.args.vocab_size < fast_argmax.AUTO_VOCAB:  # a tiny vocabulary: not worth it unless asked
        fast_argmax._HEADS.clear()
        assert fast_argmax.greedy_head(lively.model) is None
    floor = fast_argmax.penalty_floor(np.array([10.0, -10.0, 10.0]), np.array([2.0, 2.0, 0.5]))
    assert floor.tolist() == [5.0, -20.0, 10.0]


def test_by_default_the_screen_takes_batches_of_a_big_vocabulary_only(lively, monkeypatch):
    """Unset switch: a batch of 5 greedy rows is screened once the vocabulary counts as big; one chat reply
    (a batch of 1) is not, as the screen's start-up would cost more than it saves."""
    from gemma_mlx.generate import stream_reply

    monkeypatch.delenv(fast_argmax.SWITCH_ENV, raising=False)
    monkeypatch.delenv(decode_step.PLAIN_ENV, raising=False)
    monkeypatch.setattr(fast_argmax, "AUTO_VOCAB", 16)
    fast_argmax._HEADS.clear()
    outcomes = screened_steps(monkeypatch)
    stream_reply(lively, [{"role": "user", "content": PROMPTS[0]}], G(max_tokens=8))
    assert outcomes == []
    generate_replies(lively, PROMPTS, G(max_tokens=8))
    assert outcomes and all(outcomes)
    fast_argmax._HEADS.clear()


def test_a_session_that_made_the_screen_uses_it_for_one_row_too(lively, monkeypatch):
    """chat and the arena make the screen when they load a model (decode_step.warm_up): a session's one-row
    steps then take it, with the plain reply; a one-off reply still does not pay for it."""
    from gemma_mlx.generate import stream_reply

    monkeypatch.delenv(fast_argmax.SWITCH_ENV, raising=False)
    monkeypatch.delenv(decode_step.PLAIN_ENV, raising=False)
    monkeypatch.setattr(fast_argmax, "AUTO_VOCAB", 16)
    fast_argmax._HEADS.clear()
    outcomes = screened_steps(monkeypatch)
    message = [{"role": "user", "content": PROMPTS[1]}]
    before = stream_reply(lively, message, G(max_tokens=10))
    assert outcomes == [] and fast_argmax.made_head(lively.model) is None
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    assert decode_step.warm_up(lively.model) is False and fast_argmax.made_head(lively.model) is None
    monkeypatch.delenv(decode_step.PLAIN_ENV)
    assert decode_step.warm_up(lively.model) is True and fast_argmax.made_head(lively.model) is not None
    after = stream_reply(lively, message, G(max_tokens=10))
    assert len(outcomes) >= 9 and all(outcomes)  # every step of the one row went through the screen
    assert (after.text, after.tokens) == (before.text, before.tokens)
    fast_argmax._HEADS.clear()


def test_a_new_output_weight_makes_a_new_screen(lively, monkeypatch):
    """Validation during training puts new turn-token rows into the embedding (a new weight array): the screen's
    float16 copy must follow, or its bound would be about the old weights."""
    from gemma_mlx.adapters import set_embedding_rows

    monkeypatch.setenv(fast_argmax.SWITCH_ENV, "1")
    model = lively.model
    first = fast_argmax.greedy_head(model)
    saved = model.model.embed_tokens.weight
    try:
        set_embedding_rows(model, [5], saved[7:8] * 3)
        second = fast_argmax.greedy_head(model)
        assert second is not first and second.weight is model.model.embed_tokens.weight
        assert fast_argmax.greedy_head(model) is second
        assert (second.half[5].float().numpy() == first.half[7].float().numpy() * 3).mean() > 0.9
    finally:
        model.model.embed_tokens.weight = saved


def test_the_format_is_the_faster_or_the_one_asked_for(lively, monkeypatch):
    """Unset: whichever half format multiplies faster here (bfloat16 only when clearly faster); set: that one;
    misspelt: a ConfigError that names the variable and the choices, not a silent fallback to full logits."""
    from gemma_mlx.errors import ConfigError

    weight = np.asarray(lively.model.model.embed_tokens.weight)
    assert fast_argmax.fastest_format(weight) in fast_argmax.UNIT
    assert fast_argmax.pick_format({"float16": 0.226, "bfloat16": 0.037}) == "bfloat16"  # an AVX512-BF16 CPU
    assert fast_argmax.pick_format({"float16": 0.025, "bfloat16": 0.037}) == "float16"  # one with FP16 arithmetic
    assert fast_argmax.pick_format({"float16": 0.050, "bfloat16": 0.040}) == "float16"  # not clearly faster
    monkeypatch.setenv(fast_argmax.FORMAT_ENV, "BFloat16")
    assert fast_argmax.format_from_env() == "bfloat16"
    monkeypatch.setenv(fast_argmax.SWITCH_ENV, "1")
    monkeypatch.setenv(fast_argmax.FORMAT_ENV, "half")
    with pytest.raises(ConfigError, match="GEMMA_MLX_SCREEN_FORMAT='half'.*float16, bfloat16"):
        fast_argmax.greedy_head(lively.model)
