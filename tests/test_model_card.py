"""The one model card: the fused dir, the Hugging Face export and the GGUF export name the base, the data,
the recipe and the licence, and the run's scorecard when there is one."""

import json

import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
from gemma_mlx.cli import cli
from gemma_mlx.model_card import card_text, run_records
from gemma_mlx.manifest import write_manifest

TRAIN = {
    "stage": "train",
    "data": "/data/bluey/conversations.jsonl",
    "base_manifest": {"stage": "convert", "name": "gemma-3-270m", "flavour": "pt",
                      "source": {"spec": "gemma-3-270m", "hub_id": "google/gemma-3-270m"}},
    "settings": {"lora": {"fine_tune_type": "lora", "rank": 8}, "train": {"epochs": 5, "batch_size": 4, "learning_rate": 1e-4}},
    "summary": {"train_examples": 133, "best_epoch": 3, "best_by": "clean endings", "best_val_loss": 3.3,
                "turn_tokens_trained": True},
}


def assert_names_base_data_recipe_licence(card: str, base: str, data: str):
    assert card.startswith("---\nlicense: gemma\n")  # the hub reads the licence from the front matter
    assert f"- base model: `{base}`" in card
    assert f"- data: `{data}`" in card and "training conversations" in card
    assert "- recipe: lora rank " in card and (" epochs, batch " in card or " epoch, batch " in card) and "- kept: epoch " in card
    assert "## Licence" in card and "Gemma Terms of Use" in card


def test_card_from_records_names_everything_and_the_scorecard_when_known(tmp_path):
    card = card_text("bluey", tmp_path, {"train": TRAIN}, "A test model.", ["gemma-mlx chat x"], library="mlx")
    assert_names_base_data_recipe_licence(card, "google/gemma-3-270m", "/data/bluey/conversations.jsonl")
    assert "base_model: google/gemma-3-270m" in card and "library_name: mlx" in card
    assert "133 training conversations" in card and "rank 8, 5 epochs, batch 4" in card
    assert "epoch 3 (chosen by clean endings)" in card
    assert "Not compared yet" in card and "tags: [gemma3, lora, persona, gemma-mlx]" in card

    plain = card_text("base", tmp_path, {}, "A converted model.", [], library="mlx", fallback="gemma-3-270m")
    assert "not fine-tuned by gemma-mlx" in plain and "tags: [gemma3, gemma-mlx]" in plain and "- recipe" not in plain

    scored = {"train": TRAIN, "scorecard_model": "bluey-fused",
              "scorecard": {"replies": 16, "stop_rate": 0.75, "cut_rate": 0.25, "loop_rate": None, "mean_words": 31.5}}
    card = card_text("bluey", tmp_path, scored, "A test model.", [], library="gguf")
    assert "replies: 16, ended by themselves: 75%, cut by the limit: 25%, loops: ?" in card  # None is '?', no crash
    assert "mean words: 31.5" in card and "Not compared yet" not in card


def test_run_records_find_the_scorecard_by_the_fused_dir_path(tmp_path):
    run = tmp_path / "runs" / "exp"
    adapters, fused = run / "ckpt", run / "ckpt" / "fused"
    fused.mkdir(parents=True)
    write_manifest(adapters, TRAIN)
    write_manifest(fused, {"stage": "fuse", "adapters": str(adapters), "train_manifest": TRAIN})
    (run / "compare").mkdir()
    models = [{"name": "base", "path": str(tmp_path / "base"), "scorecard": {"replies": 1}},
              {"name": "whatever it is called", "path": str(fused), "scorecard": {"replies": 4}}]
    (run / "compare" / "comparison.json").write_text(json.dumps({"models": models}))
    records = run_records(fused)
    assert records["train"]["summary"]["best_epoch"] == 3
    assert records["scorecard"] == {"replies": 4} and records["scorecard_model"] == "whatever it is called"


@pytest.fixture(scope="module")
def trained(converted_models, tiny_checkpoints, tmp_path_factory):
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model
    from tests.test_train import write_chat_data

    root = tmp_path_factory.mktemp("card-run")
    data = write_chat_data(root / "chat.jsonl", count=16)
    run = train_model(converted_models["pt"], data, out=root / "run" / "pt", lora=LoraSettings(num_layers=2, rank=4),
                      train=TrainSettings(epochs=1, batch_size=8, learning_rate=2e-3, val_generation_tokens=0))
    return run.out_dir, data, tiny_checkpoints["pt"]


def test_fuse_and_its_hf_export_carry_the_card(trained, tmp_path):
    adapters, data, base_source = trained
    result = CliRunner().invoke(cli, ["fuse", str(adapters), "--export-hf", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    for where, library in ((adapters / "fused", "mlx"), (tmp_path / "hf", "transformers")):
        card = (where / "README.md").read_text()
        assert_names_base_data_recipe_licence(card, str(base_source), str(data.resolve()))
        assert f"library_name: {library}" in card and "rank 4, 1 epoch, " in card and "- kept: epoch 1 (" in card
    assert f"gemma-mlx chat {adapters / 'fused'}" in (adapters / "fused" / "README.md").read_text()
    assert "AutoModelForCausalLM" in (tmp_path / "hf" / "README.md").read_text()
    assert "[INFO]" not in result.output
