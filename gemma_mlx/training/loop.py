"""The training loop, readable top to bottom: epochs of length-bucketed batches, validation,
best/last adapters, early stopping, Ctrl-C and NaN handling, progress.

Only the state that survives a step (`Position`) is saved for resume; the data order of every
epoch is a pure function of (seed, epoch) and dropout is seeded per step, so a resumed run sees
exactly the batches and randomness the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import batching
from .trainee import (
    count_parameters,
    estimate_memory,
    loss_fn,
    loss_weights,
    prepare,
    resolve_num_layers,
    turn_rows_in_model,
    validation_sums,
)

from .. import models
from ..adapters import ADAPTERS_FILE, read_turn_tokens, save_safetensors
from ..backend import machine_memory
from ..chat_format import END_OF_TURN_ID
from ..distributed import all_sum, broadcast_tree, lost_peer, shard, sum_numbers, world
from ..errors import TrainingError
from ..manifest import quiet, write_json
from .setup import (
    LAST_DIR,
    LAST_GOOD_DIR,
    METRICS_FILE,
    OPTIMIZER_FILE,
    RESUME_FILE,
    RunSetup,
    copy_adapter_files,
    make_optimizer,
    write_adapter_dir,
)

VALIDATION_PROMPTS = 16  # validation prompts answered at each validation (when val_generation_tokens > 0)
# mx.compile for the training step. Off: length-bucketed batches give almost every step a new
# shape, so a compiled step retraces nearly every time; scripts/bench_train.py --compile measured
# no gain per epoch (0.56x vs 0.53x mlx-lm's time) and 20% more peak memory.
COMPILE_STEP = False


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




def tokenize_split(tokenizer, examples, setup: RunSetup, say) -> list[batching.Sequence]:
    sequences = [batching.tokenize_example(tokenizer, e, setup.train.response_only, setup.train.max_seq_length) for e in examples]
    truncated = [s.source for s in sequences if s.truncated]
    if truncated:
        say(f"warning: {len(truncated)} examples are longer than max_seq_length {setup.train.max_seq_length} "
            f"tokens and were cut (first: {truncated[0]}); raise train.max_seq_length to keep them whole")
    empty = [s for s in sequences if s.trained_tokens == 0]
    if empty:
        say(f"warning: {len(empty)} examples have no reply tokens left to learn from (first: {empty[0].source}); skipped")
    return [s for s in sequences if s.trained_tokens > 0]


def _arrays(batch: batching.Batch, end_of_turn_weight: float = 1.0):
    arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets))
    if end_of_turn_weight == 1.0:
        return arrays
    return (*arrays, mx.array(loss_weights(batch.targets, end_of_turn_weight)))


def evaluate(trainee, sequences, batch_size: int, unused_ids: list[int] = ()) -> dict:
    """Validation numbers over a split, without dropout (and without any loss weighting).

    loss: mean loss per trained token. At the reply ends (where <end_of_turn> is the target):
    end_p, mean p(<end_of_turn>); end_top1, the share where it is the most likely token;
    end_unused_mass, the mean probability on <unusedN> tokens. Also tokens and seconds.
    Under mlx.launch each rank evaluates every n-th batch and the sums are added up.
    """
    import numpy as np

    trainee.eval()
    started = time.perf_counter()
    unused = mx.array(list(unused_ids), dtype=mx.int32)
    totals = {"loss": 0.0, "count": 0, "end_p": 0.0, "end_top1": 0.0, "end_unused_mass": 0.0, "ends": 0}
    here = world()
    for number, indices in enumerate(batching.plan_sorted([len(s) for s in sequences], batch_size)):
        if number % here.size != here.rank:
            continue
        batch = batching.make_batch(sequences, indices)
        ends = mx.array(np.nonzero(batch.targets == END_OF_TURN_ID)[0].astype(np.int32))
        sums = validation_sums(trainee, *_arrays(batch), ends, unused)
        for key, value in sums.items():
            totals[key] += value.item() if isinstance(value, mx.array) else value
    trainee.train()
    totals = sum_numbers(totals)
    ends = max(totals["ends"], 1)
    return {
        "loss": totals["loss"] / max(totals["count"], 1),
        "tokens": totals["count"],
        "seconds": time.perf_counter() - started,
        "end_p": totals["end_p"] / ends if totals["ends"] else None,
        "end_top1": totals["end_top1"] / ends if totals["ends"] else None,
        "end_unused_mass": totals["end_unused_mass"] / ends if totals["ends"] else None,
    }


def plural(count: int, noun: str) -> str:
    """ "1 example", "2 examples": the header's numbers read as English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, the way a person reads an ETA."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def selection_score(record: dict, best_by: str) -> float:
    """What ranks validations for the "best" adapters (higher is better).

    stops: the share of greedy validation replies that ended by themselves without looping (the
    teacher-forced <end_of_turn> top-1 rate when generation is off). Measured on the real 270M
    base: validation loss is lowest after epoch 1, where greedy replies loop, and rises while the
    replies learn to end and gain the voice; so the loss alone picks the wrong checkpoint.
    loss: minus the validation loss.
    """
    if best_by == "loss":
        return -record["loss"]
    if "gen_clean_rate" in record:
        return record["gen_clean_rate"]
    return record["end_top1"] if record.get("end_top1") is not None else -record["loss"]


