"""The language model of a multimodal checkpoint, as an ordinary text checkpoint.

Gemma 3 4B/12B/27B (`Gemma3ForConditionalGeneration`) and Gemma 4 (`Gemma4ForConditionalGeneration`)
ship a vision (and for Gemma 4 an audio) tower beside the language model, whose weights sit under
`language_model.` (transformers 4: `language_model.model.*`; transformers 5: `model.language_model.*`).
gemma-mlx fine-tunes and chats in text only, so `convert` first writes the language model alone
as a `<Family>ForCausalLM` checkpoint (text config filled in by transformers' own defaults, weights
renamed, the towers left out), and every later stage sees a plain text model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..families import Family

# Old and new prefixes of the language model's weights -> the text checkpoint's prefix.
_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_TOP_LEVEL = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")


def text_config(config: dict, family: Family) -> dict:
    """A complete config.json for the text model, from a multimodal config's (often sparse) text_config.

    The hub writes only the values that differ from transformers' defaults, and mlx-lm's own
    defaults differ from those, so the missing values are filled by transformers' config class.
    """
    from transformers import AutoConfig

    sparse = dict(config.get("text_config") or {})
    sparse.pop("model_type", None)
    full = AutoConfig.for_model(family.text_model_type, **sparse).to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "auto_map"):
        full.pop(key, None)
    for key in _TOP_LEVEL:
        if key in config and config[key] is not None:
            full.setdefault(key, config[key])
    full = mlx_keys(full)
    layer_types = full.get("layer_types") or []
    if "sliding_window_pattern" not in full and "full_attention" in layer_types:
        full["sliding_window_pattern"] = layer_types.index("full_attention") + 1  # what mlx-lm's gemma3_text reads
    full.update(model_type=family.text_model_type, architectures=[family.causal_lm_architecture])
    return dict(sorted(full.items()))


# mlx-lm's name for a key that transformers 5 keeps only as a per-layer override of the full-attention layers
_FULL_ATTENTION_KEYS = {"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}


def _full_attention_override(text: dict) -> dict:
    """The per-layer override (transformers 5's `per_layer_config`) of the first full-attention layer, or {}."""
    overrides = text.get("per_layer_config") or {}
    for index, kind in enumerate(text.get("layer_types") or []):
        if kind == "full_attention":
            return dict(overrides.get(str(index)) or overrides.get(index) or {})
    return {}


def mlx_keys(text: dict) -> dict:
    """A text config with the keys mlx-lm reads that transformers 5 writes only per layer.

    transformers 5 turns a Gemma 4 config's `global_head_dim` (the wider head of the full-attention
    layers) and `num_global_key_value_heads` (their key/value heads when keys are the values, as in
    26B/31B) into overrides of those layers under `per_layer_config`, and saves no top-level key.
    mlx-lm reads only the top-level keys and, without them, takes its own defaults (512, none): a
    checkpoint whose wide head is not 512 would not load, and a keys-are-values one would load wrong.
    Keys already present are kept; a config without per-layer overrides comes back unchanged.
    """
    override = _full_attention_override(text)
    missing = {ours: override[theirs] for theirs, ours in _FULL_ATTENTION_KEYS.items()
               if theirs in override and ours not in text}
    return {**text, **missing} if missing else text


def stage_with_mlx_keys(checkpoint: Path, out: Path) -> list[str]:
    """When a text checkpoint's config.json lacks keys mlx-lm needs (mlx_keys), make `out` a view of it
    (links to its files, a completed config.json) for mlx-lm to read; return the keys filled in.

    Nothing is staged when nothing is missing (an empty list); the checkpoint itself is never written.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config = json.loads((checkpoint / "config.json").read_text())
    completed = mlx_keys(config)
    filled = sorted(set(completed) - set(config))
    if not filled:
        return []
    out.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    (out / "config.json").write_text(json.dumps(completed, indent=2) + "\n")
    return filled


def text_weight_name(name: str, tied: bool) -> str | None:
    """The text checkpoint's name for a multimodal weight, or None for the vision/audio parts."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith("lm_head.") and not tied:
        return name
    return None


def write_language_model(checkpoint: Path, out: Path, config: dict, family: Family) -> dict:
    """Write the language model of multimodal `checkpoint` into `out` as a text checkpoint; return a record.

    Shard by shard (each tensor read lazily), so memory holds one shard's language-model weights.
    """
    import mlx.core as mx

    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = text_config(config, family)
    tied = bool(text.get("tie_word_embeddings", True))
    kept = dropped = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights = mx.load(str(shard))
        renamed = {}
        for name, value in weights.items():
            new = text_weight_name(name, tied)
            if new is None:
                dropped += 1
            else:
                renamed[new] = value
        kept += len(renamed)
        if renamed:
            mx.save_safetensors(str(out / shard.name), renamed, metadata={"format": "pt"})
        del weights, renamed
    (out / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for item in checkpoint.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
            "config.json", "model.safetensors.index.json"
        ):
            shutil.copy(item, out / item.name)
    return {"from_model_type": config.get("model_type"), "kept_tensors": kept, "dropped_tensors": dropped,
            "architecture": family.causal_lm_architecture}
