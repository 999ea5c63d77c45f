"""Gemma 4's thought channel: with thinking off a thought is no stop and is never shown (generate, chat's
stream, the arena's engine) and the answer after it is the reply; with thinking on (chat --thinking) the
thought is shown marked and still kept out of the conversation; Gemma 3 refuses thinking.

The tiny model's replies are random, so a test scripts the reply: the loaded model's logits get a large
bias on the next token of a script at every step (how far into the reply a step is comes from the number
of tokens the model has been fed since the prompt).
"""

import dataclasses
import queue

import mlx.core as mx
import pytest
from click.testing import CliRunner

from gemma_mlx.chat import chat_loop, run_chat
from gemma_mlx.chat_format import prompt_ids
from gemma_mlx.cli import cli
from gemma_mlx.config import GenerationSettings
from gemma_mlx.errors import GemmaMlxError
from gemma_mlx.families import GEMMA4
from gemma_mlx.generate import generate_replies
from gemma_mlx.models import load_model
from gemma_mlx.serving.engine import Engine
from gemma_mlx.tiny import write_tiny_gemma4_checkpoint

SETTINGS = GenerationSettings(temperature=0.0, max_tokens=24, repetition_penalty=1.0)
MESSAGES = [{"role": "system", "content": "You are Bluey."}, {"role": "user", "content": "What do you like?"}]
THOUGHT_WORDS = " I reckon we"  # what the scripted model thinks
ANSWER_WORDS = " Mum says the game"  # and what it answers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gemma4-thinking")
    hf = write_tiny_gemma4_checkpoint(root / "tiny-gemma-4-it", "it", seed=11)
    return convert_checkpoint(str(hf), out=root / "mlx", dtype="float32").path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer._tokenizer.encode(text, add_special_tokens=False))


def script_of(tokenizer, thought: bool = True, answer: bool = True) -> list[int]:
    """<|channel>thought\\n I reckon we<channel|> Mum says the game<turn|>, in parts."""
    token = tokenizer.convert_tokens_to_ids
    tokens = []
    if thought:
        tokens += [token(GEMMA4.channel_open), *ids(tokenizer, "thought\n" + THOUGHT_WORDS)]
        tokens += [token(GEMMA4.channel_close)] if answer else ids(tokenizer, " and then more") * 8
    if answer:
        tokens += [*ids(tokenizer, ANSWER_WORDS), token(GEMMA4.turn_end)]
    return tokens


class scripted:
    """Within the block, the model's top token at reply step k is script[k] (for one row at a time)."""

    def __init__(self, loaded, prompt_length: int, script: list[int]):
        self.loaded, self.prompt_length, self.script = loaded, prompt_length, script

    def __enter__(self):
        model, state = self.loaded.model, {"fed": 0}
        plain, prompt_length, script = type(model), self.prompt_length, self.script

        def biased(self, inputs, *args, **kwargs):
            logits = plain.__call__(self, inputs, *args, **kwargs)
            state["fed"] += inputs.shape[1]
            step = state["fed"] - prompt_length
            if step < 0:
                return logits
            target = script[min(step, len(script) - 1)]
            return logits + 100.0 * (mx.arange(logits.shape[-1]) == target).astype(logits.dtype)

        self.plain = plain
        model.__class__ = type("Scripted", (plain,), {"__call__": biased})
        return self

    def __exit__(self, *exc):
        self.loaded.model.__class__ = self.plain


def length(loaded, messages, thinking=False) -> int:
    return len(prompt_ids(loaded.tokenizer, messages, thinking))


def answer(loaded) -> str:
    return loaded.tokenizer.decode(ids(loaded.tokenizer, ANSWER_WORDS)).strip()


def test_thinking_on_opens_the_system_turn_with_the_think_token(loaded):
    text = loaded.tokenizer.decode(prompt_ids(loaded.tokenizer, MESSAGES, thinking=True))
    assert text.startswith("<bos><|turn>system\n<|think|>\nYou are Bluey.<turn|>\n<|turn>user\n"), text
    bare = loaded.tokenizer.decode(prompt_ids(loaded.tokenizer, MESSAGES[1:], thinking=True))
    assert bare.startswith("<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n"), bare  # a system turn is made
    assert GEMMA4.think not in loaded.tokenizer.decode(prompt_ids(loaded.tokenizer, MESSAGES))  # off by default


