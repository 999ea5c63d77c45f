"""`gemma-mlx chat`: multi-turn history, commands, cut flag, clean exits, through the library and the CLI."""

import dataclasses

import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import mlx.core as mx
from gemma_mlx.chat import chat_loop, run_chat
from gemma_mlx.chat_format import END_OF_TURN_ID
from gemma_mlx.cli import cli
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import load_model


class EndsAfter:
    """A model wrapper that writes `words` (by position in the reply) and then <end_of_turn>."""

    def __init__(self, model, prompt_lengths, words):
        self.model, self.words, self.prompt_lengths = model, words, prompt_lengths

    def __call__(self, inputs, cache=None, **kwargs):
        logits = self.model(inputs, cache=cache, **kwargs)
        seen = cache[0].offset if cache else 0  # tokens seen after this call, prompt included (batch of one)
        done = int(seen.item() if isinstance(seen, mx.array) else seen) - self.prompt_lengths[-1]
        target = self.words[done] if 0 <= done < len(self.words) else END_OF_TURN_ID
        return logits.at[..., target].add(1e4)

    def make_cache(self):
        return self.model.make_cache()

    @property
    def layers(self):
        return self.model.layers


class Lines:
    """Fake terminal input: returns the lines, then raises `end` (EOFError = Ctrl-D)."""

    def __init__(self, *lines, end=EOFError):
        self.lines, self.end, self.prompts = list(lines), end, []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise self.end()
        return self.lines.pop(0)


@pytest.fixture(scope="module")
def pt(converted_models):
    return load_model(converted_models["pt"])


def run(loaded, *lines, settings=G(max_tokens=6), end=EOFError):
    out = []
    messages = chat_loop(loaded, settings, read_line=Lines(*lines, end=end), write=out.append)
    return messages, "".join(out)


def test_multi_turn_history_reset_and_quit(pt):
    messages, out = run(pt, "Hi there", "How old are you?", "/reset", "What is your name?", "/quit", "never read")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "What is your name?"
    assert "(conversation cleared)" in out and out.count("model> ") == 3

    messages, _ = run(pt, "Hi there", "How old are you?", "/exit")
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi there", "How old are you?"]


def test_replies_cut_by_the_limit_are_flagged(pt):
    # min_new_tokens == max_tokens: no stop token can end the reply first, so the limit must
    _, out = run(pt, "Tell me a story", settings=G(max_tokens=4, min_new_tokens=4))
    assert "[cut at 4 tokens]" in out


