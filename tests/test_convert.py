"""Tiny checkpoints, `gemma-mlx convert`, its errors, and the BLAS preload."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx import chat_format
from gemma_mlx.cli import cli
from gemma_mlx.tiny import write_tiny_checkpoint

from .gemma3_reference import reference_logits


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def leftovers(parent: Path) -> list[str]:
    """Temp or partial directories a failed conversion might have left behind."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name] if parent.exists() else []


# --- tiny checkpoints ---------------------------------------------------------------------


def test_tiny_checkpoints_have_the_real_layout(tiny_checkpoints):
    from transformers import AutoTokenizer

    for flavour, path in tiny_checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "gemma3_text"
        assert config["num_hidden_layers"] >= config["sliding_window_pattern"]
        for key in ("sliding_window_pattern", "rope_theta", "rope_local_base_freq"):
            assert key in config
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
        for token, token_id in ids.items():
            assert tokenizer.convert_tokens_to_ids(token) == token_id
        # Turn tokens stay whole inside text.
        encoded = tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
        assert encoded[0] == 105 and encoded[-1] == 106
        generation = json.loads((path / "generation_config.json").read_text())
        if flavour == "it":
            assert tokenizer.chat_template and generation["eos_token_id"] == [1, 106]
        else:
            assert not tokenizer.chat_template and generation["eos_token_id"] == 1


def test_tiny_checkpoint_is_deterministic_for_a_seed(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", "pt", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", "pt", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", "pt", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


# --- convert ------------------------------------------------------------------------------


def test_converted_model_logits_match_numpy_reference(tiny_checkpoints, converted_models):
    import mlx.core as mx
    from mlx_lm import load

    tokens = [2, 105, 300, 410, 77, 512, 106, 107, 105, 600]
    for flavour in ("pt", "it"):
        model, _ = load(str(converted_models[flavour]))
        ours = np.array(model(mx.array([tokens]))[0].astype(mx.float32))
        expected = reference_logits(tiny_checkpoints[flavour], tokens)
        assert ours.shape == expected.shape == (len(tokens), 1024)
        np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=1e-3)


def test_converted_pt_model_has_turn_template_and_stops_on_end_of_turn(converted_models):
    from mlx_lm import load

    _, tokenizer = load(str(converted_models["pt"]))
    assert tokenizer.has_chat_template
    assert {1, 106} <= set(tokenizer.eos_token_ids)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "G'day!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == chat_format.render(messages)
    assert rendered == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nG'day!<end_of_turn>\n"
    for name in ("config.json", "generation_config.json"):
        assert json.loads((converted_models["pt"] / name).read_text())["eos_token_id"] == [1, 106]
    manifest = json.loads((converted_models["pt"] / "manifest.json").read_text())
    assert manifest["flavour"] == "pt" and manifest["settings"]["dtype"] == "float32"
    assert manifest["source_id"]["sha256"] and manifest["versions"]["mlx-lm"]


def test_convert_both_in_one_call_then_rerun_is_a_no_op(tiny_checkpoints, isolated_outputs):
    result = run_cli("convert", tiny_checkpoints["pt"], tiny_checkpoints["it"])
    assert result.exit_code == 0, result.output
    models = isolated_outputs / "models"
    assert sorted(p.name for p in models.iterdir()) == ["tiny-gemma-3-it", "tiny-gemma-3-pt"]
    weights = models / "tiny-gemma-3-pt" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_cli("convert", tiny_checkpoints["pt"], tiny_checkpoints["it"])
    assert again.exit_code == 0, again.output
    assert again.output.count("up-to-date") == 2
    assert weights.stat().st_mtime_ns == before


