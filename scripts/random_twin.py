"""A random model with a real one's shapes and weight scales, for timing where the weights cannot go.

    python scripts/random_twin.py pack  MODEL_DIR  TWIN.npz     # a few MB: norms, scales, files
    python scripts/random_twin.py build TWIN.npz   OUT_DIR      # a loadable float32 model again

Speed depends on shapes, not on what the weights say: a training step or a decode step of a model
with the real 270M's shapes costs what the real one's costs. `pack` keeps the small tensors (the
norms) as they are, each large matrix's standard deviation, and the small files (config, tokenizer,
manifest), all in one compressed file that can travel where the 1 GB of weights cannot (a GPU
machine with no network, say). `build` draws each large matrix from a normal distribution of that
scale. Replies from such a model are noise and seldom stop, so figures from it are throughput
figures only: both sides decode the full token budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SMALL = 1 << 16  # tensors with fewer values travel as they are (the norms)
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json")


def pack(model: Path, out: Path, small: int = SMALL) -> None:
    from safetensors.numpy import load_file

    arrays: dict[str, np.ndarray] = {}
    for shard in sorted(model.glob("*.safetensors")):
        for name, value in load_file(shard).items():
            if value.size < small:
                arrays[f"exact/{name}"] = value
            else:
                arrays[f"scale/{name}"] = np.array([value.shape, [0] * value.ndim], dtype=np.int64)
                arrays[f"std/{name}"] = np.array(value.astype(np.float64).std(), dtype=np.float64)
    for name in FILES:
        if (model / name).exists():
            arrays[f"file/{name}"] = np.frombuffer((model / name).read_bytes(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")


def build(twin: Path, out: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    packed = np.load(twin)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key in packed.files:
        kind, name = key.split("/", 1)
        if kind == "exact":
            weights[name] = packed[key]
        elif kind == "scale":
            shape = tuple(int(n) for n in packed[key][0])
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * float(packed[f"std/{name}"]))
        elif kind == "file":
            (out / name).write_bytes(packed[key].tobytes())
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model.safetensors" for name in sorted(weights)}}))
    print(f"{out}: {len(weights)} tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack", "build"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    (pack if args.action == "pack" else build)(args.source, args.target)


if __name__ == "__main__":
    main()
