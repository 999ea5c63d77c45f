"""What a run keeps on disk: its position, best/ and last/ adapters, the optimizer state, metrics.jsonl.

The stepping loop (loop.py) moves the position on and asks the checkpointer to remember, save and
restore; the checkpointer knows nothing about what is being optimized. Only the state that survives
a step (`Position`) is saved for resume; the data order of every epoch is a pure function of
(seed, epoch) and dropout is seeded per step, so a resumed run sees exactly the batches and
randomness the uninterrupted one would have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..adapters import save_safetensors
from ..distributed import broadcast_tree
from ..errors import TrainingError
from ..manifest import write_json
from ..state import MetricsRecord, as_dict, load_state_lines
from .setup import LAST_DIR, METRICS_FILE, OPTIMIZER_FILE, RESUME_FILE, copy_adapter_files


@dataclass
class Position:
    """Where the run stands after the last completed step (saved in resume_state.json)."""

    epoch: int = 0  # index of the current epoch (0-based)
    step_in_epoch: int = 0  # batches of this epoch already trained
    step: int = 0  # steps trained in total
    trained_tokens: int = 0  # real (unpadded) input tokens of the trained batches, not only the loss positions
    examples_seen: int = 0
    train_seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    best_val_loss: float | None = None  # the validation loss of the kept ("best") adapters
    best_score: float | None = None  # what best_by ranks: the clean-ending rate, or minus the loss
    best_epoch: float | None = None
    best_step: int | None = None
    last_val_loss: float | None = None
    last_val_end_p: float | None = None  # mean p(<end_of_turn>) at the validation reply ends
    bad_validations: int = 0
    stopped_early: bool = False
    validated_step: int = 0  # the step of the last validation (a resumed run repeats a missed one)


@dataclass
class Snapshot:
    """The last completed step: trainable weights and optimizer state (references, no copies) and the
    position. Ctrl-C at any moment saves this consistent state, never a half-updated one."""

    weights: dict
    optimizer_state: object
    position: Position


def is_better(score: float, best: float | None, best_by: str) -> bool:
    """A higher score wins; for "stops" a tie goes to the later validation (it trained longer)."""
    if best is None:
        return True
    return score > best or (best_by != "loss" and score == best)


class Checkpointer:
    """Resume, best/last adapters and metrics of one run in its work dir (rank 0 writes everything).

    `save_dir(directory, flat)` writes one adapter directory from the trainee's flat trainable
    weights; `load_flat(directory)` reads one back as the trainee's (name, array) pairs. The
    objective's run supplies both, so the checkpointer never needs to know the adapter layout.
    """

    def __init__(self, work, identity: dict, world, save_dir, load_flat, say):
        self.work, self.identity, self.world = work, identity, world
        self.save_dir, self.load_flat, self.say = save_dir, load_flat, say
        self.position = Position()
        self.committed: Snapshot | None = None

    # ----- remembering ----------------------------------------------------------------------
    def commit(self, trainee, optimizer) -> None:
        """Remember the last completed step: weights and optimizer state (references, no copies)
        and the position, so Ctrl-C at any moment saves a consistent state."""
        self.committed = Snapshot(dict(tree_flatten(trainee.trainable_parameters())),
                                  tree_map(lambda x: x, optimizer.state), replace(self.position))

    # ----- saving ---------------------------------------------------------------------------
    def save_adapters(self, directory, flat: dict) -> None:
        if self.world.main:
            self.save_dir(directory, flat)

    def save_best(self, trainee) -> None:
        self.save_adapters(self.work, dict(tree_flatten(trainee.trainable_parameters())))

    def save_resume_state(self) -> None:
        if not self.world.main:
            return
        flat, opt_state, position = self.committed.weights, self.committed.optimizer_state, self.committed.position
        self.save_adapters(self.work / LAST_DIR, flat)
        save_safetensors(self.work / OPTIMIZER_FILE, dict(tree_flatten(opt_state)))
        write_json(self.work / RESUME_FILE, {"identity": self.identity, "position": asdict(position)})

    def log(self, record: dict) -> None:
        if not self.world.main:
            return
        with open(self.work / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, trainee) -> None:
        """last/ holds the final weights; without validation the final weights are also the best."""
        self.save_adapters(self.work / LAST_DIR, dict(tree_flatten(trainee.trainable_parameters())))
        if self.position.best_score is None and self.world.main:
            copy_adapter_files(self.work / LAST_DIR, self.work)

    # ----- resuming -------------------------------------------------------------------------
    def restore(self, state: dict, trainee, optimizer) -> Position:
        """Rank 0 reads the saved adapters and optimizer state; the other ranks receive them."""
        work = self.work
        if not self.world.main:
            trainee.load_weights(broadcast_tree(None), strict=False)
            optimizer.state = tree_unflatten(broadcast_tree(None))
            self.position = Position(**state["position"])
            return self.position
        try:
            trainee.load_weights(self.load_flat(work / LAST_DIR), strict=False)
            optimizer.state = tree_unflatten(list(mx.load(str(work / OPTIMIZER_FILE)).items()))
            mx.eval(trainee.trainable_parameters(), optimizer.state)
            if self.world.distributed:
                broadcast_tree(trainee.trainable_parameters())
                broadcast_tree(optimizer.state)
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise TrainingError(
                f"The saved state in {work} cannot be resumed ({' '.join(str(error).split())}): a file is missing, "
                "damaged or from another model. Start over with --force (it discards that run), or move the "
                "directory away to keep its adapters."
            ) from None
        self.position = p = Position(**state["position"])
        self._drop_later_metrics(p)
        return p

    def _drop_later_metrics(self, p: Position) -> None:
        """Drop reports made after the saved state (e.g. a validation that Ctrl-C cut short)."""
        metrics = self.work / METRICS_FILE
        if metrics.is_file():
            records = [as_dict(r) for r in load_state_lines(metrics, MetricsRecord, last_may_be_cut=True)]
            kept = [r for r in records if r["step"] <= (p.step if r["split"] == "train" else p.validated_step)]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
