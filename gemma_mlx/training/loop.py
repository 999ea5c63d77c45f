"""The stepping loop, readable top to bottom: epochs of batches, validation, early stopping, Ctrl-C
and NaN handling, progress. It only steps.

What it steps comes in from outside (`Parts`): the trainee, its tokenizer and an *objective*,
which plans the batches, gives the loss and the validation numbers (sft.SupervisedObjective,
dpo.PreferenceObjective). What it keeps on disk is the checkpointer's (checkpoint.py): position,
best/last adapters, optimizer state and metrics, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .checkpoint import Checkpointer, Position, Snapshot, is_better  # noqa: F401  (Position, Snapshot: public)
from .sft import VALIDATION_PROMPTS, Parts, evaluate, selection_score, steps_per_epoch, supervised_parts  # noqa: F401
from .trainee import count_parameters
from .validation import OnTopic, greedy_validation, measures_on_topic

from ..adapters import ADAPTERS_FILE, read_turn_tokens
from ..distributed import all_sum, lost_peer, shard, sum_numbers, world
from ..backend import machine_memory
from ..errors import TrainingError
from ..manifest import quiet
from ..text import plural
from .setup import LAST_DIR, LAST_GOOD_DIR, RunSetup, make_optimizer, write_adapter_dir

FEW_EXAMPLES = 20  # below this many training examples the header warns

# mx.compile for the training step. Off: length-bucketed batches give almost every step a new
# shape, so a compiled step retraces nearly every time; scripts/bench_train.py --compile measured
# no gain per epoch (0.56x vs 0.53x mlx-lm's time) and 20% more peak memory.
COMPILE_STEP = False


@dataclass(frozen=True)
class StepReport:
    """What TrainingCallback.on_step hears after every training step."""

    epoch: int  # 1-based
    step: int
    loss: float
    tokens: int
    examples: int
    seconds: float


class TrainingCallback:
    """Hooks the loop calls, as mlx-lm's TrainingCallback has: subclass and override what you need.

    Raising KeyboardInterrupt from a hook acts like Ctrl-C (the state is saved, the run can resume).
    """

    def on_step(self, report: StepReport) -> None:
        """After every training step."""

    def on_validation(self, record: dict) -> None:
        """After every validation, with the record written to metrics.jsonl."""


class Reporter:
    """A live single-line status on a terminal (stderr), plain report lines everywhere else."""

    def __init__(self, progress, live: bool | None = None):
        self.progress = progress
        self.live = sys.stderr.isatty() if live is None else live
        self.width = 0

    def message(self, text: str) -> None:
        self.end_line()
        self.progress(text)

    def status(self, text: str, report: bool, done: float = 0.0) -> None:
        if self.live:
            filled = round(20 * min(max(done, 0.0), 1.0))
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {text}"  # the bar is for eyes, not for logs
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)
        elif report:
            self.progress(text)

    def end_line(self) -> None:
        if self.live and self.width:
            sys.stderr.write("\n")
            self.width = 0


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, the way a person reads an ETA."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _split_trainable(flat: dict) -> tuple[dict, object]:
    """Trainee weights -> (mlx-lm adapter weights, turn rows or None)."""
    weights = {k[len("lm."):]: v for k, v in flat.items() if k.startswith("lm.")}
    return weights, flat.get("turn_rows")


def plain_adapter_io(setup: RunSetup, trainee, num_layers: int):
    """(save_dir, load_flat) for mlx-lm's adapter layout plus our turn-token rows."""

    def save_dir(directory, flat: dict) -> None:
        weights, rows = _split_trainable(flat)
        turn = (list(trainee.turn_ids), rows) if rows is not None else None
        write_adapter_dir(directory, setup, num_layers, weights, turn)

    def load_flat(directory) -> list:
        weights = [(f"lm.{k}", v) for k, v in mx.load(str(directory / ADAPTERS_FILE)).items()]
        turn = read_turn_tokens(directory)
        if turn is not None:
            weights.append(("turn_rows", turn[1]))
        return weights

    return save_dir, load_flat


