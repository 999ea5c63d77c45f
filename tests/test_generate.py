"""The generation engine: stop rules, first turn only, cut flags, min new tokens, seeds, batching, loading."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import mlx.core as mx
from gemma_mlx.chat_format import END_OF_TURN_ID, prompt_ids
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.errors import CheckpointError, ConfigError, GemmaMlxError
from gemma_mlx.generate import generate_replies, load_model

PROMPTS = [
    "Hi",
    "Tell me a story about a dog who goes to the beach and plays all day long with a friend",
    "What is your name?",
    "I reckon we should play a game in the backyard today. Hooray! My little sister wants to be the shopkeeper",
    "Can you help me with my homework?",
]
UNUSED7 = 13  # <unused7>
BIG = 1e4


class Scripted:
    """Wraps a model so that after input token A it emits `after[A]`, else `default` (if any).

    A large logit bias keyed on the *input* token: it acts the same in a batch and one at a
    time, so the engine's stop rules can be tested with replies of a chosen shape.
    """

    def __init__(self, model, after: dict[int, int], default: int | None = None, vocab: int = 1024):
        bias = np.zeros((vocab, vocab), dtype=np.float32)
        if default is not None:
            bias[:, default] = BIG
        for token, next_token in after.items():
            bias[token] = 0
            bias[token, next_token] = BIG
        self.model, self.bias = model, mx.array(bias)

    def __call__(self, inputs, cache=None, **kwargs):
        return self.model(inputs, cache=cache, **kwargs) + self.bias[inputs]

    def make_cache(self):
        return self.model.make_cache()

    @property
    def layers(self):
        return self.model.layers


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chain(ids: list[int]) -> dict[int, int]:
    return {a: b for a, b in zip(ids, ids[1:])}


@pytest.fixture(scope="module")
def pt_only_eos(converted_models, tmp_path_factory):
    """The tiny -pt model as plain mlx-lm would convert it: eos 1 only, no <end_of_turn> stop."""
    out = tmp_path_factory.mktemp("pt-eos1") / "model"
    shutil.copytree(converted_models["pt"], out)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        config["eos_token_id"] = 1
        (out / name).write_text(json.dumps(config))
    return load_model(out)


@pytest.fixture(scope="module")
def lively(converted_models, tmp_path_factory):
    """A tmp copy of the tiny -pt model edited so that greedy replies depend on the prompt.

    The random tiny model repeats one token whatever the prompt (its residual is dominated by the
    input embedding). Shrinking the embedding lets attention matter; boosting the final norm keeps
    clear logit margins; trimming the vocabulary to the tokenizer's makes every token decodable;
    zeroing the special rows keeps the model from stopping on its own; an 8-token sliding window
    makes the batched rotating KV caches wrap around.
    """
    from tokenizers import Tokenizer

    src = converted_models["pt"]
    out = tmp_path_factory.mktemp("lively") / "model"
    shutil.copytree(src, out)
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    for path in out.glob("*.safetensors"):
        weights = mx.load(str(path))
        if "model.embed_tokens.weight" in weights:
            embed = weights["model.embed_tokens.weight"][:vocab] * 0.05
            embed[:107] = 0.0
            weights["model.embed_tokens.weight"] = embed
        if "model.norm.weight" in weights:
            weights["model.norm.weight"] = (1 + weights["model.norm.weight"]) * 20 - 1
        mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    config.update(vocab_size=vocab, sliding_window=8)
    (out / "config.json").write_text(json.dumps(config))
    return load_model(out)


def scripted(loaded, after=None, default=None):
    vocab = loaded.model.args.vocab_size
    return dataclasses.replace(loaded, model=Scripted(loaded.model, after or {}, default, vocab))


def test_pt_model_stops_on_end_of_turn_and_keeps_only_the_first_turn(pt_only_eos):
    tok = pt_only_eos.tokenizer
    words = word_ids(tok, "I reckon heaps")
    after = word_ids(tok, " Mum says no")
    last = prompt_ids(tok, [{"role": "user", "content": "Hi"}])[-1]
    # reply, <end_of_turn>, then a second turn the model would write if nothing stopped it
    script = chain([last, *words, END_OF_TURN_ID, *after, 105, *word_ids(tok, "user"), *after])
    model = scripted(pt_only_eos, script)
    (reply,) = generate_replies(model, ["Hi"], G(max_tokens=30))
    assert reply.text == tok.decode(words).strip() == "I reckon heaps"
    assert (reply.finish_reason, reply.stop_token, reply.cut) == ("stop", "<end_of_turn>", False)
    assert reply.tokens == len(words)
    assert "Mum" not in reply.text and "<" not in reply.text
    assert reply.seconds > 0 and reply.tokens_per_second > 0


def test_reply_ending_on_an_unused_token_stops_there_and_hides_it(pt_only_eos):
    tok = pt_only_eos.tokenizer
    words = word_ids(tok, "Hooray let's play")
    last = prompt_ids(tok, [{"role": "user", "content": "Play?"}])[-1]
    model = scripted(pt_only_eos, chain([last, *words, UNUSED7, *word_ids(tok, " pad pad")]))
    (reply,) = generate_replies(model, ["Play?"], G(max_tokens=30))
    assert reply.text == "Hooray let's play"
    assert reply.stop_token == "<unused7>" and reply.finish_reason == "stop"
    assert "unused" not in reply.text and "pad" not in reply.text


def test_token_limit_gives_length_and_cut_but_a_stop_on_the_last_token_is_complete(pt_only_eos):
    tok = pt_only_eos.tokenizer
    a, b = word_ids(tok, " heaps")[0], word_ids(tok, " fun")[0]
    last = prompt_ids(tok, [{"role": "user", "content": "Go"}])[-1]
    looping = scripted(pt_only_eos, {last: a, a: b, b: a})
    (reply,) = generate_replies(looping, ["Go"], G(max_tokens=5))
    assert (reply.finish_reason, reply.cut, reply.tokens, reply.stop_token) == ("length", True, 5, None)
    assert reply.text == tok.decode([a, b, a, b, a]).strip()

    ending = scripted(pt_only_eos, {last: a, a: b, b: END_OF_TURN_ID})
    (reply,) = generate_replies(ending, ["Go"], G(max_tokens=3))  # 2 words + <end_of_turn> = 3 tokens
    assert (reply.finish_reason, reply.cut, reply.tokens) == ("stop", False, 2)


def test_min_new_tokens_suppresses_every_stop_token_until_reached(pt_only_eos):
    always_end = scripted(pt_only_eos, default=END_OF_TURN_ID)
    quick, held = generate_replies(always_end, ["Hi", "Hi"], [G(max_tokens=20), G(max_tokens=20, min_new_tokens=4)])
    assert (quick.tokens, quick.text, quick.stop_token) == (0, "", "<end_of_turn>")
    assert held.tokens == 4 and held.finish_reason == "stop" and held.stop_token == "<end_of_turn>"
    # no stop token slipped out while suppressed (none of the 4 is special)
    assert "<" not in held.text

    only_unused = scripted(pt_only_eos, default=UNUSED7)  # the model's favourite end is an <unusedN>
    (reply,) = generate_replies(only_unused, ["Hi"], G(max_tokens=20, min_new_tokens=3))
    assert reply.tokens == 3 and reply.stop_token == "<unused7>"


def test_no_repeat_ngram_breaks_a_loop_and_the_reply_can_still_stop(pt_only_eos):
    from gemma_mlx.text import is_loop

    tok = pt_only_eos.tokenizer
    words = word_ids(tok, "a big house with")
    last = prompt_ids(tok, [{"role": "user", "content": "Hi"}])[-1]
    # "a big house with a big house with ..." forever; <end_of_turn> is always the runner-up
    script = chain([last, *words]) | {words[-1]: words[0]}
    model = scripted(pt_only_eos, script)
    for word in words:
        model.model.bias[word, END_OF_TURN_ID] = BIG / 2
    looping, guarded = generate_replies(model, ["Hi", "Hi"], [G(max_tokens=40), G(max_tokens=40, no_repeat_ngram=3)])
    assert looping.cut and is_loop(looping.text)
    # "a big house with a big" then "house" would repeat the 3-gram "a big house": the reply ends instead
    assert guarded.finish_reason == "stop" and guarded.stop_token == "<end_of_turn>"
    assert not is_loop(guarded.text) and guarded.text.count("big house") == 1


def test_greedy_batched_equals_one_at_a_time_and_mlx_lm(lively):
    from mlx_lm.generate import generate_step

    settings = [G(max_tokens=n, repetition_penalty=1.0) for n in (6, 24, 11, 30, 17)]  # plain greedy; rows end apart
    batched = generate_replies(lively, PROMPTS, settings)
    single = [generate_replies(lively, [p], s)[0] for p, s in zip(PROMPTS, settings)]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.tokens for r in batched] == [s.max_tokens for s in settings]

    tok = lively.tokenizer
    for prompt, s, reply in zip(PROMPTS, settings, batched):
        ids = prompt_ids(tok, [{"role": "user", "content": prompt}])
        reference = [int(t) for t, _ in generate_step(mx.array(ids), lively.model, max_tokens=s.max_tokens)]
        assert reply.text == tok.decode(reference).strip()
    # the edited model really answers each prompt differently (the check above is not trivial)
    assert len({r.text for r in batched}) == len(PROMPTS)
    assert all(len(set(word_ids(tok, r.text))) > 3 for r in batched)


def test_same_seed_same_replies_independent_of_the_batch(lively):
    settings = G(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, samples=2, seed=7)
    first = generate_replies(lively, PROMPTS[:3], settings)
    again = generate_replies(lively, PROMPTS[:3], settings)
    assert [r.text for r in first] == [r.text for r in again]
    assert [(r.prompt_index, r.sample_index) for r in first] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert first[0].text != first[1].text  # two samples of a prompt differ
    other_seed = generate_replies(lively, PROMPTS[:3], dataclasses.replace(settings, seed=8))
    assert [r.text for r in other_seed] != [r.text for r in first]
    alone = generate_replies(lively, [PROMPTS[1]], settings)  # same rows, without the others
    assert [r.text for r in alone] == [r.text for r in first[2:4]]
    greedy = generate_replies(lively, PROMPTS[:1], G(max_tokens=16))[0]
    assert greedy.text != first[0].text


def test_per_row_settings_in_one_batch_match_each_run_alone(lively):
    settings = [
        G(max_tokens=5),
        G(max_tokens=12, temperature=0.8, min_p=0.05, seed=3),
        G(max_tokens=9, repetition_penalty=1.5),
    ]
    batched = generate_replies(lively, PROMPTS[:3], settings)
    for prompt, s, reply in zip(PROMPTS, settings, batched):
        (alone,) = generate_replies(lively, [prompt], s)
        assert reply.text == alone.text and reply.tokens == s.max_tokens
        assert reply.settings == dataclasses.asdict(s)
    plain = generate_replies(lively, [PROMPTS[2]], G(max_tokens=9))[0]
    assert plain.text != batched[2].text  # the repetition penalty changed that row


def test_chat_turn_prompts_use_the_gemma_format(lively):
    tok = lively.tokenizer
    messages = [
        {"role": "system", "content": "You are Bluey."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is your name?"},
    ]
    (reply,) = generate_replies(lively, [messages], G(max_tokens=8))
    assert reply.prompt == "What is your name?"
    ids = prompt_ids(tok, messages)
    assert tok.decode(ids).startswith("<bos><start_of_turn>user\nYou are Bluey.\n\nHi<end_of_turn>")
    assert tok.decode(ids).endswith("<start_of_turn>model\n")
    (plain,) = generate_replies(lively, ["What is your name?"], G(max_tokens=8))
    assert plain.text != reply.text  # the history reached the model


def test_load_model_with_adapters(converted_models, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    base = converted_models["pt"]
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    model, _ = load(str(base))
    linear_to_lora_layers(model, 2, lora)
    rng = np.random.default_rng(0)
    leaves = {k: mx.array(0.2 * rng.standard_normal(v.shape).astype(np.float32))
              for k, v in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    run = tmp_path / "runs" / "unit" / "tiny-gemma-3-pt"
    run.mkdir(parents=True)
    mx.save_safetensors(str(run / "adapters.safetensors"), leaves)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (run / "adapter_config.json").write_text(json.dumps(config))

    with_spec = load_model(f"{base}::{run}")
    with_arg = load_model(base, adapter_path=run)
    plain = load_model(base)
    assert with_spec.adapter_path == run and with_spec.path == base and plain.adapter_path is None
    assert with_spec.name == "tiny-gemma-3-pt + LoRA" and plain.name == "tiny-gemma-3-pt (base)"  # models.display_name
    assert with_spec.manifest["stage"] == "convert"
    x = mx.array([[2, 105, 300, 301, 106]])
    assert np.allclose(np.array(with_spec.model(x)), np.array(with_arg.model(x)))
    assert not np.allclose(np.array(with_spec.model(x)), np.array(plain.model(x)), atol=1e-3)


def test_load_model_errors_are_clear(converted_models, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no weights"):
        load_model(empty)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(converted_models["it"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_model(no_tokenizer)
    wrong_type = tmp_path / "wrong-type"
    shutil.copytree(converted_models["pt"], wrong_type)
    (wrong_type / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    with pytest.raises(CheckpointError, match="Could not load the model in .*Model type nonsense not supported"):
        load_model(wrong_type)
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        load_model(f"{converted_models['pt']}::{tmp_path}")
    with pytest.raises(GemmaMlxError, match="already names adapters"):
        load_model(f"{converted_models['pt']}::{tmp_path}", adapter_path=tmp_path)


def test_bad_settings_and_prompts_are_clear_errors(pt_only_eos):
    with pytest.raises(ConfigError, match="2 generation settings for 3 prompts"):
        generate_replies(pt_only_eos, ["a", "b", "c"], [G(), G()])
    with pytest.raises(ConfigError, match=r"top_p is 0.0; it must be in \(0, 1\]"):
        generate_replies(pt_only_eos, ["a"], G(top_p=0.0))
    with pytest.raises(ConfigError, match="no_repeat_ngram is 1; it must be 0"):
        generate_replies(pt_only_eos, ["a"], G(no_repeat_ngram=1))
    with pytest.raises(ConfigError, match=r"min_new_tokens \(5\) cannot exceed generation.max_tokens \(4\)"):
        generate_replies(pt_only_eos, ["a"], G(max_tokens=4, min_new_tokens=5))
    with pytest.raises(GemmaMlxError, match="Prompt 2 is neither"):
        generate_replies(pt_only_eos, ["a", [{"role": "assistant", "content": "x"}]])
    assert generate_replies(pt_only_eos, []) == []
