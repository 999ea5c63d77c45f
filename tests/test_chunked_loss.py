"""The chunked (cut) cross-entropy gives today's loss, gradients and validation numbers on the tiny models."""

import random

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from gemma_mlx.chat_format import END_OF_TURN_ID, START_OF_TURN_ID
from gemma_mlx.config import LoraSettings
from gemma_mlx.examples import Example
from gemma_mlx.training import batching, chunked_loss, trainee as tuning
from gemma_mlx.training.loop import evaluate

WORDS = "I reckon we should play a game in the backyard today Hooray my sister wants lunch".split()
# 1024 tiny-vocabulary rows in chunks of 106: ten chunks, the last one short, and the two
# turn-token ids (105, 106) fall in different chunks
CHUNK = 106


def examples(count: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(messages=[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))},
                              {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 20)))}],
                    text=None, source=f"x:{i}") for i in range(count)]


def prepared(model_dir, turn_rows: bool):
    """A trainee whose every trainable weight is moved off its initial value (LoRA B starts at zero)."""
    from mlx_lm import load

    lm, tokenizer = load(str(model_dir))
    trainee = tuning.prepare(lm, LoraSettings(num_layers=4, rank=4), turn_rows, turn_init="eos" if turn_rows else "keep")
    mx.random.seed(1)
    trainee.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape, dtype=p.dtype), trainee.trainable_parameters()))
    return trainee, tokenizer


def both_paths(monkeypatch, compute):
    """compute() on the plain (full-logits) path, then on the chunked path with small chunks."""
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", CHUNK)
    monkeypatch.setenv(chunked_loss.FULL_LOGITS_ENV, "1")
    plain = compute()
    monkeypatch.delenv(chunked_loss.FULL_LOGITS_ENV)
    return plain, compute()


def batch_arrays(tokenizer, seed: int):
    """A 3-example batch as the loss takes it (inputs, positions, targets, weights), and its token ids."""
    sequences = [batching.tokenize_example(tokenizer, e) for e in examples(3, seed=seed)]
    batch = batching.make_batch(sequences, [0, 1, 2])
    return (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets),
            mx.array(tuning.loss_weights(batch.targets, 5.0))), set(batch.inputs.ravel().tolist())


def loss_and_gradients(trainee, arrays):
    """A function giving the loss and the gradients by name, on whichever path the environment picks."""
    loss_and_grad = nn.value_and_grad(trainee, tuning.loss_fn)

    def compute():
        (loss, _), grads = loss_and_grad(trainee, *arrays)
        mx.eval(loss, grads)
        return loss.item(), dict(tree_flatten(grads))

    return compute


@pytest.mark.parametrize("flavour", ["pt", "it"])
def test_chunked_loss_and_gradients_equal_the_full_logits(converted_models, monkeypatch, flavour):
    trainee, tokenizer = prepared(converted_models[flavour], turn_rows=flavour == "pt")
    assert (tuning.output_matrix(trainee.lm) is not None) and trainee.lm.args.vocab_size > 4 * CHUNK
    arrays, token_ids = batch_arrays(tokenizer, seed=0)
    assert {START_OF_TURN_ID, END_OF_TURN_ID} <= token_ids
    before = np.array(trainee.embed.weight)
    (plain_loss, plain), (loss, chunked) = both_paths(monkeypatch, loss_and_gradients(trainee, arrays))
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert chunked.keys() == plain.keys()
    names = set(plain)
    assert ("turn_rows" in names) == (flavour == "pt") and any("lora_a" in n for n in names)
    for name, grad in plain.items():
        assert float(mx.abs(grad).max()) > 0, name
        np.testing.assert_allclose(np.array(chunked[name]), np.array(grad), rtol=1e-4,
                                   atol=1e-4 * float(mx.abs(grad).max()), err_msg=name)
    assert np.array_equal(np.array(trainee.embed.weight), before)  # the frozen table is untouched


def test_validation_numbers_are_unchanged(converted_models, monkeypatch):
    trainee, tokenizer = prepared(converted_models["pt"], turn_rows=True)
    sequences = [batching.tokenize_example(tokenizer, e) for e in examples(7, seed=3)]
    unused = list(range(300, 700))
    plain, chunked = both_paths(monkeypatch, lambda: evaluate(trainee, sequences, 3, unused))
    assert chunked["tokens"] == plain["tokens"] and chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for key in ("end_p", "end_top1", "end_unused_mass"):
        assert chunked[key] == pytest.approx(plain[key], rel=1e-6), key


def test_forced_output_layers_use_the_full_logits(converted_models, monkeypatch):
    trainee, _ = prepared(converted_models["it"], turn_rows=False)
    assert tuning.output_matrix(trainee.lm) is trainee.embed.weight
    monkeypatch.setenv(chunked_loss.FULL_LOGITS_ENV, "1")
    assert tuning.output_matrix(trainee.lm) is None
    hidden = mx.random.normal((4, trainee.lm.args.hidden_size))
    losses, lse = tuning.token_losses(trainee, hidden, mx.array([1, 2, 3, 4]))
    assert lse is None and losses.shape == (4,)


@pytest.mark.parametrize("flavour", ["pt", "it"])
def test_a_quantized_output_layer_is_chunked_with_the_full_logits_loss_and_gradients(converted_models, monkeypatch,
                                                                                    flavour):
    """A 4-bit base (QLoRA): the chunked loss multiplies by one chunk of packed rows at a time and gives what the
    full logits through the quantized layer give, turn-token rows included. It never de-quantizes more rows than
    the batch's targets (a chunk de-quantized to float rows made a whole float copy of the table: the backends
    allocate every queued chunk before the first is done)."""
    trainee, tokenizer = prepared(converted_models[flavour], turn_rows=flavour == "pt")
    nn.quantize(trainee.lm.model, group_size=32, bits=4, class_predicate=lambda _, m: isinstance(m, nn.Embedding))
    matrix = tuning.output_matrix(trainee.lm)
    assert isinstance(matrix, chunked_loss.QuantizedRows) and matrix.shape == (trainee.lm.args.vocab_size,
                                                                              trainee.lm.args.hidden_size)
    arrays, _ = batch_arrays(tokenizer, seed=5)
    dequantized = []
    real_dequantize = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda w, *a, **k: dequantized.append(w.shape[0]) or real_dequantize(w, *a, **k))
    (plain_loss, plain), (loss, chunked) = both_paths(monkeypatch, loss_and_gradients(trainee, arrays))
    assert dequantized and max(dequantized) <= arrays[2].size < CHUNK  # gathers of target rows only
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert chunked.keys() == plain.keys() and ("turn_rows" in plain) == (flavour == "pt")
    for name, grad in plain.items():
        np.testing.assert_allclose(np.array(chunked[name]), np.array(grad), rtol=1e-4,
                                   atol=1e-4 * float(mx.abs(grad).max()), err_msg=name)
