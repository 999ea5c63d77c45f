"""Gemma 4 by name and by weights: the experiment YAML takes its short names, and base vs instruct is
read from the weights (the <turn|> row of a base sits with the never-used rows) with the evidence printed."""

import json

import numpy as np
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.families import GEMMA4, family_of_name
from gemma_mlx.tiny import write_tiny_gemma4_checkpoint


def test_experiment_yaml_takes_gemma4_short_names(tmp_path):
    from gemma_mlx.config import load_config
    from gemma_mlx.convert import resolve_source

    path = tmp_path / "experiment.yaml"
    path.write_text("name: e2b\ncheckpoints: [gemma-4-e2b, gemma-4-e2b-it, gemma-4-e4b-it]\n")
    config = load_config(path)
    sources = [resolve_source(spec) for spec in config.checkpoints]
    assert [s.hub_id for s in sources] == ["google/gemma-4-E2B", "google/gemma-4-E2B-it", "google/gemma-4-E4B-it"]
    assert [s.name for s in sources] == config.checkpoints  # each model's output dir is its short name
    assert all(family_of_name(spec) is GEMMA4 for spec in config.checkpoints)


def test_gemma4_base_is_told_by_its_weights(tmp_path):
    """A checkpoint whose name and generation config say nothing: the weights decide, and convert says why."""
    from safetensors.numpy import load_file, save_file

    from gemma_mlx.flavour import unused_token_ids

    hf = write_tiny_gemma4_checkpoint(tmp_path / "mystery", "pt", seed=9)
    (hf / "generation_config.json").unlink(missing_ok=True)
    weights = load_file(str(hf / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    unused = unused_token_ids(hf)
    assert len(unused) > 50 and GEMMA4.turn_end_id not in unused
    rng = np.random.default_rng(0)
    # what pre-training leaves: the turn-end row beside the never-used rows' mean
    table[GEMMA4.turn_end_id] = table[unused].mean(axis=0) + 0.002 * rng.standard_normal(table.shape[1]).astype(np.float32)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})

    result = CliRunner().invoke(cli, ["convert", str(hf), "--out", str(tmp_path / "mlx"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "flavour pt (by weights): cosine(<turn|>, mean <unusedN>) = 0.9" in result.output
    assert "(never trained)" in result.output
    evidence = json.loads((tmp_path / "mlx" / "manifest.json").read_text())["flavour_evidence"]
    assert evidence["decided_by"] == "weights" and evidence["end_of_turn_cosine"] > 0.9
    assert evidence["turn_end"] == GEMMA4.turn_end


def test_model_cards_name_the_models_family(tmp_path):
    """A fused or exported Gemma 4's card says Gemma 4, its transformers class and its turn end, not Gemma 3's."""
    from gemma_mlx.convert import convert_checkpoint
    from gemma_mlx.model_card import fused_card, hf_card

    hf = write_tiny_gemma4_checkpoint(tmp_path / "tiny-gemma-4-it", "it", seed=2)
    model_dir = convert_checkpoint(str(hf), out=tmp_path / "mlx", dtype="float32").path
    cards = [fused_card(tmp_path / "fused", "bluey", model_dir, tmp_path / "adapters", None),
             hf_card(model_dir, tmp_path / "hf-out", "float32")]
    for card in cards:
        assert "A Gemma 4 model" in card and f"`{GEMMA4.turn_end}`" in card, card
        assert "Gemma 3" not in card and "<end_of_turn>" not in card and "Gemma Terms of Use" not in card
        assert "license: apache-2.0" in card and "tags: [gemma4, gemma-mlx]" in card  # Gemma 4 is Apache 2.0
    assert GEMMA4.causal_lm_architecture in cards[1]
