"""Supervised fine-tuning as an objective of the training loop: the persona's replies, token by token.

An objective is what loop.py steps through without knowing it: it plans each epoch's batches,
turns a batch into arrays, gives the loss (a function of the trainee and those arrays, for
`nn.value_and_grad`), the validation numbers of the held-out split, and what ranks validations.
`supervised_parts` loads the model and the data for it; the loop gets them from outside.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from . import batching
from .setup import RunSetup
from .trainee import estimate_memory, loss_fn, loss_weights, prepare, resolve_num_layers, validation_sums
from ..backend import machine_memory
from ..text import plural, word_count
from ..families import DEFAULT, Family, family_of_tokenizer
from ..distributed import sum_numbers, world
from ..errors import TrainingError

VALIDATION_PROMPTS = 16  # validation prompts answered at each validation (when val_generation_tokens > 0)


@dataclass
class Parts:
    """What the loop trains, made outside it: the trainee, its tokenizer and the objective.

    `save_dir(directory, flat)` / `load_flat(directory)` write and read one adapter directory from
    and to the trainee's flat trainable weights; None means the plain layout (loop.py's own).
    """

    trainee: object
    tokenizer: object
    objective: object
    num_layers: int
    save_dir: Callable | None = None
    load_flat: Callable | None = None


def tokenize_split(tokenizer, examples, setup: RunSetup, say) -> list[batching.Sequence]:
    sequences = [batching.tokenize_example(tokenizer, e, setup.train.response_only, setup.train.max_seq_length) for e in examples]
    truncated = [s.source for s in sequences if s.truncated]
    if truncated:
        say(f"warning: {plural(len(truncated), 'example')} {'is' if len(truncated) == 1 else 'are'} longer than max_seq_length {setup.train.max_seq_length} "
            f"tokens and {'was' if len(truncated) == 1 else 'were'} cut (first: {truncated[0]}); raise train.max_seq_length to keep them whole")
    empty = [s for s in sequences if s.trained_tokens == 0]
    if empty:
        say(f"warning: {plural(len(empty), 'example')} {'has' if len(empty) == 1 else 'have'} no reply tokens left to learn from (first: {empty[0].source}); skipped")
    return [s for s in sequences if s.trained_tokens > 0]


def _arrays(batch: batching.Batch, end_of_turn_weight: float = 1.0, end_id: int = DEFAULT.turn_end_id):
    arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets))
    if end_of_turn_weight == 1.0:
        return arrays
    return (*arrays, mx.array(loss_weights(batch.targets, end_of_turn_weight, end_id)))


def evaluate(trainee, sequences, batch_size: int, unused_ids: list[int] = ()) -> dict:
    """Validation numbers over a split, without dropout (and without any loss weighting).

    loss: mean loss per trained token. At the reply ends (where <end_of_turn> is the target):
    end_p, mean p(<end_of_turn>); end_top1, the share where it is the most likely token;
    end_unused_mass, the mean probability on <unusedN> tokens. Also tokens and seconds.
    Under mlx.launch each rank evaluates every n-th batch and the sums are added up.
    """
    trainee.eval()
    started = time.perf_counter()
    unused = mx.array(list(unused_ids), dtype=mx.int32)
    totals = {"loss": 0.0, "count": 0, "end_p": 0.0, "end_top1": 0.0, "end_unused_mass": 0.0, "ends": 0}
    here = world()
    for number, indices in enumerate(batching.plan_sorted([len(s) for s in sequences], batch_size)):
        if number % here.size != here.rank:
            continue
        batch = batching.make_batch(sequences, indices)
        ends = mx.array(np.nonzero(batch.targets == trainee.end_id)[0].astype(np.int32))  # the family's turn end
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


def selection_score(record: dict, best_by: str) -> float:
    """What ranks validations for the "best" adapters (higher is better).

    score: selection.checkpoint_score of the greedy validation replies, clean endings x length
    fidelity (their mean words against the validation replies' own): "most clean endings" cannot
    tell 8-word replies from 40-word ones when the persona talks in 40 (issue 19's real run: 10 of 10
    clean at 8 words at epoch 3, and at 20 words at epoch 5). Without generation it falls back to
    what stops uses.
    stops: the share of greedy validation replies that ended by themselves without looping (the
    teacher-forced <end_of_turn> top-1 rate when generation is off). Measured on the real 270M
    base: validation loss is lowest after epoch 1, where greedy replies loop, and rises while the
    replies learn to end and gain the voice; so the loss alone picks the wrong checkpoint.
    loss: minus the validation loss.
    """
    if best_by == "loss":
        return -record["loss"]
    if best_by == "score" and record.get("gen_score") is not None:
        return record["gen_score"]
    if "gen_clean_rate" in record:
        return record["gen_clean_rate"]
    return record["end_top1"] if record.get("end_top1") is not None else -record["loss"]


class SupervisedObjective:
    """Cross-entropy on the replies (optionally with a heavier <end_of_turn>), one sequence a row."""

    name = "supervised"

    def __init__(self, setup: RunSetup, train_seqs, valid_seqs, valid_prompts, unused_ids,
                 reply_words: dict | None = None, family: Family = DEFAULT):
        self.setup, self.train_seqs, self.valid_seqs = setup, train_seqs, valid_seqs
        self.family = family  # the model's: its turn end is the reply end the loss weighs and validation measures
        self.valid_prompts, self.unused_ids = valid_prompts, unused_ids
        # mean words of the training replies (the persona's length) and of the answered validation prompts' replies
        self.train_reply_words = (reply_words or {}).get("train")
        self.valid_reply_words = (reply_words or {}).get("valid")
        self.lengths = [len(s) for s in train_seqs]
        self.weight = setup.train.end_of_turn_weight
        self.loss = loss_fn

    # ----- training -------------------------------------------------------------------------
    @property
    def train_count(self) -> int:
        return len(self.train_seqs)

    @property
    def has_validation(self) -> bool:
        return bool(self.valid_seqs)

    def plan_epoch(self, epoch: int) -> list[list[int]]:
        return batching.plan_epoch(self.lengths, self.setup.train.batch_size, self.setup.train.seed, epoch)

    def batch(self, indices: list[int]) -> batching.Batch:
        return batching.make_batch(self.train_seqs, indices)

    def normalizer(self, batch: batching.Batch) -> float:
        if self.weight != 1.0:
            return float(loss_weights(batch.targets, self.weight, self.family.turn_end_id).sum())
        return float(batch.trained_tokens)

    def arrays(self, batch: batching.Batch):
        return _arrays(batch, self.weight, self.family.turn_end_id)

    # ----- validation -----------------------------------------------------------------------
    def validate(self, trainee) -> tuple[dict, int, float, str]:
        """(record fields, tokens, seconds, the report line's extra) of one validation."""
        result = evaluate(trainee, self.valid_seqs, self.setup.train.batch_size, self.unused_ids)
        fields = {"loss": result["loss"], "end_p": result["end_p"], "end_top1": result["end_top1"],
                  "end_unused_mass": result["end_unused_mass"]}
        mark = ""
        if result["end_p"] is not None:
            turn_end = self.family.turn_end  # <end_of_turn>, or Gemma 4's <turn|>
            mark = (f", reply ends: p({turn_end}) {result['end_p']:.3f}, top-1 {result['end_top1']:.0%}, "
                    f"<unusedN> {result['end_unused_mass']:.4f}")
        return fields, result["tokens"], result["seconds"], mark

    def score(self, record: dict) -> float:
        return selection_score(record, self.setup.train.best_by)

    # ----- reports --------------------------------------------------------------------------
    def measure(self, trainee, num_layers: int) -> dict:
        """The padding of epoch 1 and a memory estimate, and the header lines that say the estimate."""
        train = self.setup.train
        plan = self.plan_epoch(0)
        padding = batching.padding_fraction(self.lengths, plan)
        backward = len(trainee.lm.layers) if self.setup.turn_tokens else num_layers
        max_trained = max(sum(self.train_seqs[i].trained_tokens for i in b) for b in plan)
        estimate = estimate_memory(trainee, train.batch_size, max(self.lengths), max_trained, backward,
                                   train.grad_checkpoint)
        return {"padding": padding, "estimate": estimate, "lines": memory_lines(estimate, train)}

    def counts(self) -> tuple[str, int, int]:
        """(what one item is, training items, validation items) for the header and the summary."""
        return "example", len(self.train_seqs), len(self.valid_seqs)


def memory_lines(estimate: dict, train) -> list[str]:
    """The memory estimate as the header says it, with a warning when the machine has less."""
    machine = machine_memory()
    have = f" of {machine / 1e9:.1f} GB" if machine else ""
    lines = [f"memory estimate: {estimate['total'] / 1e9:.2f} GB{have} (weights {estimate['weights'] / 1e9:.2f}, "
             f"activations {estimate['activations'] / 1e9:.2f}, logits {estimate['logits'] / 1e9:.2f})"]
    if machine and estimate["total"] > machine:
        lines.append(f"warning: this run may need more memory ({estimate['total'] / 1e9:.1f} GB) than the machine has "
                     f"({machine / 1e9:.1f} GB); lower train.batch_size or train.max_seq_length"
                     + ("" if train.grad_checkpoint else ", or set train.grad_checkpoint: true"))
    return lines


def supervised_parts(setup: RunSetup, say) -> Parts:
    """Load the data and the model of a supervised run and make its trainee (LoRA, turn rows)."""
    from .. import models
    from ..examples import load_splits
    from ..flavour import unused_token_ids

    splits = load_splits(setup.data, seed=setup.train.seed)
    if not splits.train:
        raise TrainingError(f"{setup.data} has no training examples. Add examples, or check the path.")
    lm, tokenizer = models.load(setup.model_dir)
    family = family_of_tokenizer(tokenizer)  # the family the data is rendered in (batching): its turn rows train
    train_seqs = tokenize_split(tokenizer, splits.train, setup, say)
    valid_seqs = tokenize_split(tokenizer, splits.valid, setup, say)
    # the conversations up to their last reply: what validation generation answers
    answered = [e for e in splits.valid if e.messages][:VALIDATION_PROMPTS]
    valid_prompts = [e.messages[:-1] for e in answered]
    cut = {seq.source for seq in train_seqs if seq.truncated}  # their replies' ends were never trained
    reply_words = {"train": mean_reply_words([e for e in splits.train if e.source not in cut]),
                   "valid": mean_reply_words(answered)}
    if not train_seqs:
        raise TrainingError(f"None of the training examples in {setup.data} has reply tokens to learn from "
                            f"within train.max_seq_length ({setup.train.max_seq_length} tokens). Raise it, or check the data.")
    objective = SupervisedObjective(setup, train_seqs, valid_seqs, valid_prompts, unused_token_ids(setup.model_dir),
                                    reply_words, family)
    mx.random.seed(setup.train.seed)  # LoRA initialisation
    turn_init = setup.lora.turn_token_init if setup.flavour == "pt" else "keep"  # an -it row is trained already
    trainee = prepare(lm, setup.lora, setup.turn_tokens, setup.train.grad_checkpoint, turn_init, family)
    return Parts(trainee, tokenizer, objective, resolve_num_layers(setup.lora, lm))


def mean_reply_words(examples) -> float | None:
    """Mean words of the examples' last replies (the length a greedy reply is held against); None without any.

    The training side leaves out examples cut at train.max_seq_length: a 20,000-word reply trained as its
    first 500 tokens would otherwise make the persona's length (and calibration's target) a thousand words.
    """
    counts = [word_count(e.reply) for e in examples if e.messages and e.reply]
    return round(sum(counts) / len(counts), 2) if counts else None


def steps_per_epoch(count: int, batch_size: int) -> int:
    return math.ceil(count / batch_size)
