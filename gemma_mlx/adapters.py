"""Adapter directories: mlx-lm's layout plus our trained turn-token embedding rows.

A directory holds `adapters.safetensors` + `adapter_config.json` exactly as mlx-lm writes them,
so `mlx_lm.load(base, adapter_path=dir)` and `mlx_lm generate --adapter-path dir` work. mlx-lm
refuses any tensor in adapters.safetensors that is not a LoRA leaf, so the trained
`<start_of_turn>`/`<end_of_turn>` rows live next to it in `turn_tokens.safetensors`
(keys `ids` int32 [n], `rows` [n, hidden]); `models.load` applies both.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from .errors import CheckpointError
from .manifest import write_json
from .state import AdapterConfig, load_state_file

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
    save_safetensors(directory / ADAPTERS_FILE, weights)
    write_json(directory / CONFIG_FILE, config)
    turn_path = directory / TURN_TOKENS_FILE
    if turn_tokens is not None:
        ids, rows = turn_tokens
        save_safetensors(turn_path, {"ids": mx.array(list(ids), dtype=mx.int32), "rows": rows})
    elif turn_path.exists():
        turn_path.unlink()


def save_safetensors(path: Path, arrays: dict) -> None:
    """mx.save_safetensors through a temp file and a rename: a kill or a full disk mid-write leaves the
    earlier file whole instead of a cut-off one under the real name."""
    import mlx.core as mx

    path = Path(path)
    tmp = path.with_name(f"{UNFINISHED_PREFIX}{path.stem}-{os.getpid()}.safetensors")  # mlx adds .safetensors to any other name
    try:
        try:
            mx.save_safetensors(str(tmp), arrays)
        except RuntimeError as error:  # mlx says "Unable to write 8 bytes" and drops the errno
            raise _write_error_of(path, arrays, error) from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_error_of(path: Path, arrays: dict, error: RuntimeError) -> OSError:
    """The OSError a failed mlx write most likely was, so callers' full-disk and permission
    paragraphs apply: mlx raises a bare RuntimeError with no errno."""
    needed = sum(getattr(array, "nbytes", 0) for array in arrays.values()) + (1 << 20)
    if not os.access(path.parent, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    if free_bytes(path.parent) < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({' '.join(str(error).split())})", str(path))


def free_bytes(directory: Path) -> int:
    """Free space under `directory` (a function of its own, so a test can fill the disk)."""
    return shutil.disk_usage(directory).free


UNFINISHED_PREFIX = ".unfinished-"  # save_safetensors' temp files; one left by a kill is removed on the next start


def remove_unfinished_saves(directory: Path) -> None:
    """Delete the temp files of saves a kill cut short under `directory` (their real files are the earlier whole ones)."""
    for leftover in Path(directory).rglob(f"{UNFINISHED_PREFIX}*.safetensors"):
        leftover.unlink(missing_ok=True)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None when its header and size agree.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the bytes. A write cut short by a kill or a full disk fails one of those checks,
    and they read only the header, not the tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, fewer than the 8 of a safetensors header length"
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if 8 + length > size:
            return f"its header says {length} bytes follow, but only {size - 8} do"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not the JSON a safetensors file starts with"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets in its header"
        if offsets[1] > data:
            return f"tensor {name!r} ends at byte {offsets[1]} of the data, but the file holds only {data}"
    return None


def damaged_safetensors(directory: Path) -> list[tuple[Path, str]]:
    """(file, problem) for every safetensors file under `directory` that fails safetensors_problem."""
    found = []
    for path in sorted(Path(directory).rglob("*.safetensors")):
        if not path.name.startswith(UNFINISHED_PREFIX):
            problem = safetensors_problem(path)
            if problem:
                found.append((path, problem))
    return found


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


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """The checked adapter_config.json of an adapter dir; the one rule fuse, compare and chat apply.

    Refused with one paragraph: not an adapter dir, a config of the wrong shape or types, LoRA
    adapters without their lora_parameters, and adapters trained with turn-token rows whose
    turn_tokens.safetensors is gone (a fused or loaded -pt model would then never end its turn).
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    config = load_state_file(path, AdapterConfig)
    if config.fine_tune_type != "full" and config.lora_parameters is None:
        raise CheckpointError(
            f"{path} has no lora_parameters (rank, scale, dropout), so the adapters cannot be rebuilt. It is not an "
            "mlx-lm adapter config; train again to write a complete one."
        )
    if config.turn_tokens_file and not (adapter_dir / TURN_TOKENS_FILE).is_file():
        raise CheckpointError(
            f"{adapter_dir} was trained with turn-token rows but {TURN_TOKENS_FILE} is missing; without them a "
            "fine-tuned base model does not end its replies. Copy the file back from the run (or its last/ folder), "
            "or train again."
        )
    return config
