"""A model as a command names it, resolved once: one typed reference instead of a spec string.

A user names a model as `DIR` (a converted or fused model dir, or a name converted earlier) or as
`BASE_DIR::ADAPTER_DIR` (a base model with LoRA adapters). `resolve` reads that spec once, at the
edge of a command, checks that everything it names is there, and returns a `ModelRef` holding what
the rest of the command asks about a model: its dirs, family, flavour, the name a person sees, the
fingerprint an output's key records, and its manifest. Functions further in take a `ModelRef`, so
no spec is parsed, no path resolved and no identity worked out twice.

A shared helper: it imports no stage module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .families import Family
from .manifest import read_manifest, sha256_json
from .models import (
    LoadedModel,
    display_name,
    model_dir_path,
    resolve_model_dir,
    split_spec,
)


@dataclass(frozen=True)
class ModelRef:
    """One model, resolved and checked: a model dir, with adapters on top or not."""

    spec: str  # as the user wrote it ("DIR" or "BASE_DIR::ADAPTER_DIR"): what reports and messages show
    dir: Path  # the model dir (for base+adapters: the base), as given (not made absolute)
    adapters: Path | None  # the LoRA adapter dir applied on top, if any
    label: str  # the name a person sees (models.display_name): compare's reports, run's summary, the arena
    identity: tuple[str, ...]  # fingerprint of the model dir, then of the adapter dir: what an output's key records
    flavour: str | None  # "pt" | "it" as the model dir's manifest records it; None when it records none
    family: Family = field(compare=False)  # from the model dir's config.json (families.py)
    manifest: dict | None = field(default=None, compare=False, repr=False)  # the model dir's manifest.json

    @property
    def paths(self) -> tuple[Path, ...]:
        """The directories the spec names: the model dir, then the adapter dir if any."""
        return (self.dir, self.adapters) if self.adapters is not None else (self.dir,)

    @property
    def stage(self) -> str | None:
        """What made the model: "convert", "fuse", "base+adapters", or None (no manifest)."""
        return "base+adapters" if self.adapters is not None else (self.manifest or {}).get("stage")

    @property
    def same_as(self) -> tuple[Path, ...]:
        """What tells two specs of the same model apart from two models: their dirs, made absolute."""
        return tuple(p.resolve() for p in self.paths)

    def load(self) -> LoadedModel:
        """The model and tokenizer, adapters and their turn-token rows applied (models.load checks they fit)."""
        from .models import load

        model, tokenizer = load(self.dir, self.adapters)
        return LoadedModel(self.label, self.dir, model, tokenizer, self.manifest, self.adapters)


def fingerprint(directory: Path, manifest: dict | None = None) -> str:
    """A cheap fingerprint of a model or adapter dir: its manifest, else its files' names, sizes and times.

    The one identity of a model that output keys record (compare's inputs, train's base_id): a
    re-converted or re-fused model has a new manifest, so what was made from the old one is made again.
    """
    manifest = manifest if manifest is not None else read_manifest(directory)
    if manifest:
        return sha256_json(manifest)
    return sha256_json({p.name: [p.stat().st_size, p.stat().st_mtime] for p in sorted(Path(directory).iterdir())
                        if p.is_file()})


def resolve(spec: str | Path) -> ModelRef:
    """A model spec, parsed and checked before any weights load; one paragraph saying what is wrong otherwise.

    Checks: each dir the spec names is there, the model dir holds config, weights and tokenizer
    (models.resolve_model_dir), and the adapter dir holds mlx-lm adapters (adapters.check_adapter_dir).
    """
    from .adapters import check_adapter_dir
    from .flavour import family_of_dir

    spec = str(spec)
    model_part, adapter_part = split_spec(spec)
    model_dir = model_dir_path(model_part)
    adapter_dir = Path(adapter_part).expanduser() if adapter_part is not None else None
    for path in (model_dir, adapter_dir):
        if path is not None and not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise CheckpointError(
                f"Model {path} {what}. Give a converted or fused model directory (gemma-mlx convert / fuse), "
                "or BASE_DIR::ADAPTER_DIR for a base model with LoRA adapters."
            )
    resolve_model_dir(model_dir)  # config, weights and tokenizer are there
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    manifest = read_manifest(model_dir)
    identity = (fingerprint(model_dir, manifest), *((fingerprint(adapter_dir),) if adapter_dir is not None else ()))
    flavour = (manifest or {}).get("flavour")
    return ModelRef(
        spec=spec,
        dir=model_dir,
        adapters=adapter_dir,
        label=display_name(model_dir, adapter_dir, manifest or {}),
        identity=identity,
        flavour=flavour if flavour in ("pt", "it") else None,
        family=family_of_dir(model_dir),
        manifest=manifest,
    )
