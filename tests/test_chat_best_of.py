"""`gemma-mlx chat --best-of N`: N candidate replies in one batch, the one pick_best keeps is shown and kept,
its cost said once, /settings best_of=N, and the persona's length read from the adapters' training run."""

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import gemma_mlx.chat as chat_module
from gemma_mlx.chat import BestOf, chat_loop, run_chat
from gemma_mlx.cli import cli
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import Reply, load_model

from .test_chat import Lines

LOOP = "a big house with " * 8
SHORT = "Yes."
PERSONA = "I reckon we should build a fort out of the couch cushions and then play in it all day long."  # 20 words
OTHER = "My dad says the best forts have a secret door, a flag and a lookout for the grannies."  # 18 words


class Scripted:
    """generate_replies in chat, replaced: records every call and answers with the scripted texts in order."""

    def __init__(self, *texts, reasons=None):
        self.texts, self.reasons, self.calls = list(texts), reasons or ["stop"] * len(texts), []

    def __call__(self, loaded, prompts, settings, progress=None):
        self.calls.append((prompts, settings))
        return [Reply(i, 0, prompts[i][-1]["content"], text, len(text.split()), reason, None, 0.1, 10.0, {})
                for i, (text, reason) in enumerate(zip(self.texts, self.reasons))]


@pytest.fixture(scope="module")
def pt(converted_models):
    return load_model(converted_models["pt"])


def talk(loaded, *lines, best=None, settings=G(max_tokens=40)):
    out = []
    messages = chat_loop(loaded, settings, read_line=Lines(*lines), write=out.append, best_of=best)
    return messages, "".join(out)


def test_best_of_keeps_the_clean_reply_nearest_the_persona_length(pt, monkeypatch):
    fake = Scripted(LOOP, PERSONA + " and more", SHORT, PERSONA, reasons=["stop", "length", "stop", "stop"])
    monkeypatch.setattr(chat_module, "generate_replies", fake)
    messages, out = talk(pt, "Let's play!", best=BestOf(4, target_words=20))
    # one call, four rows of the same conversation: the first with the settings, the others sampled
    assert len(fake.calls) == 1
    prompts, settings = fake.calls[0]
    assert len(prompts) == 4 and all(p == [{"role": "user", "content": "Let's play!"}] for p in prompts)
    assert settings[0].temperature == 0.0 and [s.temperature for s in settings[1:]] == [0.7] * 3
    assert [s.seed for s in settings] == [0, 1, 2, 3] and all(s.samples == 1 for s in settings)
    # the loop, the cut reply and the 1-word reply lose to the clean one of the persona's length
    assert out.split("\n")[0] == f"model> {PERSONA}"
    assert messages[-1] == {"role": "assistant", "content": PERSONA}


def test_on_topic_score_decides_between_replies_of_the_persona_length(pt, monkeypatch):
    monkeypatch.setattr(chat_module, "generate_replies", Scripted(PERSONA, OTHER))
    asked = []

    def scorer(pairs):
        asked.append(pairs)
        return [0.1, 0.9]

    messages, out = talk(pt, "What makes a good fort?", best=BestOf(2, target_words=20, scorer=scorer))
    assert asked == [[("What makes a good fort?", PERSONA), ("What makes a good fort?", OTHER)]]  # one call
    assert messages[-1]["content"] == OTHER and OTHER in out
    # without a scorer (the on-topic term skipped) the tie goes to the first candidate
    messages, _ = talk(pt, "What makes a good fort?", best=BestOf(2, target_words=20))
    assert messages[-1]["content"] == PERSONA


def test_when_every_candidate_loops_the_reply_stays_out(pt, monkeypatch):
    monkeypatch.setattr(chat_module, "generate_replies", Scripted(LOOP, LOOP + "again"))
    messages, out = talk(pt, "Hi", best=BestOf(2))
    assert messages == [] and "[loop: left out of the conversation" in out


