"""Model size and training memory from config.json alone (sizing.py), for every family, and run's check."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma_mlx.sizing import CHUNK_ROWS, lora_parameters, parameter_count, training_memory
from gemma_mlx.tiny import write_tiny_checkpoint, write_tiny_gemma4_checkpoint, write_tiny_multimodal_checkpoint


def counted(directory, skip=("norm", "layer_scalar")) -> int:
    """Parameters in a checkpoint's weights, leaving out norms and scalars (sizing counts matrices)."""
    weights = load_file(str(directory / "model.safetensors"))
    return sum(v.size for k, v in weights.items() if not any(s in k for s in skip)
               and "vision" not in k and "multi_modal" not in k)


@pytest.mark.parametrize("write", [write_tiny_checkpoint, write_tiny_gemma4_checkpoint, write_tiny_multimodal_checkpoint],
                         ids=["gemma3", "gemma4", "gemma3-multimodal"])
def test_parameter_count_is_the_checkpoints(tmp_path, write):
    directory = write(tmp_path / "m", seed=1)
    config = json.loads((directory / "config.json").read_text())
    assert parameter_count(config)["total"] == counted(directory)


def test_gemma3_270m_shape_counts_268m_parameters():
    shape = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, num_hidden_layers=18,
                 intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    parts = parameter_count(shape)
    assert parts["total"] == 268_042_240 and parts["embedding"] == 167_772_160  # docs/DESIGN.md's 268M, 168M embedding


@pytest.mark.parametrize("write, layers", [(write_tiny_checkpoint, 6), (write_tiny_gemma4_checkpoint, 6)], ids=["gemma3", "gemma4"])
def test_lora_count_is_mlx_lms(tmp_path, write, layers):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from gemma_mlx.convert import convert_checkpoint

    converted = convert_checkpoint(str(write(tmp_path / "hf", seed=1)), out=tmp_path / "mlx", dtype="float32").path
    model, config = load_model(converted)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    assert sum(v.size for _, v in tree_flatten(model.trainable_parameters())) == lora_parameters(config, 8, 4)


def test_memory_parts_follow_the_loss_path():
    from gemma_mlx.training.chunked_loss import CHUNK_ROWS as LOSS_CHUNK

    assert CHUNK_ROWS == LOSS_CHUNK
    shape = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, num_hidden_layers=18,
                 intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    full, quantized = training_memory(shape), training_memory(shape, bits=4)
    assert full["chunked_loss"] and quantized["chunked_loss"]  # a quantized output layer is de-quantized by chunks
    assert quantized["weights"] < full["weights"] / 5
    assert quantized["logits"] == full["logits"]
    capped = training_memory({**shape, "model_type": "gemma4_text", "final_logit_softcapping": 30.0})
    assert not capped["chunked_loss"]


def test_run_refuses_a_model_that_cannot_fit_and_picks_qlora_when_that_fits(monkeypatch):
    from gemma_mlx import backend
    from gemma_mlx.config import ExperimentConfig
    from gemma_mlx.errors import GemmaMlxError
    from gemma_mlx.run import check_resources

    e2b = dict(model_type="gemma4_text", vocab_size=262144, hidden_size=1536, num_hidden_layers=35,
               intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
               hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True,
               sliding_window_pattern=5, final_logit_softcapping=30.0)
    said = []
    monkeypatch.setattr(backend, "machine_memory", lambda: 8e9)  # not even 4-bit fits: refused, nothing changed
    config = ExperimentConfig(dtype="bfloat16")  # a Mac's default
    with pytest.raises(GemmaMlxError, match="Not enough memory"):
        check_resources(config, [e2b], said.append)
    assert config.quantize_bits == 0
    monkeypatch.setattr(backend, "machine_memory", lambda: 24e9)  # float does not fit, 4-bit does: QLoRA, said
    estimate = check_resources(config, [e2b], said.append)
    assert config.quantize_bits == 4 and estimate["memory_bytes"] < 24e9
    assert any("quantize_bits: 4" in line and "QLoRA" in line for line in said), said
    kept = ExperimentConfig(dtype="bfloat16")  # --no-memory-check keeps the float weights
    check_resources(kept, [e2b], said.append, memory_check=False)
    assert kept.quantize_bits == 0


def test_training_on_a_4bit_base_then_fuse_keeps_or_dequantizes(tiny_checkpoints, tmp_path):
    """QLoRA: LoRA (and the base's turn rows) train on a 4-bit base through the full-logits loss;
    fuse keeps the 4-bit weights, or writes float ones with --dequantize."""
    import mlx.core as mx
    from click.testing import CliRunner

    from gemma_mlx.cli import cli
    from gemma_mlx.convert import convert_checkpoint

    base = convert_checkpoint(str(tiny_checkpoints["pt"]), out=tmp_path / "q4", dtype="float32", quantize_bits=4).path
    assert json.loads((base / "config.json").read_text())["quantization"]["bits"] == 4
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What do you like, friend {i}?"},
                                      {"role": "assistant", "content": "I reckon games in the backyard are heaps of fun!"}]})
             for i in range(24)]
    data.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", str(base), "--data", str(data), "--epochs", "2", "--batch-size", "8",
                                 "--lr", "1e-3", "--val-generation-tokens", "0", "--out", str(tmp_path / "adapters")])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "adapters" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("split") == "train"]
    assert losses and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (tmp_path / "adapters" / "turn_tokens.safetensors").is_file()
    for flags, quantized in (([], True), (["--dequantize"], False)):
        out = tmp_path / f"fused-{quantized}"
        result = runner.invoke(cli, ["fuse", str(tmp_path / "adapters"), "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert ("quantization" in json.loads((out / "config.json").read_text())) is quantized
        assert any(k.endswith(".scales") for k in mx.load(str(out / "model.safetensors"))) is quantized