def test_a_past_thought_is_not_fed_back():
    past = [*MESSAGES, {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hooray!"},
            {"role": "user", "content": "Again?"}]
    text = GEMMA4.render(past, add_generation_prompt=True)
    assert "<|turn>model\nHooray!<turn|>\n" in text and "hmm" not in text and GEMMA4.channel_open not in text


def test_generate_leaves_the_thought_out_and_goes_on_to_the_answer(loaded):
    with scripted(loaded, length(loaded, MESSAGES), script_of(loaded.tokenizer)):
        (reply,) = generate_replies(loaded, [MESSAGES], SETTINGS)
    assert reply.finish_reason == "stop" and reply.stop_token == GEMMA4.turn_end
    assert reply.text == answer(loaded)  # only the answer: no thought, no channel tokens
    assert reply.thought == THOUGHT_WORDS.strip()  # kept apart, without the channel's name
    assert reply.tokens == len(ids(loaded.tokenizer, ANSWER_WORDS))


def test_a_reply_that_only_thinks_to_the_limit_is_cut_and_empty(loaded):
    settings = dataclasses.replace(SETTINGS, max_tokens=10)
    with scripted(loaded, length(loaded, MESSAGES), script_of(loaded.tokenizer, answer=False)):
        (reply,) = generate_replies(loaded, [MESSAGES], settings)
    assert reply.finish_reason == "length" and reply.cut
    assert reply.text == "" and reply.tokens == 0 and reply.thought.startswith(THOUGHT_WORDS.strip())


def lines_of(*lines):
    given = iter(lines)
    return lambda _prompt: next(given)


def chat(loaded, thinking=False, lines=("What do you like?",), thinks=None):
    """What chat writes and keeps; `thinks`: whether the prompt will ask for thinking (default: `thinking`)."""
    written = []
    messages = [{"role": "user", "content": lines[-1]}]
    thinks = thinking if thinks is None else thinks
    with scripted(loaded, length(loaded, messages, thinks), script_of(loaded.tokenizer)):
        kept = chat_loop(loaded, SETTINGS, read_line=lines_of(*lines, "/quit"), write=written.append,
                         labels=False, thinking=thinking)
    return "".join(written), kept


def test_chat_streams_only_the_answer_and_keeps_it(loaded):
    output, kept = chat(loaded)
    assert output == answer(loaded) + "\n"  # nothing of the thought was streamed
    assert kept[-1] == {"role": "assistant", "content": answer(loaded)}


def test_chat_thinking_shows_the_thought_marked_and_keeps_only_the_answer(loaded):
    output, kept = chat(loaded, thinking=True)
    assert output == f"thinking: {THOUGHT_WORDS.strip()}\n{answer(loaded)}\n"
    assert kept[-1] == {"role": "assistant", "content": answer(loaded)}  # the thought is not history


def test_chat_settings_turn_thinking_on_and_off(loaded):
    output, _ = chat(loaded, lines=("/settings thinking=on", "/settings thinking=maybe", "What do you like?"), thinks=True)
    assert "thinking=on" in output and "thinking must be on or off, not 'maybe'" in output
    assert f"thinking: {THOUGHT_WORDS.strip()}\n{answer(loaded)}\n" in output


def test_the_arena_engine_streams_only_the_answer(model_dir):
    engine = Engine({"gemma4": str(model_dir)})
    try:
        loaded = engine.models["gemma4"]
        events: queue.Queue = queue.Queue()
        with scripted(loaded, length(loaded, MESSAGES), script_of(loaded.tokenizer)):
            engine.submit("gemma4", MESSAGES, SETTINGS, lambda kind, payload: events.put((kind, payload)))
            pieces = []
            while True:
                kind, payload = events.get(timeout=120)
                if kind == "text":
                    pieces.append(payload)
                    continue
                assert kind == "done", payload
                break
    finally:
        engine.close()
    assert "".join(pieces) == payload.text == answer(loaded)
    assert payload.finish_reason == "stop" and payload.stop_token == GEMMA4.turn_end


def test_gemma3_refuses_thinking(converted_models):
    with pytest.raises(GemmaMlxError, match="Gemma 3 models have no thinking"):
        run_chat(str(converted_models["it"]), thinking=True, read_line=lines_of("/quit"), write=lambda _: None)
    written = []
    chat_loop(load_model(str(converted_models["it"])), SETTINGS, labels=False, write=written.append,
              read_line=lines_of("/settings thinking=on", "/quit"))
    assert "Gemma 3 models have no thinking" in "".join(written) and "Settings unchanged" in "".join(written)
    result = CliRunner().invoke(cli, ["chat", str(converted_models["it"]), "--thinking"], input="hi\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Gemma 3 models have no thinking" in result.output and "drop --thinking" in result.output