def test_different_settings_need_force(tiny_checkpoints, isolated_outputs):
    assert run_cli("convert", tiny_checkpoints["pt"]).exit_code == 0
    refused = run_cli("convert", tiny_checkpoints["pt"], "--dtype", "bfloat16")
    assert refused.exit_code == 1
    assert "--force" in refused.output and "different" in refused.output
    out = isolated_outputs / "models" / "tiny-gemma-3-pt"
    assert json.loads((out / "manifest.json").read_text())["settings"]["dtype"] == "float32"
    forced = run_cli("convert", tiny_checkpoints["pt"], "--dtype", "bfloat16", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["dtype"] == "bfloat16"


def test_quantized_conversion_loads_and_generates(tiny_checkpoints, tmp_path):
    from mlx_lm import generate, load

    out = tmp_path / "q4"
    result = run_cli("convert", tiny_checkpoints["it"], "--quantize", "4", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, tokenizer = load(str(out))
    text = generate(model, tokenizer, prompt=chat_format.prompt_ids(tokenizer, [{"role": "user", "content": "hi"}]), max_tokens=5)
    assert isinstance(text, str)
    assert json.loads((out / "manifest.json").read_text())["settings"]["quantize_bits"] == 4


# --- errors: one paragraph, exit 1, no traceback, nothing half-written ---------------------


def test_unknown_name(isolated_outputs):
    result = run_cli("convert", "gemma-9-banana")
    assert result.exit_code == 1
    assert "Unknown checkpoint 'gemma-9-banana'" in result.output and "gemma-3-1b-pt" in result.output
    assert not (isolated_outputs / "models").exists()


def test_gated_model_says_where_to_accept_the_licence(monkeypatch, isolated_outputs):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, **_):
        response = httpx2.Response(401, request=httpx2.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise GatedRepoError(f"Access to model {repo_id} is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    result = run_cli("convert", "gemma-3-1b-pt")
    assert result.exit_code == 1
    assert "https://huggingface.co/google/gemma-3-1b-pt" in result.output
    assert "hf auth login" in result.output and "HF_TOKEN" in result.output
    assert not (isolated_outputs / "models").exists()


def test_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("convert", "gemma-3-1b-it")
    assert result.exit_code == 1
    assert "not in the local Hugging Face cache" in result.output and "HF_HUB_OFFLINE" in result.output


def test_wrong_model_type(tiny_checkpoints, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["pt"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", bad, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "model_type is 'llama'" in result.output and "gemma3_text" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("remove, expected", [("model.safetensors", "model weights"), ("tokenizer.json", "tokenizer"), ("config.json", "no config.json")])
def test_missing_files(tiny_checkpoints, tmp_path, remove, expected):
    bad = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoints["pt"], bad)
    (bad / remove).unlink()
    result = run_cli("convert", bad, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert expected in result.output
    assert not (tmp_path / "out").exists()


def test_no_disk_space(tiny_checkpoints, tmp_path, monkeypatch):
    import gemma_mlx.manifest as manifest

    monkeypatch.setattr(manifest.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    result = run_cli("convert", tiny_checkpoints["pt"], "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "Not enough disk space" in result.output
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tiny_checkpoints, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("convert", tiny_checkpoints["pt"], "--out", blocker / "model")
    assert result.exit_code == 1
    assert "Cannot write" in result.output and str(blocker) in result.output


def test_interrupted_conversion_leaves_nothing_behind(tiny_checkpoints, tmp_path, monkeypatch):
    import importlib

    convert_module = importlib.import_module("mlx_lm.convert")  # the package attribute is the function

    def interrupted(hf_path, mlx_path, **_):
        Path(mlx_path).mkdir(parents=True)
        (Path(mlx_path) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert", interrupted)
    out = tmp_path / "models" / "m"
    result = run_cli("convert", tiny_checkpoints["pt"], "--out", out)
    assert result.exit_code == 130
    assert "Interrupted" in result.output
    assert not out.exists() and leftovers(out.parent) == []


# --- backend ------------------------------------------------------------------------------


def test_version_and_info_report_the_backend():
    result = run_cli("--version")
    assert result.exit_code == 0 and result.output.startswith("gemma-mlx 0.1.0\n")
    assert "mlx:" in result.output and "device:" in result.output  # the README says --version prints the backend
    result = run_cli("info")
    for label in ("gemma-mlx 0.1.0", "device:", "blas:", "dtype policy:  float32"):
        assert label in result.output


_MATMUL = """
import sys, numpy as np, gemma_mlx, mlx.core as mx
from gemma_mlx.backend import backend_info
rng = np.random.default_rng(0)
a = mx.array(rng.standard_normal((256, 512)).astype(np.float32))
b = mx.array(rng.standard_normal((512, 128)).astype(np.float32))
np.save(sys.argv[1], np.array(a @ b))
print(backend_info().blas)
"""


def test_blas_preload_gives_the_same_results(tmp_path):
    outputs = {}
    for preload in ("on", "off"):
        env = dict(os.environ)
        env.pop("GEMMA_MLX_NO_BLAS_PRELOAD", None)
        if preload == "off":
            env["GEMMA_MLX_NO_BLAS_PRELOAD"] = "1"
        target = tmp_path / f"{preload}.npy"
        done = subprocess.run([sys.executable, "-c", _MATMUL, str(target)], env=env, capture_output=True, text=True, check=True)
        outputs[preload] = (np.load(target), done.stdout)
    assert "disabled by GEMMA_MLX_NO_BLAS_PRELOAD" in outputs["off"][1]
    import ctypes.util

    if ctypes.util.find_library("openblas"):
        assert "OpenBLAS preloaded" in outputs["on"][1]
    np.testing.assert_allclose(outputs["on"][0], outputs["off"][0], rtol=1e-4, atol=1e-4)


def test_force_never_replaces_a_file_with_an_output_dir(tiny_checkpoints, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    result = run_cli("convert", tiny_checkpoints["pt"], "--out", precious, "--force")
    assert result.exit_code == 1
    assert "is a file" in result.output
    assert precious.read_text() == "mine"
