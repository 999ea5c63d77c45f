"""Which validation's adapters are kept (issue 19, part 3): `best_by: score` (clean endings x length fidelity,
selection.checkpoint_score), the per-validation table in summary.json, and the kept epoch on the loss chart."""

import json
import math

import pytest

from gemma_mlx.config import TrainSettings, check_settings
from gemma_mlx.errors import ConfigError
from gemma_mlx.examples import load_examples
from gemma_mlx.selection import checkpoint_score
from gemma_mlx.text import word_count
from gemma_mlx.train import train_model
from gemma_mlx.training.loop import is_better, selection_score

from .test_train import LORA, write_chat_data


def kept_epoch(records: list[dict], best_by: str) -> float:
    """The epoch the loop keeps for these validation records, by its own rule (score, then is_better)."""
    best = kept = None
    for record in records:
        score = selection_score(record, best_by)
        if is_better(score, best, best_by):
            best, kept = score, record["epoch"]
    return kept


def validation(epoch, clean, replies, words, reference, loss):
    return {"epoch": epoch, "loss": loss, "gen_clean_rate": clean / replies, "gen_mean_words": words,
            "gen_score": checkpoint_score(clean / replies, words, reference)}


def test_score_tells_short_clean_replies_from_ones_of_the_persona_length():
    # issue 19's real run, in shape: every validation ends (nearly) all replies cleanly, but early
    # epochs answer in 8 words when the validation replies have 40; "stops" cannot see that.
    records = [validation(1, 2, 10, 60, 40, 3.4), validation(2, 10, 10, 8, 40, 3.6), validation(3, 9, 10, 36, 40, 3.9),
               validation(4, 10, 10, 20, 40, 4.1)]
    assert kept_epoch(records, "stops") == 4  # the most clean endings, the later on a tie: 20 words, half the persona's
    assert kept_epoch(records, "score") == 3  # 9 of 10 clean at 36 words: 0.81, against 10 of 10 at 20 words: 0.5
    assert kept_epoch(records, "loss") == 1  # the lowest loss: the epoch whose replies mostly loop or run on


def test_score_falls_back_without_greedy_replies():
    assert selection_score({"loss": 2.0, "end_top1": 0.4}, "score") == 0.4  # generation off: what stops uses
    assert selection_score({"loss": 2.0, "gen_clean_rate": 0.5, "gen_score": None}, "score") == 0.5
    assert selection_score({"loss": 2.0, "gen_clean_rate": 0.5, "gen_score": 0.3}, "score") == 0.3


