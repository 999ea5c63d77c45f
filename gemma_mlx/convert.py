"""`gemma-mlx convert`: short names, hub downloads, GGUF files, and the conversion to MLX (Gemma-correct).

A converted model directory is what every later stage loads. Beyond mlx-lm's own conversion we
make it Gemma-correct for our use: a turn template even for a -pt model, the family's turn end
among its stop tokens, and a manifest saying where it came from (see docs/DESIGN.md, "Gemma 3 facts").
A multimodal checkpoint (Gemma 3 4B and up, Gemma 4) is converted as its language model alone
(formats/language_model.py), so every later stage sees a text model. The families and their
facts are in families.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import backend
from .errors import CheckpointError
from .families import FAMILIES, accepted_model_types, family_of_config, is_multimodal, short_names
from .models import loading_errors
from .state import ModelConfig, as_dict, load_state_file
from .manifest import (
    Progress,
    StageOutput,
    atomic_output_dir,
    check_output,
    check_writable,
    finish_output,
    now_iso,
    outputs_root,
    quiet,
    sha256_file,
    sha256_tree,
    versions,
)

# Short names of every family (families.py), e.g. gemma-3-270m, gemma-4-e2b-it.
REGISTRY = short_names()
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
DTYPES = ("float32", "bfloat16", "float16")
GROUP_SIZES = (32, 64, 128)
SUPPORTED_MODEL_TYPES = tuple(accepted_model_types())


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from: a hub repo id or a local directory."""

    spec: str  # what the user typed
    name: str  # short name used for the output directory
    hub_id: str | None = None
    local_path: Path | None = None  # a Hugging Face checkpoint directory
    gguf_path: Path | None = None  # a GGUF model file (llama.cpp, LM Studio, Ollama)


def resolve_source(spec: str) -> Source:
    """Turn a short name, hub id or local directory into a Source; unknown names are an error."""
    from .formats.gguf import PACKAGED_NAME, is_gguf, packaged_base_model

    path = Path(spec).expanduser()
    if spec == PACKAGED_NAME and not path.exists():
        return Source(spec=spec, name=PACKAGED_NAME, gguf_path=packaged_base_model())
    if path.exists():
        if path.is_file() and is_gguf(path):
            return Source(spec=spec, name=path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name,
                          gguf_path=path.resolve())
        if not path.is_dir():
            raise CheckpointError(
                f"{spec} is a file but not a GGUF model file. Give a .gguf file, or the Hugging Face checkpoint "
                "directory that holds config.json."
            )
        return Source(spec=spec, name=path.resolve().name, local_path=path.resolve())
    if spec in REGISTRY:
        return Source(spec=spec, name=spec, hub_id=REGISTRY[spec])
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return Source(spec=spec, name=parts[1], hub_id=spec)
    known = ", ".join(sorted([*REGISTRY, PACKAGED_NAME]))
    raise CheckpointError(
        f"Unknown checkpoint '{spec}': it is not a known short name, a hub id (owner/name) or an "
        f"existing directory. Known names: {known}."
    )


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None):
    """Turn huggingface_hub's exceptions into one paragraph that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise CheckpointError(
            f"{repo} is a gated model and this machine has no access to it. Accept Google's licence at "
            f"https://huggingface.co/{repo} (logged in to the same account), then log in here with "
            "`hf auth login` (or set HF_TOKEN to a read token) and run the command again."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision '{revision}'. Check --revision (a branch, tag or commit).") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo} was not found on the Hugging Face hub (or it is private and you are not logged in). "
            "Check the spelling, or log in with `hf auth login`."
        ) from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"There is no directory {repo} here, and as a hub id it is not in the local Hugging Face cache and {why}, "
            "so it cannot be downloaded. Check the path if you meant a local checkpoint; for a hub model, connect "
            "to the internet (and unset HF_HUB_OFFLINE) to download it once."
        ) from None


def fetch(source: Source, revision: str | None = None) -> tuple[Path, str | None]:
    """Local directory of a checkpoint and its hub commit (None for a local dir).

    Downloads go through huggingface_hub: its cache, HF_TOKEN and HF_HUB_OFFLINE apply.
    """
    if source.local_path is not None:
        return source.local_path, None
    import huggingface_hub

    with _hub_errors(source.hub_id, revision):
        path = Path(huggingface_hub.snapshot_download(source.hub_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    return path, path.name if path.parent.name == "snapshots" else revision


def check_reachable(source: Source, revision: str | None = None) -> dict:
    """Fetch only config.json (cached, or a few KB) to learn early that a checkpoint can be had.

    Gated, missing and offline-and-not-cached checkpoints fail here, before any long work.
    Returns the config of the model convert will write: a multimodal checkpoint's language model.
    """
    from .sizing import text_part

    if source.gguf_path is not None:
        from .formats.gguf import check_architecture, hf_config, _open

        reader = _open(source.gguf_path)
        check_architecture(reader, source.gguf_path)
        return hf_config(reader)
    if source.local_path is not None:
        return text_part(validate_checkpoint(source.local_path))
    import huggingface_hub

    with _hub_errors(source.hub_id, revision):
        path = huggingface_hub.hf_hub_download(source.hub_id, "config.json", revision=revision)
    config = as_dict(load_state_file(Path(path), ModelConfig, "Download it again (delete it from the Hugging Face cache)."))
    check_model_type(config, f"{source.hub_id} config.json")
    return text_part(config)


def read_config(checkpoint: Path) -> dict:
    config_path = Path(checkpoint) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a Hugging Face checkpoint: it has no config.json. "
            "Point to the directory that holds config.json, model.safetensors and the tokenizer files."
        )
    fix = "Restore the checkpoint's config.json from where it came from (or download it again)."
    return as_dict(load_state_file(config_path, ModelConfig, fix))  # bad bytes, JSON or field types: one paragraph


def check_model_type(config: dict, where: str) -> None:
    """gemma-mlx trains the families in families.py; say so clearly for anything else."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        known = "; ".join(f"{f.title} ({', '.join(repr(t) for t in f.model_types)})" for f in FAMILIES)
        raise CheckpointError(
            f"{where}: model_type is {model_type!r}, but gemma-mlx works with these model families: {known}. "
            "Convert one of those checkpoints instead."
        )


