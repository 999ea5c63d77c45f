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

    @property
    def args(self):  # the context limit lives here
        return self.model.args


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


def test_multi_turn_history_reset_and_quit(pt, monkeypatch):
    loaded, _ = scripted_chat(pt, monkeypatch, " I reckon so")  # the random model's replies loop; this one does not
    messages, out = run(loaded, "Hi there", "How old are you?", "/reset", "What is your name?", "/quit", "never read")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "What is your name?"
    assert "(conversation cleared)" in out and out.count("model> ") == 3

    messages, _ = run(loaded, "Hi there", "How old are you?", "/exit")
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
    from gemma_mlx.chat_format import prompt_ids

    loaded, lengths = scripted_chat(pt, monkeypatch, " a big house with" * 10)
    messages, out = run(loaded, "Where do you live?", "Hi", settings=G(max_tokens=60, repetition_penalty=1.0))
    first = out.split("\n")[0]
    assert "a big house with a big house" in first and "[loop: stopped here" in first
    # shown and stopped as soon as it is found, well before the 10 rounds the model would write
    assert first.count("big house") < 10
    # the looped reply (and its message) stayed out: the next prompt is "Hi" alone
    assert messages == [] and lengths[1] == len(prompt_ids(pt.tokenizer, [{"role": "user", "content": "Hi"}]))


def test_a_loop_with_no_spaces_is_stopped_too(pt, monkeypatch):
    loaded, _ = scripted_chat(pt, monkeypatch, "are" * 40)
    messages, out = run(loaded, "Say something", settings=G(max_tokens=80, repetition_penalty=1.0))
    assert "arearearea" in out and "[loop: stopped here" in out and messages == []


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
    assert messages == [] and "[stopped; left out of the conversation" in out


def test_cli_chat_with_piped_input_writes_only_replies(converted_models):
    runner = CliRunner()  # its stdin is not a terminal, like `gemma-mlx chat M < questions.txt`
    result = runner.invoke(cli, ["chat", str(converted_models["it"]), "--max-tokens", "4", "--system", "Be Bluey."],
                           input="Hello\n/settings\n/settings best_of=2\n/setings\nHi again\n")
    assert result.exit_code == 0, result.output
    assert "you> " not in result.stdout and "model> " not in result.stdout  # replies only
    assert result.stdout.count("[cut at 4 tokens]") == 2 and len(result.stdout.splitlines()) == 2
    assert result.stdout.endswith("]\n")  # no empty line after the last reply
    # the answers to /commands go to stderr, with the progress
    assert "settings: max_tokens=4" in result.stderr and "best of 2" in result.stderr
    assert "Unknown command /setings" in result.stderr
    assert "Traceback" not in result.output


def test_cli_chat_errors_are_clean(converted_models, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["chat", str(converted_models["pt"]), "--top-p", "0"], input="Hi\n")
    assert result.exit_code == 1
    assert "top_p is 0.0; it must be in (0, 1]" in result.output and "Traceback" not in result.output


def test_run_chat_loads_by_name_from_outputs(converted_models, isolated_outputs, monkeypatch):
    import shutil

    from gemma_mlx import decode_step

    shutil.copytree(converted_models["pt"], isolated_outputs / "models" / "tiny-gemma-3-pt")
    out = []
    warmed = []
    monkeypatch.setattr(decode_step, "warm_up", lambda model: warmed.append(model) or True)
    messages = run_chat("tiny-gemma-3-pt", settings=G(max_tokens=2), read_line=Lines("Hi", "/quit"), write=out.append)
    assert len(messages) == 2 and "[cut at 2 tokens]" in "".join(out)
    assert len(warmed) == 1  # greedy chat makes the output layer's screen once, as it loads (fast_argmax)
    run_chat("tiny-gemma-3-pt", settings=G(max_tokens=2, temperature=0.7), read_line=Lines("/quit"), write=out.append)
    assert len(warmed) == 1  # a sampling chat does not


