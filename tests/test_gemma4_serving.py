"""A Gemma 4 model in the arena's engine: a system prompt goes in as its own turn, a reply stops on
<turn|> (and on the thinking switch <|think|>, which has no place in a reply); thought channels are
tested in tests/test_gemma4_thinking.py.

The tiny model's replies are random, so the tests push one token to the top of every step (a large
logit bias on the loaded model) and check what the engine makes of it.
"""

import dataclasses
import queue

import mlx.core as mx
import pytest

from gemma_mlx.config import GenerationSettings
from gemma_mlx.families import GEMMA4
from gemma_mlx.serving.engine import Engine
from gemma_mlx.tiny import write_tiny_gemma4_checkpoint

SETTINGS = GenerationSettings(temperature=0.0, max_tokens=6, repetition_penalty=1.0)
MESSAGES = [{"role": "system", "content": "You are Bluey."}, {"role": "user", "content": "What do you like?"}]
WORD = 500  # an ordinary token of the tiny vocabulary


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gemma4-serving")
    hf = write_tiny_gemma4_checkpoint(root / "tiny-gemma-4-it", "it", seed=11)
    model_dir = convert_checkpoint(str(hf), out=root / "mlx", dtype="float32").path
    engine = Engine({"gemma4": str(model_dir)})
    yield engine
    engine.close()


def favour(loaded, token_id):
    """Make `token_id` the top token of every step (None: the model as it was)."""
    model = loaded.model
    plain = getattr(model, "_plain_class", type(model))
    if token_id is None:
        model.__class__ = plain
        return

    def biased(self, *args, **kwargs):
        logits = plain.__call__(self, *args, **kwargs)
        return logits + 100.0 * (mx.arange(logits.shape[-1]) == token_id).astype(logits.dtype)

    model.__class__ = type(f"Favouring{token_id}", (plain,), {"__call__": biased})
    object.__setattr__(model, "_plain_class", plain)


def reply(engine, token_id) -> dict:
    loaded = engine.models["gemma4"]
    tokenizer = loaded.tokenizer
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else None
    favour(loaded, token_id)
    events: queue.Queue = queue.Queue()
    try:
        engine.submit("gemma4", MESSAGES, SETTINGS, lambda kind, payload: events.put((kind, payload)))
        while True:
            kind, payload = events.get(timeout=120)
            if kind in ("done", "error"):
                assert kind == "done", payload
                return {**dataclasses.asdict(payload), "favoured": token}
    finally:
        favour(loaded, None)


def test_gemma4_prompt_has_a_system_turn_of_its_own(engine):
    from gemma_mlx.chat_format import prompt_ids

    tokenizer = engine.models["gemma4"].tokenizer
    text = tokenizer.decode(prompt_ids(tokenizer, MESSAGES))
    assert text.startswith("<bos><|turn>system\nYou are Bluey.<turn|>\n<|turn>user\nWhat do you like?<turn|>\n<|turn>model\n")


def test_an_ordinary_word_does_not_end_the_reply(engine):
    done = reply(engine, WORD)
    assert done["finish_reason"] == "length" and done["stop_token"] is None
    assert done["tokens"] == SETTINGS.max_tokens and done["text"].strip()


@pytest.mark.parametrize("token", [GEMMA4.turn_end, GEMMA4.think])
def test_the_turn_end_and_the_thinking_switch_end_the_reply_unseen(engine, token):
    token_id = engine.models["gemma4"].tokenizer.convert_tokens_to_ids(token)
    done = reply(engine, token_id)
    assert done["finish_reason"] == "stop" and done["stop_token"] == token
    assert done["text"] == ""  # nothing of the turn end or of the switch is shown
