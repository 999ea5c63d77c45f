"""`gemma-mlx chat --on-topic-model`: every kept reply ends with [on topic] or [off topic] by ontopic's rule,
a streamed reply scored once it has ended, best of N's candidates scored in one call and the kept one's flag shown."""

import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import gemma_mlx.chat as chat_module
from gemma_mlx.chat import BestOf, chat_loop, run_chat
from gemma_mlx.cli import cli
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import Reply, load_model
from gemma_mlx.scoring.ontopic import ON_TOPIC_THRESHOLD, is_on_topic, on_topic_scores

from .test_chat import Lines
from .test_chat_best_of import OTHER, PERSONA, Scripted

HIGH, LOW = ON_TOPIC_THRESHOLD + 0.5, ON_TOPIC_THRESHOLD - 0.5


@pytest.fixture(scope="module")
def pt(converted_models):
    return load_model(converted_models["pt"])


class Scorer:
    """An on-topic scorer that records each call and scores a reply by whether it is in `on`."""

    def __init__(self, *on):
        self.on, self.calls = on, []

    def __call__(self, pairs):
        self.calls.append(pairs)
        return [HIGH if reply in self.on else LOW for _, reply in pairs]


def talk(loaded, *lines, best=None, settings=G(max_tokens=40)):
    out = []
    messages = chat_loop(loaded, settings, read_line=Lines(*lines), write=out.append, best_of=best)
    return messages, "".join(out)


def streamed(text):
    """stream_reply in chat, replaced: writes `text` in two pieces and returns its Reply."""
    def fake(loaded, messages, settings, on_text=None):
        on_text(text[:5])
        on_text(text[5:])
        return Reply(0, 0, messages[-1]["content"], text, len(text.split()), "stop", "<end_of_turn>", 0.1, 10.0, {})
    return fake


def test_a_streamed_reply_is_scored_once_it_has_ended(pt, monkeypatch):
    monkeypatch.setattr(chat_module, "stream_reply", streamed(PERSONA))
    scorer = Scorer(PERSONA)
    messages, out = talk(pt, "What makes a good fort?", "Tell me about dads", best=BestOf(1, scorer=scorer))
    assert scorer.calls == [[("What makes a good fort?", PERSONA)], [("Tell me about dads", PERSONA)]]
    assert out.count(f"{PERSONA} [on topic]\n") == 2
    assert messages[-1] == {"role": "assistant", "content": PERSONA}  # the flag is shown, not kept in the text
    scorer.on = ()
    _, out = talk(pt, "What makes a good fort?", best=BestOf(1, scorer=scorer))
    assert f"{PERSONA} [off topic]\n" in out


def test_no_flag_without_an_on_topic_model(pt, monkeypatch):
    monkeypatch.setattr(chat_module, "stream_reply", streamed(PERSONA))
    _, out = talk(pt, "Hi", best=BestOf(1))
    assert "topic]" not in out and f"{PERSONA}\n" in out


def test_best_of_scores_its_candidates_in_one_call_and_flags_the_kept_one(pt, monkeypatch):
    monkeypatch.setattr(chat_module, "generate_replies", Scripted(PERSONA, OTHER))
    scorer = Scorer(OTHER)
    messages, out = talk(pt, "What makes a good fort?", best=BestOf(2, target_words=20, scorer=scorer))
    assert len(scorer.calls) == 1 and [reply for _, reply in scorer.calls[0]] == [PERSONA, OTHER]
    assert messages[-1]["content"] == OTHER and f"{OTHER} [on topic]\n" in out
    # an echo of the message scores high for the wrong reason: flagged off topic whatever its score
    echo = "What makes a good fort? What makes a good fort?"
    monkeypatch.setattr(chat_module, "generate_replies", Scripted(echo, echo))
    _, out = talk(pt, "What makes a good fort?", best=BestOf(2, scorer=Scorer(echo)))
    assert f"{echo} [off topic]" in out


def test_run_chat_flags_replies_by_the_real_scoring_model(converted_models):
    """The tiny base scores its own replies: the flag shown is ontopic's rule on the score it gives."""
    spec = str(converted_models["pt"])
    said, out = [], []
    messages = run_chat(spec, settings=G(max_tokens=6), read_line=Lines("Tell me a story", "/quit"),
                        write=out.append, progress=said.append, on_topic_model=spec)
    text = "".join(out)
    assert any("[on topic] or [off topic]" in line for line in said)
    if messages:  # a random model's reply may loop and stay out
        reply = messages[-1]["content"]
        loaded = load_model(spec)
        (score,) = on_topic_scores(loaded.model, loaded.tokenizer, [("Tell me a story", reply)])
        flag = "[on topic]" if is_on_topic(score, "Tell me a story", reply) else "[off topic]"
        assert f"{reply} {flag}" in text
    else:
        assert "[loop" in text and "topic]" not in text


def test_cli_chat_on_topic_model(converted_models):
    result = CliRunner().invoke(cli, ["chat", str(converted_models["it"]), "--max-tokens", "4",
                                      "--on-topic-model", str(converted_models["pt"])], input="Hello\n")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.count("\n") == 0 and ("[on topic]" in line or "[off topic]" in line or "[loop" in line)
    helped = CliRunner().invoke(cli, ["chat", "--help"])
    assert "Mark every reply [on topic] or [off topic]" in " ".join(helped.output.split())
