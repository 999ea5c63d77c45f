"""`gemma-mlx train` on the tiny Gemma 3 checkpoints: outputs, batching, masking, turn rows, safety."""

import json
import math
import random

import numpy as np
import pytest
from click.testing import CliRunner

import mlx.core as mx
from gemma_mlx.training import batching, trainee as tuning
from gemma_mlx.models import load as load_with_adapters
from gemma_mlx.chat_format import END_OF_TURN_ID, START_OF_TURN_ID, encode
from gemma_mlx.cli import cli
from gemma_mlx.config import LoraSettings, TrainSettings
from gemma_mlx.examples import Example, load_examples
from gemma_mlx.errors import ConfigError, OutputExistsError, TrainingError
from gemma_mlx.train import train_model
from gemma_mlx.training.loop import TrainingCallback

WORDS = ("I reckon we should play a game in the backyard today Hooray my little sister wants to be the "
         "shopkeeper Mum says we can have lunch after and Dad is a big grumpy monster").split()
OTHER_WORDS = "quantum physics tiny things behave strange ways homework story beach friend went home".split()
LORA = LoraSettings(num_layers=4, rank=4)


def write_chat_data(path, count=20, seed=0, words=WORDS):
    """Chat examples with prompts of 3-25 words and replies of 2-45 words (mixed lengths)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
            reply = " ".join(rng.choice(words) for _ in range(rng.randint(2, 45)))
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", count=22)


@pytest.fixture(scope="module")
def pt_run(converted_models, data_file, tmp_path_factory):
    """One short -pt run (turn-token rows on by default) shared by the output tests."""
    out = tmp_path_factory.mktemp("runs") / "pt"
    lines = []
    result = train_model(converted_models["pt"], data_file, out=out, lora=LORA,
                         train=TrainSettings(epochs=4, learning_rate=2e-3, val_generation_tokens=24), progress=lines.append)
    return result, lines


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_mlx_lm_adapters_metrics_summary_and_manifest(pt_run, converted_models, data_file):
    result, lines = pt_run
    out = result.out_dir
    assert result.status == "trained"
    for name in ("adapters.safetensors", "adapter_config.json", "turn_tokens.safetensors", "metrics.jsonl",
                 "summary.json", "loss.svg", "manifest.json", "last/adapters.safetensors", "last/turn_tokens.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "resume_state.json").exists() and not out.with_name("pt.partial").exists()
    summary = result.summary
    # 22 examples -> 18 train + 2 valid + 2 test (left out); nothing dropped: 5 steps per epoch (4+4+4+4+2), every example every epoch
    assert summary["train_examples"] == 18 and summary["valid_examples"] == 2
    assert summary["steps_per_epoch"] == 5 and summary["steps"] == 20
    assert summary["examples_seen"] == 4 * 18
    assert lines[0].startswith("18 examples, 1 epoch = 5 steps of 4 examples, 4 epochs = 20 steps, padding ")
    assert summary["final_loss"] < summary["first_loss"]  # the loss goes down
    valid = [m for m in read_metrics(out) if m["split"] == "valid"]
    assert [m["epoch"] for m in valid] == [1.0, 2.0, 3.0, 4.0]
    assert valid[-1]["loss"] < valid[0]["loss"]
    best = next(m for m in valid if m["step"] == summary["best_step"])
    assert summary["best_val_loss"] == best["loss"] and summary["best_by"] == "score"  # the default
    assert all(m["tokens_per_second"] > 0 and m["peak_memory_gb"] > 0 for m in read_metrics(out))
    assert "<svg" in (out / "loss.svg").read_text() and "validation loss" in (out / "loss.svg").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["flavour"] == "pt"
    assert manifest["base_model"] == str(converted_models["pt"].resolve())
    assert manifest["base_manifest"]["stage"] == "convert" and len(manifest["data_sha256"]) == 64
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 4 and config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0}

    # mlx-lm loads the adapters directory as is
    from mlx_lm import load

    model, _ = load(str(converted_models["pt"]), adapter_path=str(out))
    assert model.layers[-1].self_attn.q_proj.lora_a.shape == (64, 4)

    # the same run again is a no-op; a different one needs force
    again = train_model(converted_models["pt"], data_file, out=out, lora=LORA,
                        train=TrainSettings(epochs=4, learning_rate=2e-3, val_generation_tokens=24))
    assert again.status == "up-to-date" and again.summary == summary
    with pytest.raises(OutputExistsError, match="--force"):
        train_model(converted_models["pt"], data_file, out=out, lora=LORA,
                    train=TrainSettings(epochs=5, learning_rate=2e-3, val_generation_tokens=24))


def test_turn_rows_change_alone_and_end_of_turn_beats_unused_tokens(pt_run, converted_models, data_file):
    from mlx_lm import load

    out = pt_run[0].out_dir
    base, tokenizer = load(str(converted_models["pt"]))
    tuned, _ = load_with_adapters(converted_models["pt"], out)
    before = np.array(base.model.embed_tokens.weight)
    after = np.array(tuned.model.embed_tokens.weight)
    changed = np.nonzero(np.abs(after - before).sum(axis=1))[0].tolist()
    assert changed == [START_OF_TURN_ID, END_OF_TURN_ID]

    # at the end of a training reply the model should now say <end_of_turn>, not an <unusedN>
    example = load_examples(data_file)[0]
    sequence = batching.tokenize_example(tokenizer, example)
    assert sequence.ids[-1] == END_OF_TURN_ID
    probs = mx.softmax(tuned(mx.array([sequence.ids[:-1]]))[0, -1], axis=-1)
    unused = [i for token, i in tokenizer._tokenizer.get_vocab().items() if token.startswith("<unused")]
    assert len(unused) >= 99
    assert probs[END_OF_TURN_ID].item() > max(probs[i].item() for i in unused)


def test_validation_measures_reply_endings_and_keeps_the_best_scored(pt_run):
    out = pt_run[0].out_dir
    valid = [m for m in read_metrics(out) if m["split"] == "valid"]
    for m in valid:
        for key in ("end_p", "end_top1", "end_unused_mass", "gen_clean_rate"):
            assert 0.0 <= m[key] <= 1.0, (key, m)
        assert m["gen_replies"] == 2 and m["gen_clean"] <= m["gen_stops"] <= 2 and m["gen_loops"] <= 2
    # the base model learns to end its turn: p(<end_of_turn>) at the reply ends rises, <unusedN> mass falls
    assert valid[-1]["end_p"] > valid[0]["end_p"]
    assert valid[-1]["end_unused_mass"] < valid[0]["end_unused_mass"]
    # "best" by default = the highest score (clean endings x length fidelity), the later validation on a tie
    top = max(m["gen_score"] for m in valid)
    assert pt_run[0].summary["best_step"] == max(m["step"] for m in valid if m["gen_score"] == top)
    assert any("greedy replies:" in line for line in pt_run[1])


def test_default_lora_layers_fit_a_smaller_model(converted_models, data_file, tmp_path):
    # the default 16 means "16, or all of a smaller model"; an explicit 99 is an error (test below)
    lines = []
    result = train_model(converted_models["it"], data_file, out=tmp_path / "run",
                         train=TrainSettings(epochs=1, val_generation_tokens=0), progress=lines.append)
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["num_layers"] == 6
    assert any("lora on the last 6 layers" in line for line in lines)


def test_header_numbers_read_as_english():
    from gemma_mlx.plot import nice_range
    from gemma_mlx.training.loop import clock, plural

    assert plural(1, "example") == "1 example" and plural(2, "step") == "2 steps"
    assert clock(5) == "0:00:05" and clock(3725.4) == "1:02:05"
    assert nice_range(2.13, 4.61) == (2.0, 5.0, 1.0) and nice_range(3.41, 5.03) == (3.0, 5.5, 0.5)


def test_selection_rule():
    from gemma_mlx.training.loop import is_better, selection_score

    record = {"loss": 2.0, "end_top1": 0.5, "gen_clean_rate": 0.75}
    assert selection_score(record, "stops") == 0.75
    assert selection_score({"loss": 2.0, "end_top1": 0.5}, "stops") == 0.5  # generation off
    assert selection_score(record, "loss") == -2.0
    assert is_better(0.75, 0.75, "stops") and not is_better(0.5, 0.75, "stops")
    assert not is_better(-2.0, -2.0, "loss") and is_better(-1.9, -2.0, "loss") and is_better(0.0, None, "loss")


def test_turn_token_recipe_knobs(converted_models, data_file, tmp_path):
    from mlx_lm import load

    from gemma_mlx.training.setup import make_optimizer

    # eos init: a base model's <end_of_turn> row starts as <eos>'s; <start_of_turn> keeps its own
    lm, tokenizer = load(str(converted_models["pt"]))
    trainee = tuning.prepare(lm, LORA, True, turn_init="eos")
    table = lm.model.embed_tokens.weight
    assert mx.array_equal(trainee.turn_rows[1], table[1]).item()
    assert mx.array_equal(trainee.turn_rows[0], table[START_OF_TURN_ID]).item()

    # the <end_of_turn> loss weight: a weighted mean over the trained positions
    sequence = batching.tokenize_example(tokenizer, load_examples(data_file)[0])
    batch = batching.make_batch([sequence], [0])
    inputs, positions, targets = mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets)
    weights = mx.array(tuning.loss_weights(batch.targets, 5.0))
    plain = tuning.nn.losses.cross_entropy(tuning.trained_logits(trainee, inputs, positions), targets, reduction="none")
    expected = (plain * weights).sum() / weights.sum()
    assert tuning.loss_fn(trainee, inputs, positions, targets, weights)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert int((weights == 5.0).sum().item()) == int((targets == END_OF_TURN_ID).sum().item()) == 1

    # a separate learning rate for the rows: the rows move further in the same steps
    assert type(make_optimizer(TrainSettings(turn_token_lr_scale=10.0), 10, turn_rows=True)).__name__ == "MultiOptimizer"
    moved = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"scale{scale}"
        train_model(converted_models["pt"], data_file, out=out, lora=LoraSettings(num_layers=4, rank=4, turn_token_init="keep"),
                    train=TrainSettings(epochs=1, learning_rate=1e-4, turn_token_lr_scale=scale, val_generation_tokens=0))
        rows = mx.load(str(out / "last" / "turn_tokens.safetensors"))["rows"]
        start = table[mx.array([START_OF_TURN_ID, END_OF_TURN_ID])]
        moved[scale] = mx.abs(rows - start).sum().item()
    assert moved[10.0] > 3 * moved[1.0]


def test_response_only_mask_covers_the_reply_and_end_of_turn(converted_models):
    from mlx_lm import load

    _, tokenizer = load(str(converted_models["it"]))
    example = Example(messages=[{"role": "user", "content": "What should I do today?"},
                                {"role": "assistant", "content": "Let's play a game!"}], text=None, source="x:1")
    sequence = batching.tokenize_example(tokenizer, example)
    trained = [i for i, flag in zip(sequence.ids, sequence.trained) if flag]
    assert trained == encode(tokenizer, "Let's play a game!<end_of_turn>")
    prompt = encode(tokenizer, "<bos><start_of_turn>user\nWhat should I do today?<end_of_turn>\n<start_of_turn>model\n")
    assert sequence.ids[: len(prompt)] == prompt and not any(sequence.trained[: len(prompt)])
    everything = batching.tokenize_example(tokenizer, example, response_only=False)
    assert everything.ids == sequence.ids and all(everything.trained[1:]) and not everything.trained[0]

    batch = batching.make_batch([sequence, everything], [0, 1])
    assert batch.trained_tokens == sequence.trained_tokens + everything.trained_tokens
    assert batch.inputs.shape == (2, len(sequence) - 1)


def test_batches_use_every_example_once_with_less_padding_than_file_order():
    lengths = [random.Random(i).choice([12, 30, 70, 150]) for i in range(23)]
    for epoch in range(3):
        plan = batching.plan_epoch(lengths, 4, seed=0, epoch=epoch)
        assert sorted(i for batch in plan for i in batch) == list(range(23))
        assert sorted(len(b) for b in plan) == [3] + [4] * 5
    assert batching.plan_epoch(lengths, 4, 0, 1) != batching.plan_epoch(lengths, 4, 0, 2)
    bucketed = batching.padding_fraction(lengths, batching.plan_epoch(lengths, 4, 0, 0))
    in_order = batching.padding_fraction(lengths, batching.plan_in_order(len(lengths), 4))
    assert bucketed < in_order / 2


def test_interrupt_then_resume_reaches_the_same_final_loss(converted_models, data_file, tmp_path):
    settings = dict(lora=LoraSettings(num_layers=2, rank=4, dropout=0.1),
                    train=TrainSettings(epochs=2, learning_rate=1e-3, val_every_steps=3, val_generation_tokens=8))
    full = train_model(converted_models["it"], data_file, out=tmp_path / "full", **settings)
    again = train_model(converted_models["it"], data_file, out=tmp_path / "again", **settings)
    losses = [[(m["split"], m["step"], m["loss"]) for m in read_metrics(r.out_dir)] for r in (full, again)]
    assert losses[0] == losses[1]  # same seed, data and settings: the same losses, bit for bit

    class StopAtStep4(TrainingCallback):
        def on_step(self, report):
            if report.step == 4:
                raise KeyboardInterrupt

    out = tmp_path / "resumed"
    lines = []
    stopped = train_model(converted_models["it"], data_file, out=out, callback=StopAtStep4(), progress=lines.append, **settings)
    assert stopped.status == "interrupted" and stopped.out_dir == tmp_path / "resumed.partial"
    assert (stopped.out_dir / "resume_state.json").is_file() and (stopped.out_dir / "last/adapters.safetensors").is_file()
    assert "--resume" in lines[-1]
    with pytest.raises(OutputExistsError, match="--resume"):
        train_model(converted_models["it"], data_file, out=out, **settings)
    changed = dict(settings, train=TrainSettings(epochs=2, learning_rate=5e-4, val_every_steps=3, val_generation_tokens=8))
    with pytest.raises(TrainingError, match="train.learning_rate"):
        train_model(converted_models["it"], data_file, out=out, resume=True, **changed)

    class StopInEpochEndValidation(TrainingCallback):
        def on_validation(self, record):
            if record["step"] == 5:
                raise KeyboardInterrupt

    again = train_model(converted_models["it"], data_file, out=out, resume=True, callback=StopInEpochEndValidation(), **settings)
    assert again.status == "interrupted"
    resumed = train_model(converted_models["it"], data_file, out=out, resume=True, **settings)
    assert resumed.status == "trained" and resumed.out_dir == out
    assert resumed.summary["steps"] == full.summary["steps"] == 10
    assert resumed.summary["final_loss"] == pytest.approx(full.summary["final_loss"], rel=1e-5)
    assert resumed.summary["best_val_loss"] == pytest.approx(full.summary["best_val_loss"], rel=1e-5)
    assert _same_losses(full.out_dir, out)


def _same_losses(a, b):
    losses = [[m["loss"] for m in read_metrics(d)] for d in (a, b)]
    return len(losses[0]) == len(losses[1]) and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0)


def test_best_adapters_are_kept_apart_from_the_last(converted_models, tmp_path):
    # validation replies use other words than training ones, so fitting the training set does not help
    # them for long: the loss goes up within a few epochs (on this machine: 8.30, 8.46, ...), and
    # patience 1 stops at the first rise
    data = tmp_path / "split"
    data.mkdir()
    write_chat_data(data / "train.jsonl", count=12, seed=3)
    write_chat_data(data / "valid.jsonl", count=4, seed=4, words=OTHER_WORDS)
    result = train_model(converted_models["it"], data, out=tmp_path / "run", lora=LoraSettings(num_layers=-1, rank=8),
                         train=TrainSettings(epochs=8, learning_rate=5e-3, lr_schedule="constant",
                                             early_stopping_patience=1, best_by="loss", val_generation_tokens=0))
    summary, out = result.summary, result.out_dir
    assert summary["best_epoch"] < summary["epochs_completed"]  # validation got worse after the best epoch
    assert summary["stopped_early"] and summary["epochs_completed"] < 8
    best = mx.load(str(out / "adapters.safetensors"))
    last = mx.load(str(out / "last/adapters.safetensors"))
    assert any(not mx.array_equal(best[k], last[k]).item() for k in best)

    # the kept best adapters reproduce the best validation loss
    from gemma_mlx.examples import load_splits
    from gemma_mlx.training.loop import evaluate

    model, tokenizer = load_with_adapters(converted_models["it"], out)
    valid = [batching.tokenize_example(tokenizer, e) for e in load_splits(data, seed=0).valid]
    loss = evaluate(tuning.Trainee(model), valid, 4)["loss"]
    assert loss == pytest.approx(summary["best_val_loss"], rel=1e-4)


def test_cli_trains_with_config_and_stops_cleanly_on_nan(converted_models, data_file, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("lora:\n  num_layers: 2\n  rank: 4\ntrain:\n  epochs: 1\n  learning_rate: 1.0e+12\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", str(converted_models["it"]), "--data", str(data_file),
                                 "--config", str(config), "--out", str(tmp_path / "nan")])
    assert result.exit_code == 1, result.output
    assert "became nan" in result.output and "Lower the learning rate" in result.output
    assert "Traceback" not in result.output
    kept = mx.load(str(tmp_path / "nan.partial/last-good/adapters.safetensors"))
    assert all(mx.all(mx.isfinite(v)).item() for v in kept.values())
    # the command it suggests running again never deletes what was saved without --force
    again = runner.invoke(cli, ["train", "--model", str(converted_models["it"]), "--data", str(data_file),
                                "--config", str(config), "--lr", "1e-3", "--out", str(tmp_path / "nan")])
    assert again.exit_code == 1 and "--force" in again.output and "Traceback" not in again.output
    assert (tmp_path / "nan.partial/last-good/adapters.safetensors").is_file()

    result = runner.invoke(cli, ["train", "--model", str(converted_models["it"]), "--data", str(data_file),
                                 "--config", str(config), "--lr", "1e-3", "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"trained\t{tmp_path / 'ok'}"
    summary = json.loads((tmp_path / "ok/summary.json").read_text())
    assert summary["steps"] == 5 and summary["turn_tokens_trained"] is False and math.isfinite(summary["final_loss"])

    result = runner.invoke(cli, ["train", "--model", str(tmp_path / "missing"), "--data", str(data_file)])
    assert result.exit_code == 1 and "gemma-mlx convert" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["train", "--model", str(converted_models["it"]), "--data", str(data_file),
                                 "--num-layers", "99"])
    assert result.exit_code == 1 and "this model has 6 layers" in result.output


def test_fast_gelu_matches_mlx_gelu_approx_and_its_gradient():
    import mlx.nn as nn

    from gemma_mlx.fast_gelu import gelu_approx

    x = mx.linspace(-30, 30, 60001)
    assert mx.abs(gelu_approx(x) - nn.gelu_approx(x)).max().item() < 5e-6
    grad = [mx.grad(lambda z, f=f: f(z).sum())(x) for f in (gelu_approx, nn.gelu_approx)]
    assert mx.abs(grad[0] - grad[1]).max().item() < 2e-5


@pytest.mark.parametrize("fine_tune_type,expected", [("dora", "model.layers.5.self_attn.q_proj.m"),
                                                     ("full", "model.layers.5.mlp.up_proj.weight")])
def test_dora_and_full_fine_tuning_save_adapters_mlx_lm_loads(converted_models, data_file, tmp_path, fine_tune_type, expected):
    from mlx_lm import load

    result = train_model(converted_models["pt"], data_file, out=tmp_path / fine_tune_type,
                         lora=LoraSettings(fine_tune_type=fine_tune_type, num_layers=1, rank=4),
                         train=TrainSettings(epochs=1, learning_rate=1e-4, grad_checkpoint=True))
    saved = mx.load(str(result.out_dir / "adapters.safetensors"))
    assert expected in saved and all(k.startswith("model.layers.5.") for k in saved)
    model, _ = load(str(converted_models["pt"]), adapter_path=str(result.out_dir))
    assert mx.array_equal(model.parameters()["model"]["layers"][5]["mlp"]["up_proj"]["weight"] if fine_tune_type == "full"
                          else model.layers[5].self_attn.q_proj.m, saved[expected]).item()
    assert math.isfinite(result.summary["final_loss"])


def test_outputs_never_replace_inputs_or_files_and_a_failed_start_leaves_nothing(converted_models, data_file, tmp_path):
    model = converted_models["it"]
    for out in (model, model.parent, data_file):  # even with force: the run would delete what it reads
        with pytest.raises(OutputExistsError, match="would replace it"):
            train_model(model, data_file, out=out, lora=LORA, force=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(OutputExistsError, match="is a file"):
        train_model(model, data_file, out=a_file, lora=LORA, force=True)
    assert a_file.read_text() == "keep me"
    with pytest.raises(ConfigError, match="warmup_steps is -1"):
        train_model(model, data_file, out=tmp_path / "run", lora=LORA, train=TrainSettings(warmup_steps=-1))
    # a setting only the loaded model can refuse: no empty <out>.partial is left to be "discarded" next time
    with pytest.raises(TrainingError, match="this model has 6 layers"):
        train_model(model, data_file, out=tmp_path / "run", lora=LoraSettings(num_layers=99))
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run").exists()


def test_a_split_folder_with_another_data_file_is_refused_not_half_read(converted_models, tmp_path):
    """A folder with train.jsonl is read as split; a further JSONL there would be left out of training
    without a word, so training refuses and says what to do."""
    from gemma_mlx.errors import DataError

    folder = tmp_path / "mine"
    folder.mkdir()
    write_chat_data(folder / "train.jsonl", count=8)
    write_chat_data(folder / "valid.jsonl", count=2, seed=1)
    write_chat_data(folder / "more-conversations.jsonl", count=6, seed=2)
    with pytest.raises(DataError, match=r"holds train.jsonl, so it is read as already split.*more-conversations.jsonl "
                                         r"would be left out of training"):
        train_model(converted_models["pt"], folder, out=tmp_path / "out", lora=LORA, train=TrainSettings(epochs=1))
    assert not (tmp_path / "out").exists()


def test_training_without_validation_examples_warns(converted_models, tmp_path):
    folder = tmp_path / "only-train"
    folder.mkdir()
    write_chat_data(folder / "train.jsonl", count=6)
    lines = []
    train_model(converted_models["pt"], folder, out=tmp_path / "out", lora=LORA, progress=lines.append,
                train=TrainSettings(epochs=1, val_generation_tokens=0))
    assert lines[0].startswith("6 examples, 1 epoch = 2 steps of 4 examples, padding ")  # one epoch: not said twice
    assert any("0 validation examples" in line for line in lines)
    assert any(line.startswith("warning: no validation examples, so nothing chooses between epochs") for line in lines)
    assert any(line.startswith("warning: only 6 training examples; a persona is learned from dozens") for line in lines)
    lines = []
    train_model(converted_models["pt"], folder, out=tmp_path / "warm", lora=LORA, progress=lines.append,
                train=TrainSettings(epochs=1, val_generation_tokens=0, warmup_steps=100))
    assert any(line.startswith("warning: warmup_steps 100 is not shorter than the run (2 steps)") for line in lines)