def validate_checkpoint(checkpoint: Path) -> dict:
    """Check that a directory is a Gemma 3 text checkpoint we can convert; return its config."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    check_model_type(config, str(checkpoint / "config.json"))
    missing = []
    if not list(checkpoint.glob("*.safetensors")):
        missing.append("model weights (*.safetensors)")
    if not any((checkpoint / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise CheckpointError(
            f"{checkpoint} is missing {' and '.join(missing)}. Copy the complete checkpoint "
            "(config.json, model.safetensors, tokenizer files), or convert from the hub id instead."
        )
    return config


def has_chat_template(checkpoint: Path) -> bool:
    checkpoint = Path(checkpoint)
    if (checkpoint / "chat_template.jinja").is_file() or (checkpoint / "chat_template.json").is_file():
        return True
    tokenizer_config = checkpoint / "tokenizer_config.json"
    return tokenizer_config.is_file() and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))


# transformers 5 saves fast tokenizers as "TokenizersBackend", a class transformers 4 does not know;
# "PreTrainedTokenizerFast" is the same tokenizer to both.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_gemma_correct(model_dir: Path) -> None:
    """Give a converted model its family's turn template, both stop tokens (<eos> and the turn end), and a
    tokenizer class every transformers version can load."""
    model_dir = Path(model_dir)
    family = family_of_config(json.loads((model_dir / "config.json").read_text()))
    tokenizer_config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
    changed = False
    if not has_chat_template(model_dir):
        tokenizer_config["chat_template"] = family.chat_template()
        changed = True
    if tokenizer_config.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASSES:
        tokenizer_config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[tokenizer_config["tokenizer_class"]]
        changed = True
    if changed:
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    for file_name in ("config.json", "generation_config.json"):
        path = model_dir / file_name
        config = json.loads(path.read_text()) if path.is_file() else {}
        eos = config.get("eos_token_id", family.eos_id)
        eos = list(eos) if isinstance(eos, list) else [eos]
        for token_id in family.stop_token_ids:
            if token_id not in eos:
                eos.append(token_id)
        config["eos_token_id"] = eos
        path.write_text(json.dumps(config, indent=2) + "\n")


def default_output(source: Source, quantize_bits: int | None = None) -> Path:
    suffix = f"-{quantize_bits}bit" if quantize_bits else ""
    return outputs_root() / "models" / f"{source.name}{suffix}"


@dataclass
class ConvertResult:
    name: str
    path: Path
    status: str  # "converted" or "up-to-date"
    manifest: dict


def _settings(dtype: str, quantize_bits: int | None, group_size: int, flavour: str | None) -> dict:
    return {"dtype": dtype, "quantize_bits": quantize_bits, "group_size": group_size if quantize_bits else None,
            "flavour": flavour}


def _source_parameters(source: Source, checkpoint: Path | None) -> float:
    """Parameters of the source model, for the disk estimate (hub weights are bf16: 2 bytes each)."""
    if source.gguf_path is not None:
        from .formats.gguf import _open

        return float(sum(int(t.n_elements) for t in _open(source.gguf_path).tensors))
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")) / 2


def _estimate_bytes(params: float, dtype: str, quantize_bits: int | None, staged_float32: bool) -> int:
    bytes_per_param = (quantize_bits / 8 + 0.1) if quantize_bits else (4 if dtype == "float32" else 2)
    staged = params * 4 if staged_float32 else 0  # a GGUF file is first written out as a float32 checkpoint
    return int(params * bytes_per_param * 1.1 + staged) + (50 << 20)


def _source_eos_ids(checkpoint: Path) -> list[int]:
    """The eos ids the source checkpoint declares (generation config first, as generation uses it)."""
    from .flavour import eos_ids_of

    for name in ("generation_config.json", "config.json"):
        path = Path(checkpoint) / name
        if path.is_file():
            try:
                ids = eos_ids_of(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
            if ids:
                return ids
    return []


def convert_checkpoint(
    spec: str,
    out: Path | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = 64,
    revision: str | None = None,
    force: bool = False,
    progress: Progress = quiet,
    flavour: str | None = None,
    remake: bool = False,
) -> ConvertResult:
    """Convert one checkpoint (hub id, HF directory or GGUF file) to an MLX model dir.

    A no-op if it was already converted the same way. `flavour` ("pt" or "it") overrides the
    base/instruct detection (flavour.py), which otherwise reads the converted weights.
    """
    dtype = dtype or backend.default_dtype()
    if dtype not in DTYPES:
        raise CheckpointError(f"Unknown dtype '{dtype}'. Choose one of: {', '.join(DTYPES)}.")
    if quantize_bits not in (None, 4, 8):
        raise CheckpointError(f"Quantization must be 4 or 8 bits, not {quantize_bits}.")
    if quantize_bits and group_size not in GROUP_SIZES:
        raise CheckpointError(f"--group-size is {group_size}; MLX quantizes in groups of {', '.join(map(str, GROUP_SIZES))} "
                              "weights (64 is the usual choice).")
    if flavour not in (None, "pt", "it"):
        raise CheckpointError(f"Flavour must be 'pt' (base) or 'it' (instruction-tuned), not {flavour!r}.")
    source = resolve_source(spec)
    out = Path(out) if out else default_output(source, quantize_bits)
    settings = _settings(dtype, quantize_bits, group_size, flavour)

    progress(f"{source.spec}: locating checkpoint")
    if source.gguf_path is not None:
        checkpoint, config = None, check_reachable(source)
        source_id = {"sha256": sha256_file(source.gguf_path)}
    else:
        checkpoint, commit = fetch(source, revision)
        config = validate_checkpoint(checkpoint)
        source_id = {"hub_id": source.hub_id, "revision": commit} if source.hub_id else {"sha256": sha256_tree(checkpoint)}

    local = source.gguf_path or checkpoint
    output = StageOutput("convert", out, key={"source_id": source_id, "settings": settings},
                         inputs={"the checkpoint it converts": local})
    existing = check_output(output, force, progress, remake)
    if existing:
        progress(f"{source.spec}: already converted at {out} (same source and settings), nothing to do")
        return ConvertResult(source.name, out, "up-to-date", existing)

    params = _source_parameters(source, checkpoint)
    check_writable(out.parent, _estimate_bytes(params, dtype, quantize_bits, source.gguf_path is not None))
    record = {
        "name": source.name,
        "source": {"spec": source.spec, "hub_id": source.hub_id, "local_path": str(local),
                   "format": "gguf" if source.gguf_path else "huggingface"},
        "source_id": source_id,
        "settings": settings,
        "model_type": config.get("model_type"),
        "shape": {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
    }
    progress(f"{source.spec}: converting to {dtype}" + (f", {quantize_bits}-bit" if quantize_bits else "") + f" -> {out}")
    manifest = _convert_into(output, source, checkpoint, record, progress)
    progress(f"{source.spec}: {manifest['flavour_evidence']['explanation']}")
    progress(f"{source.spec}: done in {manifest['seconds']:.1f}s ({manifest['size_bytes'] / 1e6:.1f} MB)")
    return ConvertResult(source.name, out, "converted", manifest)


def _convert_into(output: StageOutput, source: Source, checkpoint: Path | None, record: dict, progress: Progress) -> dict:
    """Run mlx-lm's conversion into a temp dir next to `out`, fix it up, and rename it into place.

    A GGUF source is first written out as a Hugging Face checkpoint inside the same temp dir.
    """
    import shutil

    from mlx_lm.convert import convert as mlx_convert

    from .flavour import detect_flavour

    settings = record["settings"]
    started = time.perf_counter()
    with atomic_output_dir(output.path, force=True) as tmp:
        extra = {}
        if source.gguf_path is not None:
            from .formats.gguf import gguf_to_hf

            checkpoint = tmp / "hf"
            extra["gguf"] = gguf_to_hf(source.gguf_path, checkpoint, progress)
            validate_checkpoint(checkpoint)
        source_eos = _source_eos_ids(checkpoint)
        source_config = read_config(checkpoint)
        if is_multimodal(source_config):
            from .formats.language_model import write_language_model

            family = family_of_config(source_config)
            progress(f"{source.spec}: a multimodal {family.title} checkpoint ({source_config.get('model_type')}); "
                     "keeping its language model only (the vision and audio towers are left out)")
            original, checkpoint = checkpoint, tmp / "text"
            extra["language_model"] = write_language_model(original, checkpoint, source_config, family)
        else:
            from .formats.language_model import stage_with_mlx_keys

            filled = stage_with_mlx_keys(checkpoint, tmp / "text")  # a transformers 5 Gemma 4 text config
            if filled:
                checkpoint, extra["config_keys_filled"] = tmp / "text", filled
                progress(f"{source.spec}: its config.json keeps {', '.join(filled)} per layer only; "
                         "read from there for mlx-lm (the checkpoint itself is not changed)")
        staged = tmp / "mlx"  # mlx_lm.convert insists on creating its own directory
        damaged = "The checkpoint's files may be cut short by an interrupted download or copy: fetch or copy them again."
        with backend.quiet_mlx_lm(), loading_errors(checkpoint, damaged):  # no [INFO] lines; stdout for results
            mlx_convert(
                str(checkpoint),
                mlx_path=str(staged),
                dtype=settings["dtype"],
                quantize=bool(settings["quantize_bits"]),
                q_bits=settings["quantize_bits"],
                q_group_size=settings["group_size"],
            )
        if source.gguf_path is not None or "language_model" in extra or "config_keys_filled" in extra:
            shutil.rmtree(checkpoint)
        for item in staged.iterdir():
            item.rename(tmp / item.name)
        staged.rmdir()
        make_gemma_correct(tmp)
        converted = read_config(tmp)
        record = {**record, "model_type": converted.get("model_type"), "source_model_type": source_config.get("model_type"),
                  "shape": {k: converted.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")}}
        flavour = detect_flavour(tmp, source.name, source_eos, settings["flavour"])
        manifest = finish_output(tmp, output, {
            **record,
            **extra,
            "flavour": flavour.flavour,
            "flavour_evidence": {**flavour.record(), "explanation": flavour.explain()},
            "size_bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
            "seconds": round(time.perf_counter() - started, 2),
            "created": now_iso(),
            "versions": versions(),
        })
    return manifest


def convert_many(specs: list[str], out_root: Path | None = None, progress: Progress = quiet, **options) -> list[ConvertResult]:
    """Convert several checkpoints with the same settings; resolve every name first so typos fail fast."""
    sources = [resolve_source(spec) for spec in specs]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise CheckpointError(f"Two checkpoints would share an output name ({', '.join(names)}); convert them one at a time with --out.")
    results = []
    for spec, source in zip(specs, sources):
        out = Path(out_root) / source.name if out_root else None
        results.append(convert_checkpoint(spec, out=out, progress=progress, **options))
    return results
