"""scripts/random_twin.py: a random model with a real one's shapes and scales, loadable like the real one."""

import importlib.util
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "random_twin.py"


def _script():
    spec = importlib.util.spec_from_file_location("random_twin", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(model: Path) -> dict:
    return {name: value for shard in sorted(model.glob("*.safetensors")) for name, value in load_file(shard).items()}


def test_the_twin_keeps_shapes_norms_scales_and_files_and_loads(converted_models, tmp_path):
    from gemma_mlx.models import load_model

    twin_script = _script()
    source = converted_models["pt"]
    packed = tmp_path / "twin.npz"
    twin_script.pack(source, packed, small=1000)  # a tiny model's matrices are small: draw those above 1,000 values
    twin_script.build(packed, tmp_path / "twin")

    original, twin = _weights(source), _weights(tmp_path / "twin")
    assert {k: v.shape for k, v in twin.items()} == {k: v.shape for k, v in original.items()}
    drawn = [name for name, value in original.items() if value.size >= 1000]
    assert drawn and any(value.size < 1000 for value in original.values())
    for name, value in original.items():
        if value.size < 1000:
            assert np.array_equal(twin[name], value), name
        else:
            assert not np.array_equal(twin[name], value)
            assert abs(twin[name].std() / value.std() - 1) < 0.1, name
    assert json.loads((tmp_path / "twin" / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (tmp_path / "twin" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    loaded = load_model(tmp_path / "twin")
    assert loaded.model.model.embed_tokens.weight.shape == original["model.embed_tokens.weight"].shape


def test_the_twin_is_marked_and_nothing_is_overwritten(converted_models, tmp_path):
    import pytest

    twin_script = _script()
    source = converted_models["pt"]
    packed = tmp_path / "twin.npz"
    twin_script.pack(source, packed, small=1000)
    with pytest.raises(SystemExit, match="not overwritten"):
        twin_script.pack(source, packed)
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        twin_script.pack(tmp_path, tmp_path / "other.npz")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        twin_script.build(packed, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="random_twin.py pack"):
        twin_script.build(tmp_path / "junk.npz", tmp_path / "out")
    twin_script.build(packed, tmp_path / "twin")
    manifest = json.loads((tmp_path / "twin" / "manifest.json").read_text())
    original = json.loads((source / "manifest.json").read_text())
    assert manifest["random_twin"] is True and manifest["name"].endswith("-random-twin")
    assert "files" not in manifest and "source_id" not in manifest and manifest["flavour"] == original["flavour"]
    assert not (tmp_path / "twin.partial").exists()
