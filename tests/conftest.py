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
    from gemma_mlx.checkpoints import convert_checkpoint

    root = tmp_path_factory.mktemp("mlx")
    return {
        flavour: convert_checkpoint(str(path), out=root / path.name, dtype="float32").path
        for flavour, path in tiny_checkpoints.items()
    }