class Run:
    """One training run's mutable pieces; methods are the loop's steps."""

    def __init__(self, setup: RunSetup, parts: Parts, resume_state: dict | None, reporter: Reporter,
                 callback: TrainingCallback | None, on_topic: OnTopic | None = None):
        self.setup, self.callback, self.on_topic = setup, callback or TrainingCallback(), on_topic
        self.world = world()
        self.reporter, self.say = reporter, reporter.message
        self.trainee, self.tokenizer, self.objective = parts.trainee, parts.tokenizer, parts.objective
        self.num_layers = parts.num_layers
        plain_save, plain_load = plain_adapter_io(setup, self.trainee, self.num_layers)
        self.checkpoints = Checkpointer(setup.work, setup.identity, self.world, parts.save_dir or plain_save,
                                        parts.load_flat or plain_load, self.say)
        self.steps_per_epoch = steps_per_epoch(self.objective.train_count, setup.train.batch_size)
        self.total_steps = self.steps_per_epoch * setup.train.epochs
        self.optimizer = make_optimizer(setup.train, self.total_steps, turn_rows=setup.turn_tokens)
        self.optimizer.init(self.trainee.trainable_parameters())
        if resume_state is not None:
            self.checkpoints.restore(resume_state, self.trainee, self.optimizer)
            self.say(f"resuming at epoch {self.position.epoch + 1}, step {self.position.step}/{self.total_steps}")
        self.report_every = max(1, math.ceil(self.steps_per_epoch / 10))
        self.step_fn = self._make_step()
        self._commit()
        self.good = self.committed.weights  # weights whose loss was finite (kept if the loss blows up)
        self.measured = {"padding": 0.0, "estimate": {"total": 0}}

    @property
    def position(self) -> Position:
        return self.checkpoints.position

    @property
    def committed(self) -> Snapshot:
        return self.checkpoints.committed

    def _commit(self) -> None:
        self.checkpoints.commit(self.trainee, self.optimizer)

    def save_resume_state(self) -> None:
        self.checkpoints.save_resume_state()

    def _make_step(self):
        trainee, optimizer = self.trainee, self.optimizer
        loss_and_grad = nn.value_and_grad(trainee, self.objective.loss)

        def step(arrays, normalizer: float):
            """One optimizer step on this rank's slice (`arrays`, None when it is empty) of a global batch.

            Each rank's loss is its slice's sum over the global batch's count, so summing losses and
            gradients over the ranks gives exactly the one-process mean (a no-op with one process).
            """
            if arrays is None:
                loss = mx.array(0.0)
                grads = tree_map(mx.zeros_like, trainee.trainable_parameters())
            else:
                (loss, _), grads = loss_and_grad(trainee, *arrays, normalizer=normalizer)
            loss, grads = all_sum(loss), all_sum(grads)
            optimizer.update(trainee, grads)
            return loss

        if not COMPILE_STEP:
            return step
        state = [trainee.state, optimizer.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    # ----- the loop -------------------------------------------------------------------------
    def header(self) -> None:
        s, train = self.setup, self.setup.train
        noun, count, valid = self.objective.counts()
        self.measured = self.objective.measure(self.trainee, self.num_layers)
        total = f"{plural(train.epochs, 'epoch')} = {plural(self.total_steps, 'step')}, " if train.epochs != 1 else ""
        self.say(f"{plural(count, noun)}, 1 epoch = {plural(self.steps_per_epoch, 'step')} of "
                 f"{plural(train.batch_size, noun)}, {total}padding {self.measured['padding']:.1%}")
        trainable = count_parameters(self.trainee.trainable_parameters())
        total = count_parameters(self.trainee.lm.parameters())
        rows = " + turn-token rows" if s.turn_tokens else ""
        self.say(f"{s.model_dir.name} ({s.flavour}): {s.lora.fine_tune_type} on the last {self.num_layers} layers{rows}, "
                 f"{trainable / 1e6:.3f}M of {total / 1e6:.1f}M parameters trainable; "
                 f"{plural(valid, 'validation ' + noun)}")
        if train.warmup_steps >= self.total_steps:
            self.say(f"warning: warmup_steps {train.warmup_steps} is not shorter than the run ({plural(self.total_steps, 'step')}), "
                     f"so the learning rate never reaches {train.learning_rate:g}; lower warmup_steps")
        if noun == "example" and count < FEW_EXAMPLES:
            self.say(f"warning: only {plural(count, 'training ' + noun)}; a persona is learned from dozens (the shipped "
                     "Bluey set has 133), and a model trained on a handful repeats them")
        if not valid:
            self.say(f"warning: no validation {noun}s, so nothing chooses between epochs (the last adapters are kept) "
                     "and nothing is measured on held-out data; give a valid.jsonl beside train.jsonl, or a file or "
                     "folder without train.jsonl to have a validation set split off")
        for line in self.measured["lines"]:
            self.say(line)
        machine, needed = machine_memory(), self.measured["estimate"]["total"]
        if s.memory_check and machine and needed > machine:  # stop now, not when the OS kills the run mid-epoch
            raise TrainingError(f"This run needs about {needed / 1e9:.1f} GB of memory and the machine has "
                                f"{machine / 1e9:.1f} GB, so it stops before the first step. Lower lora.rank, "
                                "train.batch_size or train.max_seq_length (or set train.grad_checkpoint: true); "
                                "--no-memory-check trains anyway.")

    def validate(self) -> float | None:
        """Validation numbers now; keeps the best adapters; counts toward early stopping."""
        p = self.position
        if not self.objective.has_validation or p.validated_step == p.step:
            return None
        fields, tokens, seconds, mark = self.objective.validate(self.trainee)
        generated = self.generate_validation()
        loss = fields["loss"]
        epoch = round(p.step / self.steps_per_epoch, 4)
        record = {"epoch": epoch, "step": p.step, "split": "valid", **fields, **generated,
                  "tokens_per_second": tokens / seconds if seconds else 0.0,
                  "peak_memory_gb": mx.get_peak_memory() / 1e9, "learning_rate": self.learning_rate()}
        self.checkpoints.log(record)
        p.last_val_loss = loss
        p.last_val_end_p = fields.get("end_p")
        p.validated_step = p.step
        score = self.objective.score(record)
        best_by = self.setup.train.best_by
        if is_better(score, p.best_score, best_by):
            improved = p.best_score is None or score > p.best_score
            p.best_val_loss, p.best_score, p.best_epoch, p.best_step = loss, score, epoch, p.step
            p.bad_validations = 0 if improved else p.bad_validations + 1
            self.checkpoints.save_best(self.trainee)
            mark += " (best so far, saved)"
        else:
            p.bad_validations += 1
        if generated:
            ratio = generated["gen_words_vs_valid"]
            mark = (f", greedy replies: {generated['gen_clean']}/{generated['gen_replies']} clean "
                    f"({generated['gen_stops']} stopped, {plural(generated['gen_loops'], 'loop')}, "
                    f"{plural(round(generated['gen_mean_words']), 'word')}"
                    + (f", {ratio:.2f}x the validation replies'" if ratio is not None else "")
                    + (f", {generated['gen_on_topic']} on topic" if "gen_on_topic" in generated else "")
                    + f"), score {generated['gen_score']:.2f}") + mark
        self.say(f"epoch {epoch:.2f} step {p.step}/{self.total_steps}: validation loss {loss:.4f}{mark}")
        self.callback.on_validation(record)
        patience = self.setup.train.early_stopping_patience
        if patience and p.bad_validations >= patience:
            p.stopped_early = True
        self._commit()
        self.save_resume_state()  # a hard kill (SIGKILL, power) loses at most one validation interval
        return loss

    def generate_validation(self) -> dict:
        """Greedy replies to the validation prompts and what a reader would measure of them (validation.py)."""
        return greedy_validation(self, self.on_topic)

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.item())

    def train_step(self, batch, indices: list[int]) -> float:
        """Train on one global batch (`batch`, from `indices`); under mlx.launch each rank on its slice."""
        p, seed = self.position, self.setup.train.seed
        mx.random.seed(seed * 1_000_003 + p.step)  # dropout: the same masks on resume
        normalizer = self.objective.normalizer(batch)
        mine = indices if not self.world.distributed else shard(indices, self.world)
        local = batch if mine is indices else (self.objective.batch(mine) if mine else None)
        loss = self.step_fn(self.objective.arrays(local) if local is not None else None, normalizer)
        mx.eval(loss, self.trainee.trainable_parameters(), self.optimizer.state)
        value = loss.item()
        if math.isfinite(value):
            self.good = self.committed.weights
        else:
            # keep what was saved (the last validation's adapters and resume state) and the last good step's
            self.checkpoints.save_adapters(self.setup.work / LAST_GOOD_DIR, self.good)
            raise TrainingError(
                f"The training loss became {value} at step {p.step + 1} (epoch {p.epoch + 1}), so training stopped. "
                f"Nothing saved was deleted: the last good step's adapters are in {self.setup.work / LAST_GOOD_DIR}, "
                f"the best so far in {self.setup.work}. Lower the learning rate (now "
                f"{self.setup.train.learning_rate:g}; try {self.setup.train.learning_rate / 10:g}) and run again "
                "with --force, which starts over (move that directory away first to keep its adapters)."
            )
        return value

    def run(self) -> None:
        p, train = self.position, self.setup.train
        every = train.val_every_steps
        window_loss = window_tokens = 0.0
        if p.step and every and p.step % every == 0:
            self.validate()  # interrupted during this validation; a no-op when it finished
        while p.epoch < train.epochs and not p.stopped_early:
            plan = self.objective.plan_epoch(p.epoch)
            while p.step_in_epoch < len(plan) and not p.stopped_early:
                started = time.perf_counter()
                batch = self.objective.batch(plan[p.step_in_epoch])
                loss = self.train_step(batch, plan[p.step_in_epoch])
                elapsed = time.perf_counter() - started
                p.step += 1
                p.step_in_epoch += 1
                p.trained_tokens += batch.tokens
                p.examples_seen += batch.examples
                p.train_seconds += elapsed
                p.first_loss = loss if p.first_loss is None else p.first_loss
                p.last_loss = loss
                self._commit()
                window_loss += loss * batch.trained_tokens
                window_tokens += batch.trained_tokens
                report = p.step % self.report_every == 0 or p.step_in_epoch == len(plan)
                shown = loss
                if report:  # report lines show the mean loss per trained token since the last report
                    shown = window_loss / window_tokens
                    self.checkpoints.log({"epoch": round(p.step / self.steps_per_epoch, 4), "step": p.step,
                                          "split": "train", "loss": shown,
                                          "tokens_per_second": p.trained_tokens / p.train_seconds,
                                          "peak_memory_gb": mx.get_peak_memory() / 1e9,
                                          "learning_rate": self.learning_rate()})
                    window_loss = window_tokens = 0.0
                self.reporter.status(self.status_line(shown), report, done=p.step / max(self.total_steps, 1))
                self.callback.on_step(StepReport(p.epoch + 1, p.step, loss, batch.tokens, batch.examples, elapsed))
                if every and p.step % every == 0 and p.step_in_epoch < len(plan):
                    self.validate()
            if p.stopped_early:
                break
            p.epoch += 1
            p.step_in_epoch = 0
            self.validate()
        if p.stopped_early:
            self.say(f"early stopping: no validation improvement in {train.early_stopping_patience} validations")

    def status_line(self, loss: float) -> str:
        p = self.position
        val = f"{p.last_val_loss:.4f}" if p.last_val_loss is not None else "-"
        if p.last_val_end_p is not None:
            val += f" p(end) {p.last_val_end_p:.2f}"
        rate = p.trained_tokens / p.train_seconds if p.train_seconds else 0.0
        eta = (self.total_steps - p.step) * p.train_seconds / max(p.step, 1)
        return (f"epoch {p.epoch + 1}/{self.setup.train.epochs} step {p.step}/{self.total_steps} loss {loss:.4f} "
                f"val {val} {rate:.0f} tok/s peak {mx.get_peak_memory() / 1e9:.2f} GB ETA {clock(eta)}")

    def summary(self) -> dict:
        p = self.position
        _, count, valid = self.objective.counts()
        return {
            "epochs": self.setup.train.epochs,
            "epochs_completed": p.epoch,
            "steps": p.step,
            "steps_per_epoch": self.steps_per_epoch,
            "train_examples": count,
            "valid_examples": valid,
            "examples_seen": p.examples_seen,
            "trained_tokens": p.trained_tokens,
            "train_seconds": round(p.train_seconds, 3),
            "tokens_per_second": round(p.trained_tokens / p.train_seconds, 2) if p.train_seconds else 0.0,
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            "memory_estimate_gb": round(self.measured["estimate"]["total"] / 1e9, 4),
            "padding_fraction": round(self.measured["padding"], 4),
            "first_loss": p.first_loss,
            "final_loss": p.last_loss,
            "best_val_loss": p.best_val_loss,
            "best_by": self.setup.train.best_by,
            "train_reply_words": getattr(self.objective, "train_reply_words", None),
            "valid_reply_words": getattr(self.objective, "valid_reply_words", None),
            "on_topic_in_score": measures_on_topic(self.setup, self.on_topic),
            "best_score": p.best_score,
            "best_epoch": p.best_epoch,
            "best_step": p.best_step,
            "final_val_loss": p.last_val_loss,
            "stopped_early": p.stopped_early,
            "turn_tokens_trained": self.setup.turn_tokens,
            "flavour": self.setup.flavour,
            "objective": self.objective.name,
        }

    def finish(self) -> None:
        self.checkpoints.finish(self.trainee)