def is_better(score: float, best: float | None, best_by: str) -> bool:
    """A higher score wins; for "stops" a tie goes to the later validation (it trained longer)."""
    if best is None:
        return True
    return score > best or (best_by != "loss" and score == best)


def _split_trainable(flat: dict) -> tuple[dict, object]:
    """Trainee weights -> (mlx-lm adapter weights, turn rows or None)."""
    weights = {k[len("lm."):]: v for k, v in flat.items() if k.startswith("lm.")}
    return weights, flat.get("turn_rows")


class Run:
    """One training run's mutable pieces; methods are the loop's steps."""

    def __init__(self, setup: RunSetup, resume_state: dict | None, progress, callback: TrainingCallback | None):
        self.setup, self.callback = setup, callback or TrainingCallback()
        self.world = world()
        if not self.world.main:
            progress = None  # rank 0 reports for everyone
        self.reporter = Reporter(progress or quiet, live=False if progress is None else None)
        self.say = self.reporter.message
        from ..examples import load_splits

        splits = load_splits(setup.data, seed=setup.train.seed)
        if not splits.train:
            raise TrainingError(f"{setup.data} has no training examples. Add examples, or check the path.")
        lm, tokenizer = models.load(setup.model_dir)
        self.tokenizer = tokenizer
        self.train_seqs = tokenize_split(tokenizer, splits.train, setup, self.say)
        self.valid_seqs = tokenize_split(tokenizer, splits.valid, setup, self.say)
        # the conversations up to their last reply: what validation generation answers
        self.valid_prompts = [e.messages[:-1] for e in splits.valid if e.messages][:VALIDATION_PROMPTS]
        if not self.train_seqs:
            raise TrainingError(f"None of the training examples in {setup.data} has reply tokens to learn from "
                                f"within train.max_seq_length ({setup.train.max_seq_length} tokens). Raise it, or check the data.")
        from ..flavour import unused_token_ids

        self.unused_ids = unused_token_ids(setup.model_dir)
        mx.random.seed(setup.train.seed)  # LoRA initialisation
        turn_init = setup.lora.turn_token_init if setup.flavour == "pt" else "keep"  # an -it row is trained already
        self.trainee = prepare(lm, setup.lora, setup.turn_tokens, setup.train.grad_checkpoint, turn_init)
        self.num_layers = resolve_num_layers(setup.lora, lm)
        self.lengths = [len(s) for s in self.train_seqs]
        batch = setup.train.batch_size
        self.steps_per_epoch = math.ceil(len(self.train_seqs) / batch)
        self.total_steps = self.steps_per_epoch * setup.train.epochs
        self.optimizer = make_optimizer(setup.train, self.total_steps, turn_rows=setup.turn_tokens)
        self.optimizer.init(self.trainee.trainable_parameters())
        self.position = Position()
        if resume_state is not None:
            self._restore(resume_state)
        self.report_every = max(1, math.ceil(self.steps_per_epoch / 10))
        self.step_fn = self._make_step()
        self._commit()
        self.good = self.committed.weights  # weights whose loss was finite (kept if the loss blows up)

    # ----- set-up helpers -------------------------------------------------------------------
    def _make_step(self):
        trainee, optimizer = self.trainee, self.optimizer
        loss_and_grad = nn.value_and_grad(trainee, loss_fn)

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

    def _restore(self, state: dict) -> None:
        """Rank 0 reads the saved adapters and optimizer state; the other ranks receive them."""
        work = self.setup.work
        if not self.world.main:
            self.trainee.load_weights(broadcast_tree(None), strict=False)
            self.optimizer.state = tree_unflatten(broadcast_tree(None))
            self.position = Position(**state["position"])
            return
        try:
            saved = mx.load(str(work / LAST_DIR / ADAPTERS_FILE))
            weights = [(f"lm.{k}", v) for k, v in saved.items()]
            turn = read_turn_tokens(work / LAST_DIR)
            if turn is not None:
                weights.append(("turn_rows", turn[1]))
            self.trainee.load_weights(weights, strict=False)
            self.optimizer.state = tree_unflatten(list(mx.load(str(work / OPTIMIZER_FILE)).items()))
            mx.eval(self.trainee.trainable_parameters(), self.optimizer.state)
            if self.world.distributed:
                broadcast_tree(self.trainee.trainable_parameters())
                broadcast_tree(self.optimizer.state)
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise TrainingError(
                f"The saved state in {work} cannot be resumed ({' '.join(str(error).split())}): a file is missing, "
                "damaged or from another model. Start over with --force (it discards that run), or move the "
                "directory away to keep its adapters."
            ) from None
        self.position = p = Position(**state["position"])
        # drop reports made after the saved state (e.g. a validation that Ctrl-C cut short)
        metrics = work / METRICS_FILE
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            kept = [r for r in records if r["step"] <= (p.step if r["split"] == "train" else p.validated_step)]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.say(f"resuming at epoch {self.position.epoch + 1}, step {self.position.step}/{self.total_steps}")

    def _commit(self) -> None:
        """Remember the last completed step: weights and optimizer state (references, no copies)
        and the position, so Ctrl-C at any moment saves a consistent state."""
        self.committed = Snapshot(dict(tree_flatten(self.trainee.trainable_parameters())),
                                  tree_map(lambda x: x, self.optimizer.state), replace(self.position))

    # ----- saving ---------------------------------------------------------------------------
    def _save_adapters(self, directory, flat: dict) -> None:
        if not self.world.main:  # rank 0 writes every output
            return
        weights, rows = _split_trainable(flat)
        turn = (list(self.trainee.turn_ids), rows) if rows is not None else None
        write_adapter_dir(directory, self.setup, self.num_layers, weights, turn)

    def save_resume_state(self) -> None:
        if not self.world.main:
            return
        flat, opt_state, position = self.committed.weights, self.committed.optimizer_state, self.committed.position
        work = self.setup.work
        self._save_adapters(work / LAST_DIR, flat)
        save_safetensors(work / OPTIMIZER_FILE, dict(tree_flatten(opt_state)))
        write_json(work / RESUME_FILE, {"identity": self.setup.identity, "position": asdict(position)})

    def log(self, record: dict) -> None:
        if not self.world.main:
            return
        with open(self.setup.work / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ----- the loop -------------------------------------------------------------------------
    def header(self) -> None:
        s, train = self.setup, self.setup.train
        plan = batching.plan_epoch(self.lengths, train.batch_size, train.seed, 0)
        self.padding = batching.padding_fraction(self.lengths, plan)
        self.say(f"{plural(len(self.train_seqs), 'example')}, 1 epoch = {plural(self.steps_per_epoch, 'step')} of "
                 f"{plural(train.batch_size, 'example')}, "
                 f"{plural(train.epochs, 'epoch')} = {plural(self.total_steps, 'step')}, padding {self.padding:.1%}")
        trainable = count_parameters(self.trainee.trainable_parameters())
        total = count_parameters(self.trainee.lm.parameters())
        rows = " + turn-token rows" if s.turn_tokens else ""
        self.say(f"{s.model_dir.name} ({s.flavour}): {s.lora.fine_tune_type} on the last {self.num_layers} layers{rows}, "
                 f"{trainable / 1e6:.3f}M of {total / 1e6:.1f}M parameters trainable; "
                 f"{len(self.valid_seqs)} validation examples")
        backward = len(self.trainee.lm.layers) if s.turn_tokens else self.num_layers
        longest = max(self.lengths)
        max_trained = max(sum(self.train_seqs[i].trained_tokens for i in b) for b in plan)
        estimate = estimate_memory(self.trainee, train.batch_size, longest, max_trained, backward,
                                          train.grad_checkpoint)
        machine = machine_memory()
        have = f" of {machine / 1e9:.1f} GB" if machine else ""
        self.say(f"memory estimate: {estimate['total'] / 1e9:.2f} GB{have} (weights {estimate['weights'] / 1e9:.2f}, "
                 f"activations {estimate['activations'] / 1e9:.2f}, logits {estimate['logits'] / 1e9:.2f})")
        if machine and estimate["total"] > machine:
            self.say(f"warning: this run may need more memory ({estimate['total'] / 1e9:.1f} GB) than the machine has "
                     f"({machine / 1e9:.1f} GB); lower train.batch_size or train.max_seq_length"
                     + ("" if train.grad_checkpoint else ", or set train.grad_checkpoint: true"))
        self.estimate = estimate

    def validate(self) -> float | None:
        """Validation loss now; keeps the best adapters; counts toward early stopping."""
        p = self.position
        if not self.valid_seqs or p.validated_step == p.step:
            return None
        result = evaluate(self.trainee, self.valid_seqs, self.setup.train.batch_size, self.unused_ids)
        generated = self.generate_validation()
        loss = result["loss"]
        epoch = round(p.step / self.steps_per_epoch, 4)
        record = {"epoch": epoch, "step": p.step, "split": "valid", "loss": loss,
                  "end_p": result["end_p"], "end_top1": result["end_top1"], "end_unused_mass": result["end_unused_mass"],
                  **generated,
                  "tokens_per_second": result["tokens"] / result["seconds"] if result["seconds"] else 0.0,
                  "peak_memory_gb": mx.get_peak_memory() / 1e9, "learning_rate": self.learning_rate()}
        self.log(record)
        p.last_val_loss = loss
        p.last_val_end_p = result["end_p"]
        p.validated_step = p.step
        score = selection_score(record, self.setup.train.best_by)
        if is_better(score, p.best_score, self.setup.train.best_by):
            improved = p.best_score is None or score > p.best_score
            p.best_val_loss, p.best_score, p.best_epoch, p.best_step = loss, score, epoch, p.step
            p.bad_validations = 0 if improved else p.bad_validations + 1
            self._save_adapters(self.setup.work, dict(tree_flatten(self.trainee.trainable_parameters())))
            mark = " (best so far, saved)"
        else:
            p.bad_validations += 1
            mark = ""
        if result["end_p"] is not None:
            mark = (f", reply ends: p(<end_of_turn>) {result['end_p']:.3f}, top-1 {result['end_top1']:.0%}, "
                    f"<unusedN> {result['end_unused_mass']:.4f}") + mark
        if generated:
            mark = (f", greedy replies: {generated['gen_clean']}/{generated['gen_replies']} clean "
                    f"({generated['gen_stops']} stopped, {generated['gen_loops']} loops, "
                    f"{generated['gen_mean_words']:.0f} words)") + mark
        self.say(f"epoch {epoch:.2f} step {p.step}/{self.total_steps}: validation loss {loss:.4f}{mark}")
        self.callback.on_validation(record)
        patience = self.setup.train.early_stopping_patience
        if patience and p.bad_validations >= patience:
            p.stopped_early = True
        self._commit()
        self.save_resume_state()  # a hard kill (SIGKILL, power) loses at most one validation interval
        return loss

    def generate_validation(self) -> dict:
        """Greedy replies to the validation prompts with the weights as they are now: how many end by
        themselves without looping. Teacher-forced numbers cannot show a loop; this can."""
        tokens = self.setup.train.val_generation_tokens
        if not tokens or not self.valid_prompts:
            return {}
        from ..config import GenerationSettings
        from ..generate import LoadedModel, generate_replies
        from ..text import is_loop, word_count

        prompts = self.valid_prompts[self.world.rank::self.world.size]  # each rank answers its share
        self.trainee.eval()
        try:
            with turn_rows_in_model(self.trainee):
                loaded = LoadedModel("validation", self.setup.model_dir, self.trainee.lm, self.tokenizer, None, None)
                # plain greedy, whatever the generation defaults: this measures the model, not the decoder
                plain = GenerationSettings(max_tokens=tokens, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)
                replies = generate_replies(loaded, prompts, plain) if prompts else []
        finally:
            self.trainee.train()
        counts = sum_numbers({"replies": len(replies), "stops": sum(not r.cut for r in replies),
                              "loops": sum(is_loop(r.text) for r in replies),
                              "clean": sum(not r.cut and not is_loop(r.text) for r in replies),
                              "words": sum(word_count(r.text) for r in replies)})
        n = int(counts["replies"])
        return {"gen_replies": n, "gen_stops": int(counts["stops"]), "gen_loops": int(counts["loops"]),
                "gen_clean": int(counts["clean"]), "gen_clean_rate": counts["clean"] / n, "gen_mean_words": counts["words"] / n}

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.item())

    def train_step(self, batch: batching.Batch, indices: list[int]) -> float:
        """Train on one global batch (`batch`, from `indices`); under mlx.launch each rank on its slice."""
        p, seed, weight = self.position, self.setup.train.seed, self.setup.train.end_of_turn_weight
        mx.random.seed(seed * 1_000_003 + p.step)  # dropout: the same masks on resume
        normalizer = float(loss_weights(batch.targets, weight).sum()) if weight != 1.0 else float(batch.trained_tokens)
        mine = indices if not self.world.distributed else shard(indices, self.world)
        local = batch if mine is indices else (batching.make_batch(self.train_seqs, mine) if mine else None)
        loss = self.step_fn(_arrays(local, weight) if local is not None else None, normalizer)
        mx.eval(loss, self.trainee.trainable_parameters(), self.optimizer.state)
        value = loss.item()
        if math.isfinite(value):
            self.good = self.committed.weights
        else:
            # keep what was saved (the last validation's adapters and resume state) and the last good step's
            if self.world.main:
                self._save_adapters(self.setup.work / LAST_GOOD_DIR, self.good)
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
            plan = batching.plan_epoch(self.lengths, train.batch_size, train.seed, p.epoch)
            while p.step_in_epoch < len(plan) and not p.stopped_early:
                started = time.perf_counter()
                batch = batching.make_batch(self.train_seqs, plan[p.step_in_epoch])
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
                    self.log({"epoch": round(p.step / self.steps_per_epoch, 4), "step": p.step, "split": "train",
                              "loss": shown, "tokens_per_second": p.trained_tokens / p.train_seconds,
                              "peak_memory_gb": mx.get_peak_memory() / 1e9, "learning_rate": self.learning_rate()})
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
        return {
            "epochs": self.setup.train.epochs,
            "epochs_completed": p.epoch,
            "steps": p.step,
            "steps_per_epoch": self.steps_per_epoch,
            "train_examples": len(self.train_seqs),
            "valid_examples": len(self.valid_seqs),
            "examples_seen": p.examples_seen,
            "trained_tokens": p.trained_tokens,
            "train_seconds": round(p.train_seconds, 3),
            "tokens_per_second": round(p.trained_tokens / p.train_seconds, 2) if p.train_seconds else 0.0,
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            "memory_estimate_gb": round(self.estimate["total"] / 1e9, 4),
            "padding_fraction": round(self.padding, 4),
            "first_loss": p.first_loss,
            "final_loss": p.last_loss,
            "best_val_loss": p.best_val_loss,
            "best_by": self.setup.train.best_by,
            "best_score": p.best_score,
            "best_epoch": p.best_epoch,
            "best_step": p.best_step,
            "final_val_loss": p.last_val_loss,
            "stopped_early": p.stopped_early,
            "turn_tokens_trained": self.setup.turn_tokens,
            "flavour": self.setup.flavour,
        }

    def finish(self) -> None:
        """last/ holds the final weights; without validation the final weights are also the best."""
        flat = dict(tree_flatten(self.trainee.trainable_parameters()))
        self._save_adapters(self.setup.work / LAST_DIR, flat)
        if self.position.best_score is None and self.world.main:
            copy_adapter_files(self.setup.work / LAST_DIR, self.setup.work)


def run_training(setup: RunSetup, resume_state: dict | None, progress, callback,
                 resume_hint: str = "continue with the same command plus --resume") -> tuple[dict, str]:
    """Train; return (summary, "trained" | "interrupted")."""
    try:
        run = Run(setup, resume_state, progress, callback)
    except BaseException:
        # a fresh run that failed to start (bad data, bad num_layers, Ctrl-C while loading) has saved
        # nothing: leave no empty work dir for the next run to report as "unfinished"
        if resume_state is None and world().main:
            shutil.rmtree(setup.work, ignore_errors=True)
        raise
    run.header()
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