def test_settings_best_of_changes_n_says_the_cost_once_and_refuses_bad_values(pt, monkeypatch):
    fake = Scripted(PERSONA, OTHER, SHORT)
    monkeypatch.setattr(chat_module, "generate_replies", fake)
    _, out = talk(pt, "/settings best_of=3", "/settings best_of=3 temperature=0.5", "Hi", "/settings best_of=0",
                  "/settings best_of=lots", "/settings best_of=17 max_tokens=9", "/settings")
    assert out.count("best of 3: every reply is 3 rows decoded in one batch") == 1  # said when it changed only
    assert "no on-topic score (add --on-topic-model" in out
    assert "settings: max_tokens=40 min_new_tokens=0 temperature=0.5" in out and "best_of=3" in out
    assert len(fake.calls) == 1 and len(fake.calls[0][0]) == 3 and fake.calls[0][1][0].temperature == 0.5
    assert "best_of must be a whole number from 1 to 16, not '0'" in out
    assert "not 'lots'" in out and "not '17'" in out and out.count("Settings unchanged.") == 3
    assert out.rstrip().endswith("best_of=3")  # nothing was changed by the refused lines (max_tokens neither)
    assert "max_tokens=9" not in out.split("not '17'")[1]


def test_best_of_one_streams_as_before(pt, monkeypatch):
    fake = Scripted(PERSONA)
    monkeypatch.setattr(chat_module, "generate_replies", fake)
    _, out = talk(pt, "/settings best_of=1", "Hi", settings=G(max_tokens=3))
    assert fake.calls == [] and "[cut at 3 tokens]" in out


def test_run_chat_samples_n_rows_in_one_batch_on_the_tiny_model(converted_models, monkeypatch):
    real = chat_module.generate_replies
    calls = []

    def spy(loaded, prompts, settings, progress=None):
        calls.append(len(prompts))
        return real(loaded, prompts, settings, progress)

    monkeypatch.setattr(chat_module, "generate_replies", spy)
    said, out = [], []
    messages = run_chat(str(converted_models["pt"]), settings=G(max_tokens=5), read_line=Lines("Hi", "/quit"),
                        write=out.append, progress=said.append, best_of=3, on_topic_model=str(converted_models["pt"]))
    assert calls == [3] and len(messages) in (0, 2)  # a random model's reply may loop and stay out
    cost = [line for line in said if line.startswith("best of 3:")]
    assert len(cost) == 1 and "then the highest on-topic score" in cost[0]
    assert "any length (no training summary gives the persona's)" in cost[0]  # a base model has no persona length
    assert "".join(out).startswith("model> ")


def test_persona_words_come_from_the_training_run_behind_the_model():
    from gemma_mlx.scoring.best_of import persona_words

    fused = SimpleNamespace(manifest={"stage": "fuse", "train_manifest": {"summary": {"train_reply_words": 41.5}}},
                            adapter_dir=None)
    assert persona_words(fused) == 41.5
    assert persona_words(SimpleNamespace(manifest={"stage": "convert"}, adapter_dir=None)) is None
    older = SimpleNamespace(manifest={"stage": "fuse", "train_manifest": {"summary": {}}}, adapter_dir=None)
    assert persona_words(older) is None


def test_cli_chat_best_of(converted_models):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", str(converted_models["it"]), "--max-tokens", "4", "--best-of", "2"],
                           input="Hello\n")
    assert result.exit_code == 0, result.output
    assert "best of 2: every reply is 2 rows" in result.stderr and "best of 2" not in result.stdout
    assert result.stdout.strip().count("\n") == 0 and "[cut at 4 tokens]" in result.stdout  # piped: one reply line
    bad = runner.invoke(cli, ["chat", str(converted_models["it"]), "--best-of", "0"], input="Hi\n")
    assert bad.exit_code == 2 and "0 is not in the range 1<=x<=16" in bad.output
    helped = runner.invoke(cli, ["chat", "--help"])
    assert "--best-of" in helped.output and "skips the on-topic term" in " ".join(helped.output.split())