def run_training(setup: RunSetup, resume_state: dict | None, progress, callback,
                 resume_hint: str = "continue with the same command plus --resume", build=None,
                 on_topic: OnTopic | None = None) -> tuple[dict, str]:
    """Train the parts `build(setup, say)` makes (default: supervised); return (summary, "trained" | "interrupted").

    on_topic: scores whether greedy validation replies answer their message (validation.OnTopic); with
    best_by: score it joins the score (scored by the trainee with its LoRA off, the base model)."""
    if not world().main:
        progress = None  # rank 0 reports for everyone
    reporter = Reporter(progress or quiet, live=False if progress is None else None)
    try:
        parts = (build or supervised_parts)(setup, reporter.message)
        run = Run(setup, parts, resume_state, reporter, callback, on_topic)
        run.header()  # may stop a run that cannot fit, before its first step
    except BaseException:
        # a fresh run that failed to start (bad data, bad num_layers, Ctrl-C while loading) has saved
        # nothing: leave no empty work dir for the next run to report as "unfinished"
        if resume_state is None and world().main:
            shutil.rmtree(setup.work, ignore_errors=True)
        raise
    try:
        run.run()
        run.finish()
    except OSError as error:  # a full disk while saving: what was saved before stays, resumable
        run.reporter.end_line()
        raise TrainingError(
            f"Saving the training run in {setup.work} failed ({error.strerror or error}) at step {run.position.step}. "
            f"What was saved at the last validation is still there: free some space, then {resume_hint}."
        ) from None
    except Exception as error:
        run.reporter.end_line()  # the error's message starts on a line of its own, not after the live status
        if not lost_peer(error):
            raise
        # another rank stopped (Ctrl-C, an error, a kill): keep the last complete step, as on Ctrl-C
        run.save_resume_state()
        p = run.committed.position
        run.say(f"another rank stopped at epoch {p.epoch + 1}, step {p.step}/{run.total_steps}; the current adapters "
                f"are in {setup.work / LAST_DIR}; {resume_hint}")
        return run.summary(), "interrupted"
    except KeyboardInterrupt:
        run.save_resume_state()
        p = run.committed.position
        run.say(f"interrupted at epoch {p.epoch + 1}, step {p.step}/{run.total_steps}: the current adapters are in "
                f"{setup.work / LAST_DIR}; {resume_hint}")
        return run.summary(), "interrupted"
    run.reporter.message(f"trained {run.position.step} steps in {run.position.train_seconds:.1f}s")
    return run.summary(), "trained"
