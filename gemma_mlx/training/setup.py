"""What a training run decides before its first step, shared by `train` (which plans and finishes a
run) and the loop (which runs it): the run's setup, its file names, the optimizer, adapter writing.

train.py imports this and training/loop.py; neither of these imports train.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..adapters import ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE, adapter_config, save_adapters
from ..state import MetricsRecord, as_dict, load_state_lines
from ..config import LoraSettings, TrainSettings

RESUME_FILE = "resume_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"
LAST_DIR = "last"  # the final (or, while running, the latest saved) adapters
LAST_GOOD_DIR = "last-good"  # the adapters of the step before a NaN loss


@dataclass
class RunSetup:
    """Everything a run needs that is decided before the first step."""

    model_dir: Path
    base_manifest: dict | None
    flavour: str
    turn_tokens: bool
    data: Path
    data_sha256: str
    lora: LoraSettings
    train: TrainSettings
    out: Path
    identity: dict  # what must match for a re-run to be a no-op or a resume to continue
    preferences: object = None  # config.PreferenceSettings of a DPO run (then `data` holds the pairs)
    start_adapters: Path | None = None  # a DPO run's starting persona adapters (fused in memory), if any
    memory_check: bool = True  # stop before the first step when the memory estimate exceeds the machine

    @property
    def work(self) -> Path:
        """Where the run lives until it finished (`<out>.partial`)."""
        return self.out.with_name(self.out.name + ".partial")


def schedule(train: TrainSettings, total_steps: int):
    """The learning rate per step: optional linear warmup, then constant/cosine/linear decay."""
    import mlx.optimizers as optim

    decay_steps = max(total_steps - train.warmup_steps, 1)
    main = {
        "constant": lambda: optim.exponential_decay(train.learning_rate, 1.0),
        "cosine": lambda: optim.cosine_decay(train.learning_rate, decay_steps),
        "linear": lambda: optim.linear_schedule(train.learning_rate, 0.0, decay_steps),
    }[train.lr_schedule]()
    if not train.warmup_steps:
        return main
    warmup = optim.linear_schedule(0.0, train.learning_rate, train.warmup_steps)
    return optim.join_schedules([warmup, main], [train.warmup_steps])


def _one_optimizer(train: TrainSettings, lr):
    import mlx.optimizers as optim

    if train.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=train.weight_decay)


def make_optimizer(train: TrainSettings, total_steps: int, turn_rows: bool = False):
    """The optimizer; with turn rows and turn_token_lr_scale != 1, a second one for those rows."""
    import dataclasses

    import mlx.optimizers as optim

    main = _one_optimizer(train, schedule(train, total_steps))
    if not turn_rows or train.turn_token_lr_scale == 1.0:
        return main
    scaled = dataclasses.replace(train, learning_rate=train.learning_rate * train.turn_token_lr_scale)
    rows = _one_optimizer(train, schedule(scaled, total_steps))
    # the first optimizer takes everything but the rows (and reports the learning rate)
    return optim.MultiOptimizer([main, rows], [lambda path, _: not path.startswith("turn_rows")])


def write_adapter_dir(directory: Path, setup: RunSetup, num_layers: int, weights: dict, turn) -> None:
    config = adapter_config(setup.lora, num_layers, setup.model_dir, turn is not None)
    save_adapters(directory, weights, config, turn)


def copy_adapter_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def read_metrics(work: Path) -> list[dict]:
    """The run's metrics.jsonl records, each checked (state.MetricsRecord); a damaged line names itself."""
    path = work / METRICS_FILE
    if not path.is_file():
        return []
    return [as_dict(record) for record in load_state_lines(path, MetricsRecord)]