def scripted_chat(pt, monkeypatch, text: str):
    """The tiny model made to write `text` every turn, then <end_of_turn>; returns (model, prompt lengths).

    The wrapper reads the prompt length of each turn, recorded here as chat builds the prompt.
    """
    import gemma_mlx.chat as chat_module
    from gemma_mlx.chat_format import prompt_ids

    tok = pt.tokenizer
    lengths = []
    real_stream = chat_module.stream_reply

    def track(loaded, messages, *args, **kwargs):
        lengths.append(len(prompt_ids(tok, messages)))
        return real_stream(loaded, messages, *args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_reply", track)
    words = tok.encode(text, add_special_tokens=False)
    return dataclasses.replace(pt, model=EndsAfter(pt.model, lengths, words)), lengths


def test_a_looping_reply_is_flagged(pt, monkeypatch):
    loaded, _ = scripted_chat(pt, monkeypatch, " a big house with" * 5)
    _, out = run(loaded, "Where do you live?", settings=G(max_tokens=60, repetition_penalty=1.0))
    assert "a big house with a big house" in out and out.rstrip().endswith("[loop]")


def test_second_turn_sees_the_first_reply_and_stop_tokens_never_show(pt, monkeypatch):
    loaded, lengths = scripted_chat(pt, monkeypatch, " I reckon")
    words = pt.tokenizer.encode(" I reckon", add_special_tokens=False)
    messages, out = run(loaded, "Hi", "And then?", settings=G(max_tokens=20))
    assert [m["content"] for m in messages if m["role"] == "assistant"] == ["I reckon", "I reckon"]
    assert "model> I reckon\n" in out and "[cut" not in out and "<end_of_turn>" not in out
    # the second prompt holds the first exchange: its turn tokens and the reply's words
    assert lengths[1] > lengths[0] + len(words) + 4


def test_settings_show_change_and_reject(pt):
    _, out = run(pt, "/settings", "/settings temperature=0.7 max_tokens=3", "/settings", "/settings colour=red",
                 "/settings top_p=0", "/settings samples=2", "/bogus", "Hi")
    assert "settings: max_tokens=6 min_new_tokens=0 temperature=0.0" in out
    assert "settings: max_tokens=3 min_new_tokens=0 temperature=0.7" in out
    assert "Unknown setting 'colour'" in out
    assert "top_p is 0.0; it must be in (0, 1]" in out
    assert "one reply per turn" in out
    assert "Unknown command /bogus" in out
    assert "[cut at 3 tokens]" in out  # the changed limit was used for the next reply


def test_ctrl_c_at_the_prompt_and_during_a_reply_leave_cleanly(pt, monkeypatch):
    messages, out = run(pt, "Hi", end=KeyboardInterrupt)
    assert len(messages) == 2 and out.endswith("\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gemma_mlx.chat.stream_reply", interrupted)
    messages, out = run(pt, "Hi")
    assert messages == [] and "[stopped]" in out


def test_cli_chat_with_piped_input_writes_only_replies(converted_models):
    runner = CliRunner()  # its stdin is not a terminal, like `gemma-mlx chat M < questions.txt`
    result = runner.invoke(cli, ["chat", str(converted_models["it"]), "--max-tokens", "4", "--system", "Be Bluey."],
                           input="Hello\n/settings\nHi again\n")
    assert result.exit_code == 0, result.output
    assert "you> " not in result.stdout and "model> " not in result.stdout  # replies only
    assert result.stdout.count("[cut at 4 tokens]") == 2
    assert "settings: max_tokens=4" in result.stdout
    assert "Traceback" not in result.output


def test_cli_chat_errors_are_clean(converted_models, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["chat", str(converted_models["pt"]), "--top-p", "0"], input="Hi\n")
    assert result.exit_code == 1
    assert "top_p is 0.0; it must be in (0, 1]" in result.output and "Traceback" not in result.output


def test_run_chat_loads_by_name_from_outputs(converted_models, isolated_outputs):
    import shutil

    shutil.copytree(converted_models["pt"], isolated_outputs / "models" / "tiny-gemma-3-pt")
    out = []
    messages = run_chat("tiny-gemma-3-pt", settings=G(max_tokens=2), read_line=Lines("Hi", "/quit"), write=out.append)
    assert len(messages) == 2 and "[cut at 2 tokens]" in "".join(out)


def test_system_message_stays_through_reset(pt):
    out = []
    messages = chat_loop(pt, G(max_tokens=2), read_line=Lines("Hi", "/reset", "Hello"), write=out.append,
                         system="You are Bluey.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are Bluey." and messages[1]["content"] == "Hello"


def test_change_settings_names_the_known_keys_and_refuses_empty_values():
    from gemma_mlx.chat import change_settings
    from gemma_mlx.errors import GemmaMlxError

    with pytest.raises(GemmaMlxError, match="Unknown setting 'colour'. Settings: max_tokens, .*seed"):
        change_settings(G(), ["colour=blue"])
    with pytest.raises(GemmaMlxError, match="'null' is not a valid value for temperature"):
        change_settings(G(), ["temperature=null"])  # would otherwise be skipped, leaving the old value
    assert change_settings(G(), ["temperature=0.7", "max_tokens=12"]) == G(temperature=0.7, max_tokens=12)
