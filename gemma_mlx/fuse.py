"""`gemma-mlx fuse`: bake LoRA adapters (and trained turn-token rows) into a standalone model dir.

The fused directory is a complete, Gemma-correct converted model: later stages load it like any
other (`mlx_lm.load`), with no adapter bookkeeping. Beyond mlx-lm's own fuse we check that the
adapters belong to the base before doing any work, bake the `<start_of_turn>`/`<end_of_turn>`
embedding rows a base (-pt) model was trained with (without them a fused -pt model never stops:
see docs/DESIGN.md), never overwrite a different output silently, and can export Hugging Face weights
that `transformers` loads as Gemma3ForCausalLM.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .adapters import ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE, apply_turn_tokens, read_adapter_config
from .convert import make_gemma_correct
from .formats.hf_export import HF_DTYPES, export_hf_model
from .model_card import fused_card
from .models import check_adapters_fit, loading_errors, train_manifest_of
from .errors import CheckpointError, GemmaMlxError, OutputExistsError
from .manifest import (
    Progress,
    StageOutput,
    atomic_output_dir,
    check_output,
    check_writable,
    finish_output,
    now_iso,
    quiet,
    read_manifest,
    refuse_to_replace_inputs,
    sha256_file,
    sha256_tree,
    versions,
)
from .state import AdapterConfig, as_dict

ADAPTER_FILES = (ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE)


@dataclass
class FuseResult:
    out_dir: Path
    status: str  # "fused" or "up-to-date"
    manifest: dict
    hf_dir: Path | None = None  # the Hugging Face export, when one was asked for


# ---------------------------------------------------------------- inputs and checks


def check_export_target(target: Path) -> None:
    """--export-hf's directory, checked before the fuse: a file in the way, a place that cannot be
    written, or a directory the export did not write is refused now, not after minutes of work."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"--export-hf {target} is a file, and the export is a directory that would replace it. "
                                "Choose another --export-hf directory, or move the file away.")
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputExistsError(f"--export-hf {target} cannot be made: {probe} is a file, not a directory. "
                                "Choose another --export-hf directory.")
    if not os.access(probe, os.W_OK):
        raise GemmaMlxError(f"--export-hf {target} cannot be written: {probe} is read-only for you (permission "
                            "denied). Choose another --export-hf directory, or fix its permissions.")
    if target.is_dir() and any(target.iterdir()):
        manifest = read_manifest(target)
        if not manifest or manifest.get("stage") != "export-hf":
            raise OutputExistsError(f"--export-hf {target} already holds something an export did not write (no export-hf "
                                    "manifest.json), so it is never replaced. Choose another --export-hf directory.")


def resolve_base(adapter_dir: Path, base: str | Path | None, train_manifest: dict | None, adapter_config: AdapterConfig) -> Path:
    """The base model dir: the one given, else the one recorded by training."""
    given = base is not None
    if base is None:
        recorded = (train_manifest or {}).get("base_model") or adapter_config.model
        if not recorded:
            raise GemmaMlxError(
                f"{adapter_dir} has no training manifest naming its base model, so fuse cannot tell which model "
                "the adapters belong to. Pass the converted base model directory with --base."
            )
        base = recorded
    base = Path(base).expanduser()
    if not given and not base.exists():
        raise CheckpointError(
            f"The base model these adapters were trained on, {base} (recorded by training), is not there any more: "
            "it was moved or deleted. Pass its new location with --base."
        )
    if not (base / "config.json").is_file() or not list(base.glob("model*.safetensors")):
        raise CheckpointError(
            f"Base model {base} is not a converted model directory (it needs config.json and model*.safetensors). "
            "Pass the converted model the adapters were trained on with --base."
        )
    return base.resolve()


def fuse_inputs(adapter_dir: Path, base: Path, dequantize: bool) -> dict:
    """What the fused model is made of; the same dict on a re-run means there is nothing to do."""
    base_manifest = read_manifest(base) or {}
    if base_manifest.get("source_id"):
        base_id = {"source_id": base_manifest["source_id"], "settings": base_manifest.get("settings")}
    else:
        base_id = {"sha256": sha256_tree(base, "*.safetensors")}
    adapters = {name: sha256_file(adapter_dir / name) for name in ADAPTER_FILES if (adapter_dir / name).is_file()}
    return {"base_model": str(base), "base_id": base_id, "adapters_sha256": adapters, "dequantize": bool(dequantize)}


# ---------------------------------------------------------------- fusing


