"""Training asks the model's family which rows are its turn tokens and which token ends a reply.

A base model trains its turn-token rows (trainee.py); the loss can weigh the reply end more and
validation measures p(reply end). All three must be the model's family's tokens, never the default
family's: a tiny Gemma 4 base trains <|turn>/<turn|>, and a family whose ids differ from Gemma 3's
gets its own ids (a made-up family, so the test fails if any code path falls back to 105/106).
"""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.config import LoraSettings, TrainSettings
from gemma_mlx.families import DEFAULT, GEMMA4
from gemma_mlx.tiny import write_tiny_gemma4_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data" / "bluey"
LORA = LoraSettings(num_layers=2, rank=4)
# A family with the turn tokens and <eos> at ids no real family uses: ordinary tokens of the tiny vocabulary.
ELSEWHERE = dataclasses.replace(GEMMA4, name="elsewhere", turn_start_id=300, turn_end_id=301, eos_id=7)


@pytest.fixture(scope="module")
def gemma4_base(tmp_path_factory):
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gemma4-base")
    hf = write_tiny_gemma4_checkpoint(root / "tiny-gemma-4-pt", "pt", seed=3)
    return convert_checkpoint(str(hf), out=root / "mlx", dtype="float32").path


def test_prepare_trains_the_familys_rows_and_measures_its_reply_end(gemma4_base):
    from mlx_lm import load

    from gemma_mlx.training import trainee as tuning

    assert (ELSEWHERE.turn_start_id, ELSEWHERE.turn_end_id) != DEFAULT.turn_token_ids
    lm, _ = load(str(gemma4_base))
    table = lm.model.embed_tokens.weight
    trainee = tuning.prepare(lm, LORA, True, turn_init="eos", family=ELSEWHERE)
    assert trainee.turn_ids == (300, 301) and trainee.end_id == 301
    assert mx.array_equal(trainee.turn_rows[0], table[300]).item()  # the turn start keeps its own row
    assert mx.array_equal(trainee.turn_rows[1], table[7]).item()  # the turn end starts as the family's <eos>

    targets = np.array([5, 301, 106, 9, 301])
    assert tuning.loss_weights(targets, 4.0, ELSEWHERE.turn_end_id).tolist() == [1, 4, 1, 1, 4]

    # validation's p(reply end) is the probability of the family's turn end at the reply ends
    inputs = mx.array([[2, 300, 40, 41, 42, 301]])
    positions, targets = mx.array([2, 3, 4]), mx.array([41, 42, 301])
    sums = tuning.validation_sums(trainee, inputs, positions, targets, mx.array([2]), mx.array([], dtype=mx.int32))
    logits = tuning.trained_logits(trainee, inputs, positions)[2]
    expected = mx.softmax(logits)[301].item()
    assert sums["end_p"].item() == pytest.approx(expected, rel=1e-4)
    assert sums["end_top1"].item() == int(mx.argmax(logits).item() == 301)


def test_supervised_parts_takes_the_family_of_the_tokenizer(gemma4_base, tmp_path, monkeypatch):
    """The SFT objective and its trainee get the family the data is written in (the tokenizer's)."""
    from gemma_mlx.training import sft
    from gemma_mlx.training.setup import RunSetup

    def setup(flavour="pt"):
        return RunSetup(model_dir=gemma4_base, base_manifest=None, flavour=flavour, turn_tokens=True, data=DATA,
                        data_sha256="", lora=LORA, train=TrainSettings(max_seq_length=96), out=tmp_path / "out",
                        identity={})

    parts = sft.supervised_parts(setup(), lambda line: None)
    assert parts.objective.family is GEMMA4
    assert parts.trainee.turn_ids == GEMMA4.turn_token_ids and parts.trainee.end_id == GEMMA4.turn_end_id

    monkeypatch.setattr(sft, "family_of_tokenizer", lambda tokenizer: ELSEWHERE)
    parts = sft.supervised_parts(setup(), lambda line: None)
    assert parts.trainee.turn_ids == (300, 301) and parts.objective.family is ELSEWHERE
    batch = parts.objective.batch([0, 1])
    parts.objective.weight = 3.0  # the reply end weighs 3: the normalizer counts this family's turn ends
    ends = int((batch.targets == 301).sum())
    assert int((batch.targets == GEMMA4.turn_end_id).sum()) == 2  # the data's reply ends (<turn|>) are not counted
    assert parts.objective.normalizer(batch) == pytest.approx(batch.trained_tokens + 2.0 * ends)
    batch.targets[batch.targets == GEMMA4.turn_end_id] = 301
    assert parts.objective.normalizer(batch) == pytest.approx(batch.trained_tokens + 2.0 * (ends + 2))

def test_gemma4_base_trains_its_own_turn_rows(gemma4_base, tmp_path):
    """Through `train`: the saved rows are the tokenizer's <|turn> and <turn|>, and validation names <turn|>."""
    from tokenizers import Tokenizer

    out = tmp_path / "adapters"
    result = CliRunner().invoke(cli, ["train", "--model", str(gemma4_base), "--data", str(DATA), "--epochs", "1",
                                      "--out", str(out), "--batch-size", "16", "--val-generation-tokens", "0",
                                      "--max-seq-length", "96"])
    assert result.exit_code == 0, result.output
    assert "p(<turn|>)" in result.output and "p(<end_of_turn>)" not in result.output
    tokenizer = Tokenizer.from_file(str(gemma4_base / "tokenizer.json"))
    saved = mx.load(str(out / "turn_tokens.safetensors"))
    expected = [tokenizer.token_to_id(GEMMA4.turn_start), tokenizer.token_to_id(GEMMA4.turn_end)]
    assert saved["ids"].tolist() == expected == list(GEMMA4.turn_token_ids)
    table = mx.load(str(gemma4_base / "model.safetensors"))["model.embed_tokens.weight"]
    assert not mx.allclose(saved["rows"], table[mx.array(expected)].astype(mx.float32)).item()  # they trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("turn_tokens_file") == "turn_tokens.safetensors"
