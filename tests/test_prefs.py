"""`gemma-mlx prefs`: the scorecard's ranking, and pairs from a tiny persona's own samples that train reads."""

import json
import pytest

from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.config import LoraSettings, TrainSettings
from gemma_mlx import prefs
from gemma_mlx.prefs import pick_pair, rank_reply, rule_text
from gemma_mlx.train import train_model
from gemma_mlx.training.pairs import read_pairs

from .test_train import write_chat_data

MARKERS = ["hooray", "for real life"]
TEN = "We played shops in the backyard and my sister was the boss today."  # 13 words


def test_the_ranking_is_the_scorecards():
    prompt = "What did you do today?"
    clean_marker = rank_reply(prompt, TEN + " Hooray!", "stop", 12, MARKERS, None)
    clean = rank_reply(prompt, TEN, "stop", 12, MARKERS, None)
    too_short = rank_reply(prompt, "Shops.", "stop", 12, MARKERS, None)
    cut = rank_reply(prompt, TEN + " And then we", "length", 12, MARKERS, None)
    looping = rank_reply(prompt, "we played and " * 12, "length", 12, MARKERS, None)
    ranked = [cut, clean, looping, too_short, clean_marker]
    assert sorted(ranked, key=lambda r: r.key) == [looping, cut, too_short, clean, clean_marker]
    best, worst = pick_pair(ranked)
    assert (best, worst) == (clean_marker, looping)
    assert "clean" in best.why and "markers: hooray" in best.why and "loops" in worst.why
    # inside the band the on-topic score decides; an echo of the prompt gets no credit for its score
    on = rank_reply(prompt, TEN, "stop", 12, [], 0.9)
    off = rank_reply(prompt, "My hair is wet and my ears are full of it today.", "stop", 12, [], 0.1)
    echo = rank_reply(prompt, "What did you do today? What did you do today?", "stop", 12, [], 2.0)
    assert on.key > off.key > echo.key
    assert pick_pair([clean, rank_reply(prompt, TEN, "stop", 12, MARKERS, None)]) is None  # nothing to prefer
    assert "3. has a voice marker" in rule_text(12, True, True) and "12 words" in rule_text(12, True, True)


def test_pairs_from_a_personas_samples_are_written_editable_and_train_reads_them(converted_models, tmp_path):
    data = write_chat_data(tmp_path / "chat.jsonl", count=12)
    persona = tmp_path / "sft"
    train_model(converted_models["it"], data, out=persona, lora=LoraSettings(num_layers=2, rank=4),
                train=TrainSettings(epochs=1, learning_rate=2e-3, val_generation_tokens=0))
    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(cli, ["prefs", str(persona), "--data", str(data), "--out", str(out), "-k", "3",
                                      "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "best = chosen, worst = rejected, ranked by: 1. ends by itself" in result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = read_pairs(out)
    assert records and len(pairs) == len(records) <= 10  # at most one pair per training prompt (80% of 12)
    assert all(r["chosen"] != r["rejected"] and r["chosen_why"] and r["rejected_why"] for r in records)
    training_prompts = {json.loads(line)["messages"][0]["content"] for line in data.read_text().splitlines()}
    assert {p.prompt for p in pairs} <= training_prompts

    samples = [json.loads(line) for line in (tmp_path / "prefs.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * len(prefs.training_prompts(data, "train", 0)[0])  # -k 3, every training prompt
    by_prompt = {}
    for sample in samples:
        by_prompt.setdefault(sample["prompt"], []).append(sample)
    assert all([s["rank"] for s in ranked] == [1, 2, 3] for ranked in by_prompt.values())  # every sample, best first
    for record in records:  # the pair is the best and the worst of its prompt's samples
        ranked = by_prompt[record["prompt"]]
        assert (ranked[0]["reply"], ranked[0]["pair"], ranked[0]["why"]) == (record["chosen"], "chosen",
                                                                              record["chosen_why"])
        assert (ranked[-1]["reply"], ranked[-1]["pair"]) == (record["rejected"], "rejected")
    assert sum(bool(s["pair"]) for s in samples) == 2 * len(records)
    assert "samples, ranked, in" in result.output

    before = out.read_text()
    again = CliRunner().invoke(cli, ["prefs", str(persona), "--data", str(data), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output and out.read_text() == before  # an edited file is kept
    moved = tmp_path / "edited.jsonl"
    out.rename(moved)  # the pairs moved away, their samples still there: not replaced either
    again = CliRunner().invoke(cli, ["prefs", str(persona), "--data", str(data), "--out", str(out)])
    assert again.exit_code == 1 and "prefs.samples.jsonl exists" in again.output and not out.exists()
    moved.rename(out)

    trained = CliRunner().invoke(cli, ["train", "--model", str(persona), "--preferences", str(out), "--out",
                                       str(tmp_path / "dpo"), "--epochs", "1", "--val-generation-tokens", "0"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "dpo" / "adapters.safetensors").is_file()


def test_prefs_refuses_outputs_that_would_touch_its_data_and_a_missing_split_before_any_sampling(tmp_path, monkeypatch):
    """The pairs never replace the data or land in its folder (where every JSONL is read as examples),
    --out is a file name, and a split with no prompts is an error: all before a model loads."""
    from gemma_mlx.errors import DataError, OutputExistsError

    monkeypatch.setattr("gemma_mlx.models.load_model", lambda *a, **k: pytest.fail("no model should load"))
    folder = tmp_path / "data"
    folder.mkdir()
    data = write_chat_data(folder / "train.jsonl", count=8)
    before = data.read_bytes()
    for given, out, force, message in ((data, data, True, "is the data"), (folder, data, True, "inside the data folder"),
                                       (folder, folder / "prefs.jsonl", False, "inside the data folder"),
                                       (folder, tmp_path, True, "is a folder")):
        with pytest.raises(OutputExistsError, match=message):
            prefs.make_prefs("unused", given, out, force=force)
    assert data.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["train.jsonl"]
    with pytest.raises(DataError, match="has no valid prompts to sample"):
        prefs.make_prefs("unused", folder, tmp_path / "pairs.jsonl", split="valid")
    assert not (tmp_path / "pairs.jsonl").exists()