def _load_base_with_adapters(base: Path, adapter_dir: Path):
    """mlx-lm load + its adapter loading, with its shape/name errors turned into our error."""
    import mlx.core as mx
    from mlx_lm.utils import load_adapters, load_model, load_tokenizer

    with loading_errors(base):
        model, config = load_model(base)
    with loading_errors(adapter_dir, "They may be cut short; use the run's other adapters (last/) or train again."):
        try:
            load_adapters(model, str(adapter_dir))
        except (ValueError, KeyError, IndexError) as error:
            raise GemmaMlxError(
                f"The adapters in {adapter_dir} do not fit the base model {base}: {' '.join(str(error).split())}. They were "
                "trained on a different model (other shapes or layer count). Fuse them with the base they were trained on (--base)."
            ) from None
        mx.eval(model.parameters())  # mlx reads lazily: a damaged file shows up here, not later
    with loading_errors(base):
        tokenizer = load_tokenizer(base, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _merge_lora(model, dequantize: bool) -> int:
    """mlx-lm's fuse step: replace each LoRA/DoRA layer by its merged linear; returns how many."""
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _save_fused(tmp: Path, base: Path, model, tokenizer, config: dict) -> None:
    from mlx_lm.utils import save

    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm may print; keep stdout for results
        save(tmp, str(base), model, tokenizer, config, donate_model=False)
    make_gemma_correct(tmp)


def fuse_model(
    adapter_dir: str | Path,
    out: str | Path | None = None,
    base: str | Path | None = None,
    dequantize: bool = False,
    export_hf: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    hf_dtype: str | None = None,
    remake: bool = False,
) -> FuseResult:
    """Fuse `adapter_dir`'s adapters into their base model; optionally export it for transformers.

    A re-run with the same adapters, base and settings is a no-op ("up-to-date"); a different
    existing output needs force=True. `hf_dtype` (bfloat16 | float32) applies to the export only;
    default: float32 when the fused weights are float32, else bfloat16.
    """
    progress = progress or quiet
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    adapter_config = read_adapter_config(adapter_dir)  # the rule compare and chat apply too
    train_manifest = train_manifest_of(adapter_dir)
    base = resolve_base(adapter_dir, base, train_manifest, adapter_config)
    base_config = check_adapters_fit(base, adapter_dir, train_manifest)
    if hf_dtype is not None and hf_dtype not in HF_DTYPES:
        raise GemmaMlxError(f"Unknown export dtype {hf_dtype!r}. Choose one of: {', '.join(HF_DTYPES)}.")
    out = Path(out).expanduser() if out else adapter_dir / "fused"
    inputs_of = {"the adapters": adapter_dir, "the base model": base}
    if export_hf is not None:  # refused now, not after the fuse
        refuse_to_replace_inputs(StageOutput("export-hf", Path(export_hf), {}, {**inputs_of, "the fused model": out}))
        check_export_target(Path(export_hf))
    inputs = fuse_inputs(adapter_dir, base, dequantize)
    output = StageOutput("fuse", out, key=inputs, inputs=inputs_of)
    existing = check_output(output, force, progress, remake)
    if existing:
        progress(f"{out}: already fused from the same adapters and base, nothing to do")
        result = FuseResult(out, "up-to-date", existing)
    else:
        result = _fuse(adapter_dir, adapter_config, base, base_config, output, train_manifest, dequantize, progress)
    if export_hf is not None:
        result.hf_dir = export_hf_model(result.out_dir, export_hf, dtype=hf_dtype, force=force, progress=progress)
    return result


def _fuse(adapter_dir, adapter_config, base, base_config, output, train_manifest, dequantize, progress) -> FuseResult:
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    out, inputs = output.path, output.key
    base_bytes = sum(p.stat().st_size for p in base.glob("model*.safetensors"))
    check_writable(out.parent, need_bytes=int(base_bytes * (4 if dequantize else 1.2)) + (20 << 20))
    started = time.perf_counter()
    progress(f"fusing {adapter_dir} into {base}")
    model, tokenizer, config = _load_base_with_adapters(base, adapter_dir)
    merged = _merge_lora(model, dequantize)
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    turn_tokens = apply_turn_tokens(model, adapter_dir)  # into the (tied) embedding; quantized ones too
    mx.eval(model.parameters())
    base_manifest = read_manifest(base) or {}
    with atomic_output_dir(out, force=True) as tmp:
        _save_fused(tmp, base, model, tokenizer, config)
        card = fused_card(out, _fused_name(adapter_dir, base, base_manifest), base, adapter_dir, train_manifest)
        (tmp / "README.md").write_text(card, encoding="utf-8")  # replaces mlx-lm's bare front matter
        manifest = finish_output(tmp, output, {
            "name": _fused_name(adapter_dir, base, base_manifest),
            "base_model": str(base),
            "adapters": str(adapter_dir),
            "flavour": base_manifest.get("flavour") or (train_manifest or {}).get("flavour"),
            "model_type": base_config.get("model_type"),
            "shape": {k: base_config.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
            "inputs": inputs,
            "settings": {"dequantize": bool(dequantize), "quantization": config.get("quantization")},
            "adapter_config": as_dict(adapter_config),
            "fused_layers": merged,
            "turn_tokens_baked": turn_tokens,
            "train_manifest": train_manifest,
            "size_bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
            "seconds": round(time.perf_counter() - started, 2),
            "created": now_iso(),
            "versions": versions(),
        })
    progress(
        f"fused {merged} adapter layers" + (" and the turn-token rows" if turn_tokens else "")
        + f" -> {out} ({manifest['seconds']:.1f}s)"
    )
    return FuseResult(out, "fused", manifest)


def _fused_name(adapter_dir: Path, base: Path, base_manifest: dict) -> str:
    """A short display name for reports: '<base name>+<run name>' (the run dir's parent, as train lays it out)."""
    run_dir = adapter_dir.parent if adapter_dir.name == "last" else adapter_dir
    run = run_dir.parent.name
    if adapter_dir.name == "last":
        run += "/last"
    return f"{base_manifest.get('name') or base.name}+{run}"
