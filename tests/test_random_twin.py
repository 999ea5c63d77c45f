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
