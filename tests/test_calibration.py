"""Length calibration (issue 19): the reply-end logit shifted, through the turn-end row, until greedy validation
replies are as long as the validation replies; the shift lives in the adapters, so fusing and exports carry it."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.adapters import TURN_TOKENS_FILE
from gemma_mlx.config import TrainSettings, check_settings
from gemma_mlx.errors import ConfigError
from gemma_mlx.train import train_model
from gemma_mlx.training import calibration
from gemma_mlx.training.calibration import MAX_TRIALS, TOLERANCE, Trial, choose_shift

from .test_train import LORA, write_chat_data


def fake_trials(words_at_zero=40.0, rate=0.3, clean=16, lose_clean_below=None, cap=None):
    """A persona whose greedy replies lengthen smoothly as the end gets less likely (words = w0 exp(-rate shift)),
    optionally losing a clean ending past some shift, or never longer than `cap` words."""
    seen = []

    def trial(shift):
        words = words_at_zero * math.exp(-rate * shift)
        words = min(words, cap) if cap else words
        lost = lose_clean_below is not None and shift < lose_clean_below
        seen.append(shift)
        return Trial(shift, words, clean - lost, 0, 16)

    return trial, seen


def test_the_shift_brings_the_replies_to_the_target_length_in_few_decodes():
    trial, seen = fake_trials()
    shift, trials = choose_shift(trial, target=60.0)
    picked = next(t for t in trials if t.shift == shift)
    assert seen[0] == 0.0 and len(seen) <= MAX_TRIALS
    assert shift < 0 and abs(picked.mean_words / 60.0 - 1) <= 0.1  # exact answer -1.35: 58.3 words at -1.25
    assert abs(shift - (-math.log(1.5) / 0.3)) < 0.5


def test_too_long_replies_get_a_likelier_end_and_a_close_one_is_left_alone():
    trial, _ = fake_trials(words_at_zero=40.0)
    shift, _ = choose_shift(trial, target=25.0)
    assert shift > 0
    trial, seen = fake_trials(words_at_zero=40.0)
    shift, trials = choose_shift(trial, target=40.0 * (1 + TOLERANCE / 2))
    assert shift == 0.0 and seen == [0.0] and len(trials) == 1


def test_a_shift_that_loses_a_clean_ending_is_never_kept():
    trial, seen = fake_trials(lose_clean_below=-1.0)  # from -1 on, one reply of 16 no longer ends cleanly
    shift, trials = choose_shift(trial, target=80.0)  # would need -2.3
    assert shift >= -1.0 and any(s < -1.0 for s in seen)  # tried further, kept the furthest clean one
    assert all(t.clean == 16 for t in trials if t.shift == shift)


def test_an_unreachable_length_stops_at_the_limit_with_the_nearest_shift():
    trial, seen = fake_trials(cap=50.0)
    shift, trials = choose_shift(trial, target=90.0)
    assert min(seen) == -calibration.LIMIT and len(seen) <= MAX_TRIALS
    assert next(t for t in trials if t.shift == shift).mean_words == 50.0 and shift == -2.0  # the nearest, the smallest shift


def test_the_direction_moves_the_logit_by_one_unit_at_the_hidden_states():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=64) * 3  # hidden states share a strong common direction, as Gemma's do
    hidden = mean + rng.normal(size=(500, 64))
    moved = hidden @ calibration.direction(hidden)
    assert abs(moved.mean() - 1) < 0.05 and moved.std() < 0.1


def test_calibrate_length_is_a_checked_setting():
    check_settings(TrainSettings(calibrate_length=False))
    with pytest.raises(ConfigError, match="train.calibrate_length"):
        check_settings(TrainSettings(calibrate_length="yes"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", count=22)


def end_row(path, end_id=106):
    saved = mx.load(str(path / TURN_TOKENS_FILE))
    ids = saved["ids"].tolist()
    return np.asarray(saved["rows"][ids.index(end_id)]), saved


def test_training_calibrates_the_kept_adapters_and_a_second_calibration_starts_from_the_same_row(
        converted_models, data_file, tmp_path):
    from gemma_mlx.generate import load_model

    lines = []
    settings = TrainSettings(epochs=2, learning_rate=2e-3, val_generation_tokens=24)
    result = train_model(converted_models["pt"], data_file, out=tmp_path / "run", lora=LORA, train=settings,
                         progress=lines.append)
    summary = json.loads((result.out_dir / "summary.json").read_text())
    done = summary["length_calibration"]
    assert done["target_words"] == summary["train_reply_words"] and 1 <= len(done["trials"]) <= MAX_TRIALS
    picked = next(t for t in done["trials"] if t["shift"] == done["shift"])
    assert done["words_after"] == picked["mean_words"] and picked["clean"] >= done["trials"][0]["clean"]
    assert any(line.startswith("length calibration: reply-end logit shifted by") for line in lines)
    # the row in the adapters is the uncalibrated one plus shift x direction, and loading the adapters gives it
    row, saved = end_row(result.out_dir)
    shift, direction = saved[calibration.SHIFT_KEY].item(), np.asarray(saved[calibration.DIRECTION_KEY])
    assert shift == pytest.approx(done["shift"])
    loaded = load_model(converted_models["pt"], adapter_path=result.out_dir)
    assert np.array_equal(np.asarray(loaded.model.model.embed_tokens.weight[106]), row)
    # calibrating again undoes the stored shift first: the same decodes, the same row
    again = calibration.calibrate_adapters(converted_models["pt"], result.out_dir, _valid(result.out_dir),
                                           done["target_words"], 24)
    assert again["shift"] == done["shift"] and again["words_before"] == done["words_before"]
    assert np.allclose(end_row(result.out_dir)[0], row, atol=1e-6)
    # the last/ adapters are the final weights as trained: not calibrated
    assert calibration.SHIFT_KEY not in mx.load(str(result.out_dir / "last" / TURN_TOKENS_FILE))


def _valid(run_dir):
    """The validation conversations the run answered (its data split, as train.calibrate_length reads it)."""
    from gemma_mlx.examples import load_splits
    from gemma_mlx.training.sft import VALIDATION_PROMPTS

    manifest = json.loads((run_dir / "manifest.json").read_text())
    splits = load_splits(manifest["data"], seed=manifest["settings"]["train"]["seed"])
    return [e.messages for e in splits.valid if e.messages][:VALIDATION_PROMPTS]


def test_calibration_off_leaves_the_adapters_as_trained(converted_models, data_file, tmp_path):
    settings = TrainSettings(epochs=1, learning_rate=2e-3, val_generation_tokens=24, calibrate_length=False)
    result = train_model(converted_models["pt"], data_file, out=tmp_path / "run", lora=LORA, train=settings)
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert "length_calibration" not in summary
    assert calibration.SHIFT_KEY not in mx.load(str(result.out_dir / TURN_TOKENS_FILE))


def test_the_turn_end_row_of_a_quantized_base_is_read_de_quantized():
    import mlx.nn as nn

    plain = nn.Embedding(300, 64)
    quantized = nn.QuantizedEmbedding.from_embedding(plain, group_size=32, bits=4)
    row = calibration.embedding_row(quantized, 106)
    whole = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, 32, 4)
    assert row.shape == (64,) and np.allclose(row, np.asarray(whole[106]), atol=1e-6)
    assert np.abs(row - np.asarray(plain.weight[106])).max() < 0.1  # 4-bit rounding of the float row
    assert np.array_equal(calibration.embedding_row(plain, 106), np.asarray(plain.weight[106]).astype(np.float64))
