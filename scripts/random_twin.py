"""A random model with a real one's shapes and weight scales, for timing where the weights cannot go.

    python scripts/random_twin.py pack  MODEL_DIR  TWIN.npz     # a few MB: norms, scales, files
    python scripts/random_twin.py build TWIN.npz   OUT_DIR      # a loadable float32 model again

Speed depends on shapes, not on what the weights say: a training step or a decode step of a model
with the real 270M's shapes costs what the real one's costs. `pack` keeps the small tensors (the
norms) as they are, each large matrix's standard deviation, and the small files (config, tokenizer,
manifest), all in one compressed file that can travel where the 1 GB of weights cannot (a GPU
machine with no network, say). `build` draws each large matrix from a normal distribution of that
scale. Replies from such a model are noise and seldom stop, so figures from it are throughput
figures only: both sides decode the full token budget. The twin's manifest names it a twin and
drops the real model's identity and file list, so no stage takes it for the model it copies.
Neither command overwrites anything: an existing TWIN.npz or a non-empty OUT_DIR is refused, and
`build` writes into OUT_DIR.partial first, renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SMALL = 1 << 16  # tensors with fewer values travel as they are (the norms)
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json")


def pack(model: Path, out: Path, small: int = SMALL) -> None:
    from safetensors.numpy import load_file

    shards = sorted(Path(model).glob("*.safetensors"))
    if not shards:
        sys.exit(f"{model}: no *.safetensors files. Give a converted model directory (gemma-mlx convert's output).")
    if out.suffix != ".npz" or out.exists():
        sys.exit(f"{out}: give a new file name ending in .npz (an existing file is not overwritten).")
    arrays: dict[str, np.ndarray] = {}
    for shard in shards:
        for name, value in load_file(shard).items():
            if value.size < small:
                arrays[f"exact/{name}"] = value
            else:
                arrays[f"shape/{name}"] = np.array(value.shape, dtype=np.int64)
                arrays[f"std/{name}"] = np.array(value.astype(np.float64).std())
    for name in FILES:
        if (model / name).exists():
            arrays[f"file/{name}"] = np.frombuffer((model / name).read_bytes(), dtype=np.uint8)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")


def twin_manifest(text: bytes) -> bytes:
    """The real model's manifest with its identity and file list taken out, marked as a twin."""
    manifest = {k: v for k, v in json.loads(text).items() if k not in ("key", "key_sha256", "files", "source_id")}
    manifest["name"] = f"{manifest.get('name') or 'model'}-random-twin"
    manifest["random_twin"] = True
    return json.dumps(manifest, indent=2).encode()


def build(twin: Path, out: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; give a new directory (nothing in it is overwritten).")
    try:
        packed = np.load(twin)
    except (OSError, ValueError) as error:
        sys.exit(f"{twin}: not a file that `random_twin.py pack` wrote ({error}).")
    rng = np.random.default_rng(seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a build killed halfway
    partial.mkdir(parents=True)
    weights = {}
    for key in packed.files:
        kind, name = key.split("/", 1)
        if kind == "exact":
            weights[name] = packed[key]
        elif kind == "shape":
            shape = tuple(int(n) for n in packed[key])
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * float(packed[f"std/{name}"])
        elif kind == "file":
            data = packed[key].tobytes()
            (partial / name).write_bytes(twin_manifest(data) if name == "manifest.json" else data)
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model.safetensors" for name in sorted(weights)}}))
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
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