def test_best_by_accepts_score_and_names_the_choices():
    check_settings(TrainSettings(best_by="score"))
    with pytest.raises(ConfigError, match="train.best_by is 'words'.*stops, score or loss"):
        check_settings(TrainSettings(best_by="words"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", count=22)


def train(converted_models, data_file, out, best_by):
    lines = []
    result = train_model(converted_models["pt"], data_file, out=out, lora=LORA,
                         train=TrainSettings(epochs=3, learning_rate=2e-3, val_generation_tokens=24, best_by=best_by),
                         progress=lines.append)
    return result, lines


def test_a_score_run_keeps_the_best_scored_validation_and_writes_its_table(converted_models, data_file, tmp_path):
    result, lines = train(converted_models, data_file, tmp_path / "score", "score")
    summary = json.loads((result.out_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [m for m in metrics if m["split"] == "valid"]
    # the persona's length and the validation replies' own, from the data
    examples = load_examples(data_file)
    train_words = summary["train_reply_words"]
    assert min(word_count(e.reply) for e in examples) < train_words < max(word_count(e.reply) for e in examples)
    reference = summary["valid_reply_words"]
    assert reference and reference > 0
    # every validation's score is the documented product, and the kept one has the highest (the later on a tie)
    for m in valid:
        assert m["gen_score"] == pytest.approx(checkpoint_score(m["gen_clean_rate"], m["gen_mean_words"], reference), abs=1e-4)
        assert m["gen_words_vs_valid"] == pytest.approx(m["gen_mean_words"] / reference, abs=1e-4)
    best = max(m["gen_score"] for m in valid)
    kept = [m for m in valid if m["gen_score"] == best][-1]
    assert summary["best_by"] == "score" and summary["best_score"] == pytest.approx(best)
    assert summary["best_epoch"] == kept["epoch"] and summary["best_step"] == kept["step"]
    # the table: one row per validation, the kept one marked
    table = summary["validations"]
    assert [(r["epoch"], r["step"]) for r in table] == [(m["epoch"], m["step"]) for m in valid]
    assert [r["kept"] for r in table].count(True) == 1 and next(r for r in table if r["kept"])["step"] == kept["step"]
    for row, m in zip(table, valid):
        assert (row["clean"], row["replies"], row["loss"], row["score"]) == (m["gen_clean"], m["gen_replies"], m["loss"], m["gen_score"])
        assert 0 <= row["clean_rate"] <= 1 and row["mean_words"] >= 0 and not math.isnan(row["words_vs_valid"])
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["summary"]["validations"] == table and manifest["summary"]["train_reply_words"] == train_words
    # the run says the table and why it kept what it kept; the chart marks the kept epoch
    assert any(line.startswith("epoch  clean   words  vs valid  score  loss") for line in lines)
    assert sum(line.endswith("<- kept") for line in lines) == 1
    assert any("highest score: clean endings x length fidelity" in line for line in lines)
    assert any(", score " in line and "x the validation replies'" in line for line in lines)
    svg = (result.out_dir / "loss.svg").read_text()
    assert f"kept: epoch {kept['epoch']:g}" in svg


def test_stops_and_score_on_the_tiny_model(converted_models, data_file, tmp_path):
    """The same run under both rules: score never keeps a validation with fewer clean endings *and* a length
    further from the validation replies' than the one stops keeps (it can only trade one for the other)."""
    kept = {}
    for best_by in ("stops", "score"):
        result, _ = train(converted_models, data_file, tmp_path / best_by, best_by)
        summary = json.loads((result.out_dir / "summary.json").read_text())
        kept[best_by] = next(r for r in summary["validations"] if r["kept"])
    stops, score = kept["stops"], kept["score"]
    assert stops["clean"] == max(r["clean"] for r in summary["validations"])  # same data, same seeds: same table
    assert score["score"] >= stops["score"]
    assert not (score["clean"] < stops["clean"] and abs(math.log(score["words_vs_valid"] or 1))
                > abs(math.log(stops["words_vs_valid"] or 1)))


def test_on_topic_joins_the_score_scored_with_the_lora_off(converted_models, data_file, tmp_path):
    """A scorer passed in (the CLI passes scoring.best_of.on_topic_flags) scores the greedy validation replies
    with every LoRA scale at 0 (the base model), and its share multiplies the score; the scales come back."""
    seen = []

    def on_topic(model, tokenizer, pairs):
        scales = [m.scale for _, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
        seen.append((scales, pairs))
        return [i % 2 == 0 for i in range(len(pairs))]  # every other reply on topic

    out = tmp_path / "topic"
    result = train_model(converted_models["pt"], data_file, out=out, lora=LORA, on_topic=on_topic,
                         train=TrainSettings(epochs=2, learning_rate=2e-3, val_generation_tokens=16, best_by="score"))
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert len(seen) == 2 and all(scales and set(scales) == {0.0} for scales, _ in seen)
    assert all(message and isinstance(reply, str) for _, pairs in seen for message, reply in pairs)
    adapter_scale = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    assert adapter_scale == LORA.scale  # put back after scoring
    assert summary["on_topic_in_score"] is True
    for row in summary["validations"]:
        share = math.ceil(row["replies"] / 2) / row["replies"]
        assert row["on_topic_rate"] == share
        expected = checkpoint_score(row["clean_rate"], row["mean_words"], summary["valid_reply_words"], share)
        assert row["score"] == pytest.approx(expected, abs=1e-4)
    # best_by stops never runs the scorer
    seen.clear()
    train_model(converted_models["pt"], data_file, out=tmp_path / "stops", lora=LORA, on_topic=on_topic,
                train=TrainSettings(epochs=1, learning_rate=2e-3, val_generation_tokens=16, best_by="stops"))
    assert seen == []


def test_cli_train_best_by_score_measures_on_topic(converted_models, data_file, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["train", "--model", str(converted_models["pt"]), "--data", str(data_file),
                                      "--out", str(out), "--epochs", "1", "--num-layers", "4", "--rank", "4",
                                      "--val-generation-tokens", "12", "--best-by", "score"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_by"] == "score" and summary["on_topic_in_score"] is True
    row = summary["validations"][0]
    assert 0 <= row["on_topic_rate"] <= 1 and row["kept"]
    assert "on topic" in result.output and "x on topic" in result.output


def test_the_persona_length_leaves_out_replies_cut_at_max_seq_length(converted_models, tmp_path):
    """One 3,000-word reply trained as its first 128 tokens must not make the persona's length (the
    best-of and calibration target) hundreds of words."""
    data = write_chat_data(tmp_path / "chat.jsonl", count=22)
    normal = load_examples(data)
    long_record = {"messages": [{"role": "user", "content": "Tell me everything."},
                                {"role": "assistant", "content": " ".join(["aye"] * 3000)}]}
    with open(data, "a") as handle:
        handle.write(json.dumps(long_record) + "\n")
    lines = []
    result = train_model(converted_models["pt"], data, out=tmp_path / "out", lora=LORA, progress=lines.append,
                         train=TrainSettings(epochs=1, val_generation_tokens=0, max_seq_length=128, calibrate_length=False))
    summary = json.loads((result.out_dir / "summary.json").read_text())
    kept = [word_count(e.reply) for e in normal]
    assert summary["train_reply_words"] < max(kept)  # not pulled toward 3,000
    assert any("was cut" in line and "max_seq_length 128" in line for line in lines)


def test_without_greedy_replies_the_kept_epoch_is_said_by_what_ranked_it(converted_models, data_file, tmp_path):
    lines = []
    from gemma_mlx.scoring.best_of import on_topic_flags

    result = train_model(converted_models["pt"], data_file, out=tmp_path / "out", lora=LORA, progress=lines.append,
                         train=TrainSettings(epochs=2, learning_rate=2e-3, val_generation_tokens=0),
                         on_topic=on_topic_flags)  # as the CLI passes it
    done = next(line for line in lines if line.startswith("done: kept the adapters"))
    assert "no greedy validation replies" in done and "clean endings x length fidelity" not in done
    assert result.summary["on_topic_in_score"] is False
