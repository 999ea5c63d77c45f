"""Adapter directories: mlx-lm's layout plus our trained turn-token embedding rows.

A directory holds `adapters.safetensors` + `adapter_config.json` exactly as mlx-lm writes them,
so `mlx_lm.load(base, adapter_path=dir)` and `mlx_lm generate --adapter-path dir` work. mlx-lm
refuses any tensor in adapters.safetensors that is not a LoRA leaf, so the trained
`<start_of_turn>`/`<end_of_turn>` rows live next to it in `turn_tokens.safetensors`
(keys `ids` int32 [n], `rows` [n, hidden]); `models.load` applies both.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
TURN_TOKENS_FILE = "turn_tokens.safetensors"


def adapter_config(lora, num_layers: int, base_model: Path | str, turn_tokens: bool) -> dict:
    """adapter_config.json in mlx-lm's schema (`fine_tune_type`, `num_layers`, `lora_parameters`)."""
    parameters = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout}
    if lora.keys:
        parameters["keys"] = list(lora.keys)
    return {
        "fine_tune_type": lora.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": parameters,
        "model": str(base_model),
        "turn_tokens_file": TURN_TOKENS_FILE if turn_tokens else None,
    }


def save_adapters(directory: Path, weights: dict, config: dict, turn_tokens=None) -> None:
    """Write one adapter directory; `turn_tokens` is (ids, rows) or None."""
    import mlx.core as mx

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / ADAPTERS_FILE), weights)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    turn_path = directory / TURN_TOKENS_FILE
    if turn_tokens is not None:
        ids, rows = turn_tokens
        mx.save_safetensors(str(turn_path), {"ids": mx.array(list(ids), dtype=mx.int32), "rows": rows})
    elif turn_path.exists():
        turn_path.unlink()


def read_turn_tokens(adapter_dir: Path):
    """(ids list, rows array) saved in an adapter directory, or None when it has none."""
    import mlx.core as mx

    path = Path(adapter_dir) / TURN_TOKENS_FILE
    if not path.is_file():
        return None
    saved = mx.load(str(path))
    return [int(i) for i in saved["ids"].tolist()], saved["rows"]


def set_embedding_rows(model, ids: list[int], rows) -> None:
    """Replace embedding rows (and the untied output rows, if any) of a loaded mlx-lm model."""
    import mlx.core as mx
    import mlx.nn as nn

    index = mx.array(ids, dtype=mx.int32)
    embed = model.model.embed_tokens
    if isinstance(embed, nn.QuantizedEmbedding):
        # Rare (training on a quantized base): de-quantize, set the rows, quantize again.
        weight = mx.dequantize(embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits, mode=embed.mode)
        weight[index] = rows.astype(weight.dtype)
        plain = nn.Embedding(*weight.shape)
        plain.weight = weight
        model.model.embed_tokens = nn.QuantizedEmbedding.from_embedding(plain, embed.group_size, embed.bits, mode=embed.mode)
    else:
        weight = mx.array(embed.weight)
        weight[index] = rows.astype(weight.dtype)
        embed.weight = weight
    head = getattr(model, "lm_head", None)
    if head is not None and isinstance(head, nn.Linear):
        weight = mx.array(head.weight)
        weight[index] = rows.astype(weight.dtype)
        head.weight = weight
    mx.eval(model.parameters())


def apply_turn_tokens(model, adapter_dir: Path) -> bool:
    """Put an adapter dir's trained turn-token rows into the model; False when there are none."""
    saved = read_turn_tokens(adapter_dir)
    if saved is None:
        return False
    ids, rows = saved
    set_embedding_rows(model, ids, rows)
    return True


def check_adapter_dir(adapter_dir: Path) -> Path:
    """`adapter_dir` as a Path, or one clear paragraph when it holds no mlx-lm adapters."""
    adapter_dir = Path(adapter_dir)
    where = "the directory `gemma-mlx train` wrote (outputs/runs/<run>/<model>/, or its last/ folder)"
    if not adapter_dir.is_dir():
        problem = "is a file, not a directory" if adapter_dir.exists() else "does not exist"
        raise CheckpointError(f"Adapter directory {adapter_dir} {problem}. Give {where}.")
    missing = [name for name in (ADAPTERS_FILE, CONFIG_FILE) if not (adapter_dir / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{adapter_dir} is not an adapter directory: it has no {' and no '.join(missing)}. "
            f"Point to {where}, or train first."
        )
    return adapter_dir