def test_system_message_stays_through_reset(pt):
    out = []
    messages = chat_loop(pt, G(max_tokens=2), read_line=Lines("Hi", "/reset", "Hello"), write=out.append,
                         system="You are Bluey.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are Bluey." and messages[1]["content"] == "Hello"


def test_change_settings_names_the_known_keys_and_refuses_empty_values():
    from gemma_mlx.chat import change_settings
    from gemma_mlx.errors import GemmaMlxError

    with pytest.raises(GemmaMlxError, match="Unknown setting .colour.. Settings: max_tokens, .*seed, best_of, thinking"):
        change_settings(G(), ["colour=blue"])
    with pytest.raises(GemmaMlxError, match="'null' is not a valid value for temperature"):
        change_settings(G(), ["temperature=null"])  # would otherwise be skipped, leaving the old value
    assert change_settings(G(), ["temperature=0.7", "max_tokens=12"]) == G(temperature=0.7, max_tokens=12)


def recording_chat(pt, monkeypatch, text: str):
    """scripted_chat that also records the (messages, seed) of every reply asked for."""
    import gemma_mlx.chat as chat_module

    loaded, lengths = scripted_chat(pt, monkeypatch, text)
    calls, tracked = [], chat_module.stream_reply

    def record(loaded, messages, settings, *args, **kwargs):
        calls.append(([dict(m) for m in messages], settings.seed))
        return tracked(loaded, messages, settings, *args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_reply", record)
    return loaded, calls


def test_retry_answers_the_last_message_again_with_a_new_seed(pt, monkeypatch):
    loaded, calls = recording_chat(pt, monkeypatch, " I reckon")
    messages, out = run(loaded, "Hi", "/retry", "/retry", settings=G(max_tokens=20))
    assert [m["role"] for m in messages] == ["user", "assistant"]  # replaced, not added
    assert [c[0] for c in calls] == [[{"role": "user", "content": "Hi"}]] * 3  # the old reply is not in the prompt
    assert [c[1] for c in calls] == [0, 1, 2]  # another draw each time when sampling
    _, out = run(loaded, "/retry")
    assert "nothing to retry" in out


def test_retry_after_a_stopped_reply_and_undo(pt, monkeypatch):
    import gemma_mlx.chat as chat_module

    loaded, calls = recording_chat(pt, monkeypatch, " I reckon")
    answer = chat_module.stream_reply
    interrupts = iter([True, False, False, False])

    def stopped_once(*args, **kwargs):
        if next(interrupts):
            raise KeyboardInterrupt
        return answer(*args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_reply", stopped_once)
    messages, out = run(loaded, "Hi", "/retry", "And then?", "/undo", settings=G(max_tokens=20))
    assert "[stopped; left out" in out and "(dropped the exchange that began 'And then?'; 1 left)" in out
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I reckon"}]
    _, out = run(loaded, "/undo")
    assert "(nothing to undo)" in out


def test_system_prompt_set_and_cleared_mid_conversation(pt, monkeypatch):
    loaded, calls = recording_chat(pt, monkeypatch, " I reckon")
    messages, out = run(loaded, "/system You are Bluey, a dog.", "Hi", "/system", "Bye", settings=G(max_tokens=20))
    assert "(system prompt set: 'You are Bluey, a dog.')" in out and "(system prompt cleared)" in out
    assert calls[0][0][0] == {"role": "system", "content": "You are Bluey, a dog."}
    assert [m["role"] for m in calls[1][0]] == ["user", "assistant", "user"]  # kept the turns, dropped the system
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2


def test_save_writes_persona_data_and_never_overwrites_unless_forced(pt, monkeypatch, tmp_path):
    import json

    from gemma_mlx.examples import load_examples

    loaded, _ = recording_chat(pt, monkeypatch, " I reckon")
    path = tmp_path / "chat.jsonl"
    _, out = run(loaded, f"/save {path}", "/system Be Bluey.", "Hi", f"/save {path}", settings=G(max_tokens=20))
    assert "Nothing to save yet" in out and f"(saved 1 exchange to {path})" in out
    saved = path.read_text()
    assert json.loads(saved) == {"messages": [{"role": "system", "content": "Be Bluey."},
                                              {"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "I reckon"}]}
    (example,) = load_examples(path)  # the persona data reader takes it as training data
    assert example.messages[-1]["content"] == "I reckon"

    messages, out = run(loaded, "Hi", f"/save {path}", f"/save {tmp_path / 'no' / 'x.jsonl'}", f"/save {tmp_path}",
                        "Again", f"/save --force {path}", settings=G(max_tokens=20))
    assert f"{path} already exists and was left as it is. /save --force {path} replaces it." in out
    assert f"The folder {tmp_path / 'no'} does not exist" in out and f"{tmp_path} is a folder" in out
    assert len(messages) == 4  # the session went on after each refusal
    assert len(json.loads(path.read_text())["messages"]) == 4 and f"(saved 2 exchanges to {path})" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # no temp file left behind


def test_a_message_or_limit_too_big_for_the_model_is_refused_and_the_chat_goes_on(pt, monkeypatch):
    loaded, _ = recording_chat(pt, monkeypatch, " I reckon")
    messages, out = run(loaded, "Hi", "/settings max_tokens=99999999", "word " * 40000, "/settings", "And then?",
                        settings=G(max_tokens=20))
    assert "max_tokens 99999999 plus a prompt of" in out and "can read (32768 tokens)" in out
    assert "Settings unchanged." in out
    assert "settings: max_tokens=20 " in out  # the refused limit was not applied
    assert "The prompt is 80" in out and "Shorten it. That message was not sent; the conversation is kept." in out
    assert "-8" not in out  # no negative "at most" advice
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi", "And then?"]


def test_cli_chat_skips_a_line_that_is_not_utf8(converted_models):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", str(converted_models["it"]), "--max-tokens", "4"],
                           input=b"Hello\n\xff\xfe caf\xe9\nHi again\n")
    assert result.exit_code == 0, result.output
    assert "that line is not UTF-8 text, so it was skipped" in result.stderr  # a notice, not a reply
    assert len(result.stdout.splitlines()) == 2 and "not UTF-8" not in result.stdout  # the two replies
    assert "Traceback" not in result.output
