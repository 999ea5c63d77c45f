"""Gemma 4 text configs as transformers 5 writes them: the full-attention layers' wide head (and, in
26B/31B, their key/value heads) live only in `per_layer_config`, a key mlx-lm does not read.

convert must still load such a checkpoint with the right shapes (logits against transformers), and
`run`'s estimate must count its parameters from the config alone.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.formats.language_model import mlx_keys
from gemma_mlx.tiny import _gemma4_weights, write_tiny_gemma4_checkpoint

PROMPT_IDS = [2, 105, 300, 400, 500, 106, 600, 10, 20, 30, 700, 105, 41]
SHAPES = {
    "wide-head": {},  # E2B/E4B: a wider head in the full-attention layers (here 32, not mlx-lm's default 512)
    "keys-are-values": {"attention_k_eq_v": True, "num_global_key_value_heads": 2},  # 26B/31B
}


def transformers5_checkpoint(directory, extra: dict, seed: int = 4):
    """A tiny Gemma 4 text checkpoint whose config.json is what Gemma4TextConfig.save_pretrained writes."""
    pytest.importorskip("torch")
    from safetensors.numpy import save_file
    from transformers import Gemma4TextConfig

    directory = write_tiny_gemma4_checkpoint(directory, "pt", seed)
    ours = {**json.loads((directory / "config.json").read_text()), **extra}
    save_file(_gemma4_weights(ours, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    settings = {k: v for k, v in ours.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = Gemma4TextConfig(**settings)
    config.architectures = ours["architectures"]
    config.save_pretrained(str(directory))
    written = json.loads((directory / "config.json").read_text())
    assert "global_head_dim" not in written and "num_global_key_value_heads" not in written  # the shape under test
    assert written["per_layer_config"]
    return directory


def logits(model_dir, hf: bool):
    if hf:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            return model(torch.tensor([PROMPT_IDS])).logits[0].numpy()
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([PROMPT_IDS])).astype(mx.float32))[0]


def test_mlx_keys_reads_the_full_attention_override():
    config = {"layer_types": ["sliding_attention", "full_attention"], "head_dim": 16,
              "per_layer_config": {"1": {"head_dim": 64, "num_key_value_heads": 2}}}
    assert mlx_keys(config) == {**config, "global_head_dim": 64, "num_global_key_value_heads": 2}
    assert mlx_keys({**config, "global_head_dim": 48})["global_head_dim"] == 48  # a key already there is kept
    plain = {"layer_types": ["full_attention"], "head_dim": 16}
    assert mlx_keys(plain) is plain


@pytest.mark.parametrize("extra", SHAPES.values(), ids=SHAPES.keys())
def test_transformers5_gemma4_text_checkpoint_converts(tmp_path, extra):
    hf = transformers5_checkpoint(tmp_path / "hf", extra)
    before = (hf / "config.json").read_text()
    result = CliRunner().invoke(cli, ["convert", str(hf), "--out", str(tmp_path / "mlx"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "keeps global_head_dim" in result.output
    assert (hf / "config.json").read_text() == before  # the user's checkpoint is untouched
    converted = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert converted["global_head_dim"] == 32
    assert converted.get("num_global_key_value_heads") == extra.get("num_global_key_value_heads")
    manifest = json.loads((tmp_path / "mlx" / "manifest.json").read_text())
    assert "global_head_dim" in manifest["config_keys_filled"]
    reference = logits(hf, hf=True)
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(logits(tmp_path / "mlx", hf=False), reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", SHAPES.values(), ids=SHAPES.keys())
def test_estimate_counts_a_transformers5_config(tmp_path, extra):
    """run's parameter count, from config.json alone, is the checkpoint's linear and embedding weights."""
    from safetensors.numpy import load_file

    from gemma_mlx.convert import check_reachable, resolve_source
    from gemma_mlx.sizing import parameter_count

    hf = transformers5_checkpoint(tmp_path / "hf", extra)
    count = parameter_count(check_reachable(resolve_source(str(hf))))
    weights = load_file(str(hf / "model.safetensors"))
    layers = sum(v.size for k, v in weights.items() if k.startswith("model.layers.") and v.ndim == 2)
    assert count["layers"] == layers
    assert count["embedding"] == weights["model.embed_tokens.weight"].size
