"""Hugging Face checkpoints out (`gemma-mlx fuse --export-hf DIR`): weights transformers loads as
the family's causal LM (Gemma3ForCausalLM, Gemma4ForCausalLM), with config, tokenizer and a generation
config that stops on the turn end.

MLX's Gemma text models use the Hugging Face parameter names, so the export is de-quantizing,
casting and writing them under the same names, plus a transformers config.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import CheckpointError, GemmaMlxError
from ..families import FAMILIES, family_of_config
from ..manifest import (
    Progress,
    StageOutput,
    atomic_output_dir,
    check_output,
    check_writable,
    finish_output,
    now_iso,
    quiet,
    read_manifest,
    sha256_tree,
    versions,
)
from ..model_card import hf_card
from ..models import read_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
HF_DTYPES = ("bfloat16", "float32")
TEXT_MODEL_TYPES = tuple(f.text_model_type for f in FAMILIES)


def hf_config(config: dict, dtype: str, tied: bool) -> dict:
    """A transformers config.json for the family's causal LM from an MLX model's config."""
    family = family_of_config(config)
    hf = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    hf.update(
        architectures=[family.causal_lm_architecture],
        model_type=family.text_model_type,
        tie_word_embeddings=tied,
        torch_dtype=dtype,
        bos_token_id=family.bos_id,
        pad_token_id=family.pad_id,
    )
    eos = config.get("eos_token_id", family.eos_id)
    eos = list(eos) if isinstance(eos, list) else [eos]
    hf["eos_token_id"] = eos + [i for i in family.stop_token_ids if i not in eos]
    return dict(sorted(hf.items()))


def _default_hf_dtype(model_dir: Path) -> str:
    """float32 for a float32 model, else bfloat16 (the hub's own dtype for Gemma 3)."""
    import mlx.core as mx

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights = mx.load(str(file))  # lazy: nothing is read but the header
        if "model.embed_tokens.weight" in weights:
            return "float32" if weights["model.embed_tokens.weight"].dtype == mx.float32 else "bfloat16"
    return "bfloat16"


def _hf_weights(model_dir: Path, dtype: str | None):
    """Float weights under HF names (MLX's Gemma 3 uses the same names), de-quantized if needed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    model, config = load_model(model_dir, lazy=True)
    if config.get("model_type") not in TEXT_MODEL_TYPES:
        raise CheckpointError(f"{model_dir}: model_type {config.get('model_type')!r} cannot be exported to Hugging Face; "
                              f"a converted or fused text model ({', '.join(TEXT_MODEL_TYPES)}) can.")
    model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is None:
        dtype = "float32" if weights["model.embed_tokens.weight"].dtype == mx.float32 else "bfloat16"
    cast = getattr(mx, dtype)
    return {name: w.astype(cast) for name, w in weights.items()}, config, dtype


def export_hf_model(
    model_dir: str | Path, out: str | Path, dtype: str | None = None, force: bool = False, progress: Progress | None = None
) -> Path:
    """Write a Hugging Face causal-LM checkpoint (safetensors, config, tokenizer) of an MLX model dir."""
    import mlx.core as mx

    progress = progress or quiet
    model_dir, out = Path(model_dir), Path(out).expanduser()
    if dtype is not None and dtype not in HF_DTYPES:
        raise GemmaMlxError(f"Unknown export dtype {dtype!r}. Choose one of: {', '.join(HF_DTYPES)}.")
    source = read_manifest(model_dir) or {}
    source_id = source.get("key_sha256") or sha256_tree(model_dir)
    dtype = dtype or _default_hf_dtype(model_dir)
    output = StageOutput("export-hf", out, key={"source_id": source_id, "dtype": dtype},
                         inputs={"the model it exports": model_dir})
    if check_output(output, force, progress):
        progress(f"{out}: already exported from the same model, nothing to do")
        return out
    started = time.perf_counter()
    weights, config, dtype = _hf_weights(model_dir, dtype)
    check_writable(out.parent, need_bytes=sum(w.nbytes for w in weights.values()) + (20 << 20))
    progress(f"exporting {model_dir} as Hugging Face {dtype} safetensors -> {out}")
    with atomic_output_dir(out, force=True) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        hf = hf_config(config, dtype, tied="lm_head.weight" not in weights)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, tmp / name)
        generation = read_json(model_dir / "generation_config.json", "generation_config.json") if (
            model_dir / "generation_config.json"
        ).is_file() else {}
        generation.update(bos_token_id=hf["bos_token_id"], pad_token_id=hf["pad_token_id"], eos_token_id=hf["eos_token_id"])
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(hf_card(model_dir, out, dtype), encoding="utf-8")  # the model card
        finish_output(tmp, output, {
            "source_model": str(model_dir.resolve()),
            "source_id": source_id,
            "source_manifest": source or None,
            "dtype": dtype,
            "architecture": hf["architectures"][0],
            "size_bytes": (tmp / "model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - started, 2),
            "created": now_iso(),
            "versions": versions(),
        })
    progress(f"exported {out} ({dtype})")
    return out
