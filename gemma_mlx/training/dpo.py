"""Direct preference optimization (DPO) as an objective of the training loop.

For a prompt x with a preferred reply y+ and a rejected one y-, DPO raises
    log sigmoid(beta * ((log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))))
where pi is the model being trained and ref the model it started from (by default each log-ratio
is divided by its reply's token count, `per_token_reward`: the summed one ranks pairs by length).
With `objective: orpo` (odds-ratio preference optimization) there is no reference at all: the loss is
the chosen reply's mean per-token negative log-likelihood plus beta times
    -log sigmoid(log odds(y+|x) - log odds(y-|x)),  odds(y|x) = P / (1 - P),
P being the reply's mean per-token probability exp(mean log pi). The run then skips the reference
pass (about a third of the DPO stage's time on the real 270M).

For DPO, ref is the same network with the new LoRA layers switched off (`adapters_off`: their scale
set to 0 for a while), so it costs no second copy of the model, and its log-probs are computed
once per pair before the first step (they never change).

The run starts from a fine-tuned persona: a fused model, or an adapter directory. Adapters are
fused into the weights in memory first, so every LoRA layer in the network is a new one; what is
saved is then the old and the new LoRA side by side (their A matrices concatenated, their B
matrices stacked), which is one ordinary mlx-lm adapter of rank r_old + r_new on the original
base: fuse, compare and chat read it like any other run's adapters.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import batching
from .pairs import Pair, load_pair_splits
from .setup import RunSetup
from .sft import VALIDATION_PROMPTS, Parts, memory_lines
from .trainee import adapters_off, estimate_memory, prepare, resolve_num_layers, token_losses, trained_hidden
from ..adapters import ADAPTERS_FILE, CONFIG_FILE, adapter_config, read_turn_tokens, save_adapters
from ..distributed import sum_numbers, world
from ..errors import TrainingError


# ----- the loss --------------------------------------------------------------------------------------
def sequence_logps(trainee, inputs, positions, targets, segments, gradient: bool = True) -> mx.array:
    """Summed log-probability [R] of each row's trained tokens (the reply and its <end_of_turn>).

    `segments` [R, N] is 1 where trained position n belongs to row r.
    """
    losses, _ = token_losses(trainee, trained_hidden(trainee, inputs, positions), targets, gradient=gradient)
    return -(segments @ losses)


def dpo_losses(policy: mx.array, reference: mx.array, beta: float, tokens: mx.array | None = None):
    """Per-pair DPO losses and margins from log-probs [P, 2] (column 0 chosen, 1 rejected).

    With `tokens` [P, 2] (each reply's trained tokens) the reward is the mean log-ratio per token
    instead of the sum: a summed reward grows with a reply's length, so on pairs whose chosen reply
    is the longer one it ranks new pairs by how long they are more than by what they say.
    """
    ratios = policy - reference
    rewards = beta * (ratios / tokens if tokens is not None else ratios)
    margins = rewards[:, 0] - rewards[:, 1]
    return mx.logaddexp(mx.zeros_like(margins), -margins), margins  # -log sigmoid(margin), stable


def orpo_losses(policy: mx.array, tokens: mx.array, beta: float):
    """Per-pair ORPO losses and log-odds ratios from summed log-probs [P, 2] and trained tokens [P, 2].

    The odds of a reply are those of its mean per-token probability, as in the ORPO paper; the chosen
    reply's mean per-token loss comes first (weight 1), the odds-ratio term at weight `beta`.
    """
    mean = mx.minimum(policy / tokens, -1e-6)  # log P < 0, so that 1 - P > 0
    log_odds = mean - mx.log1p(-mx.exp(mean))
    ratios = log_odds[:, 0] - log_odds[:, 1]
    return -mean[:, 0] + beta * mx.logaddexp(mx.zeros_like(ratios), -ratios), ratios


def row_tokens(segments) -> mx.array:
    """Trained tokens [P, 2] of each pair's chosen and rejected reply (at least 1)."""
    return mx.maximum(segments.sum(axis=1).reshape(-1, 2), 1)


def dpo_loss(trainee, inputs, positions, targets, segments, reference, beta: float = 0.1, chosen_weight: float = 0.0,
             per_token: bool = False, normalizer=None, orpo: bool = False):
    """The summed DPO loss of this batch's pairs over `normalizer` (the global batch's pair count), and the count.

    `chosen_weight` adds that much of each chosen reply's own mean per-token loss (the supervised loss)
    to its pair's DPO loss. Plain DPO only asks that the chosen reply gain on the rejected one, and
    may get there by making both unlikely: the replies drift (longer, looping). The extra term keeps
    the chosen replies likely (the "DPO + NLL" objective of iterative reasoning preference optimization).
    """
    policy = sequence_logps(trainee, inputs, positions, targets, segments).reshape(-1, 2)
    tokens = row_tokens(segments)
    if orpo:  # `reference` is not read: ORPO has none
        losses, _ = orpo_losses(policy, tokens, beta)
        return losses.sum() / (normalizer or losses.shape[0]), mx.array(losses.shape[0])
    losses, _ = dpo_losses(policy, reference, beta, tokens if per_token else None)
    if chosen_weight:
        losses = losses - chosen_weight * policy[:, 0] / tokens[:, 0]
    count = losses.shape[0]
    return losses.sum() / (normalizer or count), mx.array(count)


# ----- batches of pairs ------------------------------------------------------------------------------
@dataclasses.dataclass
class PairBatch:
    """Chosen and rejected sequences of some pairs, row 2i the chosen and 2i+1 the rejected reply of pair i."""

    pairs: list[int]
    rows: batching.Batch
    segments: np.ndarray  # float32 [2P, N]

    @property
    def tokens(self) -> int:
        return self.rows.tokens

    @property
    def examples(self) -> int:
        return len(self.pairs)

    @property
    def trained_tokens(self) -> int:  # what the loop weighs report windows by: pairs here
        return len(self.pairs)


def make_pair_batch(sequences: list[batching.Sequence], pairs: list[int]) -> PairBatch:
    rows = batching.make_batch(sequences, [2 * i + side for i in pairs for side in (0, 1)])
    width = rows.inputs.shape[1]
    owner = rows.positions // width
    segments = (np.arange(2 * len(pairs))[:, None] == owner[None, :]).astype(np.float32)
    return PairBatch(pairs, rows, segments)


def tokenize_pairs(tokenizer, pairs: list[Pair], max_length: int, say) -> tuple[list[Pair], list[batching.Sequence]]:
    """(kept pairs, their sequences: chosen, rejected, chosen, ...), tokenized as training does."""
    from ..examples import Example

    kept, sequences, dropped = [], [], []
    for pair in pairs:
        both = [batching.tokenize_example(tokenizer, Example(pair.messages + [{"role": "assistant", "content": reply}],
                                                             None, pair.source), True, max_length)
                for reply in (pair.chosen, pair.rejected)]
        if any(s.trained_tokens == 0 for s in both):
            dropped.append(pair.source)
            continue
        kept.append(pair)
        sequences.extend(both)
    if dropped:
        say(f"warning: {len(dropped)} pairs have no reply tokens left within train.max_seq_length {max_length} "
            f"(first: {dropped[0]}); skipped")
    return kept, sequences


# ----- the objective ---------------------------------------------------------------------------------
class PreferenceObjective:
    """DPO (or ORPO) on pairs; validation: the objective's loss, reward accuracy and margin on held-out pairs.

    For ORPO the "reward" is the log-odds ratio: accuracy is the share of held-out pairs whose chosen
    reply has the higher odds.
    """

    def __init__(self, setup: RunSetup, beta: float, train, valid, train_seqs, valid_seqs, chosen_weight: float = 0.0,
                 per_token: bool = False, orpo: bool = False):
        self.setup, self.beta, self.per_token, self.orpo = setup, beta, per_token, orpo
        self.name = "orpo" if orpo else "dpo"
        self.train_pairs, self.valid_pairs = train, valid
        self.train_seqs, self.valid_seqs = train_seqs, valid_seqs
        self.lengths = [max(len(train_seqs[2 * i]), len(train_seqs[2 * i + 1])) for i in range(len(train))]
        self.valid_prompts = _unique_prompts(valid)[:VALIDATION_PROMPTS]
        # the training loss; validate() reports DPO's loss alone (comparable across chosen weights), or ORPO's whole
        self.loss = partial(dpo_loss, beta=beta, chosen_weight=chosen_weight, per_token=per_token, orpo=orpo)
        # [P, 2] log-probs under the starting model (DPO); ORPO reads none, so zeros stand in
        self.reference = {"train": mx.zeros((len(train), 2)), "valid": mx.zeros((len(valid), 2))}

    @property
    def train_count(self) -> int:
        return len(self.train_pairs)

    @property
    def has_validation(self) -> bool:
        return bool(self.valid_pairs)

    def compute_reference(self, trainee) -> None:
        """Log-probs of every pair under the starting model (the new adapters off), once; nothing for ORPO."""
        if self.orpo:
            return
        with adapters_off(trainee):
            self.reference = {"train": self._logps(trainee, self.train_seqs), "valid": self._logps(trainee, self.valid_seqs)}

    def _logps(self, trainee, sequences) -> mx.array:
        count = len(sequences) // 2
        out = np.zeros((count, 2), dtype=np.float32)
        trainee.eval()
        for start in range(0, count, self.setup.train.batch_size):
            batch = make_pair_batch(sequences, list(range(start, min(start + self.setup.train.batch_size, count))))
            logps = sequence_logps(trainee, *self._plain_arrays(batch), gradient=False)
            out[start:start + len(batch.pairs)] = np.array(logps).reshape(-1, 2)
        trainee.train()
        return mx.array(out)

    @staticmethod
    def _plain_arrays(batch: PairBatch):
        return (mx.array(batch.rows.inputs), mx.array(batch.rows.positions), mx.array(batch.rows.targets),
                mx.array(batch.segments))

    def plan_epoch(self, epoch: int) -> list[list[int]]:
        return batching.plan_epoch(self.lengths, self.setup.train.batch_size, self.setup.train.seed, epoch)

    def batch(self, indices: list[int]) -> PairBatch:
        return make_pair_batch(self.train_seqs, indices)

    def normalizer(self, batch: PairBatch) -> float:
        return float(len(batch.pairs))

    def arrays(self, batch: PairBatch):
        return (*self._plain_arrays(batch), self.reference["train"][mx.array(batch.pairs)])

    def validate(self, trainee) -> tuple[dict, int, float, str]:
        """DPO loss, reward accuracy (share of held-out pairs whose chosen reply gains more) and mean margin."""
        started = time.perf_counter()
        here = world()
        mine = list(range(len(self.valid_pairs)))[here.rank::here.size]
        totals = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "pairs": 0, "tokens": 0}
        trainee.eval()
        batch_size = self.setup.train.batch_size
        for start in range(0, len(mine), batch_size):
            batch = make_pair_batch(self.valid_seqs, mine[start:start + batch_size])
            inputs, positions, targets, segments = self._plain_arrays(batch)
            policy = sequence_logps(trainee, inputs, positions, targets, segments, gradient=False).reshape(-1, 2)
            if self.orpo:
                losses, margins = orpo_losses(policy, row_tokens(segments), self.beta)
            else:
                tokens = row_tokens(segments) if self.per_token else None  # the reward the objective trains
                losses, margins = dpo_losses(policy, self.reference["valid"][mx.array(batch.pairs)], self.beta, tokens)
            totals["loss"] += losses.sum().item()
            totals["correct"] += (margins > 0).sum().item()
            totals["margin"] += margins.sum().item()
            totals["pairs"] += len(batch.pairs)
            totals["tokens"] += batch.rows.trained_tokens
        trainee.train()
        totals = sum_numbers(totals)
        n = max(totals["pairs"], 1)
        fields = {"loss": totals["loss"] / n, "reward_accuracy": totals["correct"] / n, "reward_margin": totals["margin"] / n}
        mark = f", reward accuracy {fields['reward_accuracy']:.0%}, margin {fields['reward_margin']:+.3f}"
        return fields, int(totals["tokens"]), time.perf_counter() - started, mark

    def score(self, record: dict) -> float:
        """loss: minus the held-out DPO loss. stops: the clean greedy endings, ties to the reward accuracy."""
        if self.setup.train.best_by == "loss":
            return -record["loss"]
        accuracy = record["reward_accuracy"]
        return record["gen_clean_rate"] + accuracy / 1000 if "gen_clean_rate" in record else accuracy

    def measure(self, trainee, num_layers: int) -> dict:
        train = self.setup.train
        plan = self.plan_epoch(0)
        seq_lengths = [len(s) for s in self.train_seqs]
        padding = batching.padding_fraction(seq_lengths, [[2 * i + k for i in b for k in (0, 1)] for b in plan])
        max_trained = max(sum(self.train_seqs[2 * i + k].trained_tokens for i in b for k in (0, 1)) for b in plan)
        estimate = estimate_memory(trainee, 2 * train.batch_size, max(seq_lengths), max_trained, num_layers,
                                   train.grad_checkpoint)
        return {"padding": padding, "estimate": estimate, "lines": memory_lines(estimate, train)}

    def counts(self) -> tuple[str, int, int]:
        return "pair", len(self.train_pairs), len(self.valid_pairs)


def _unique_prompts(pairs: list[Pair]) -> list[list[dict]]:
    seen, prompts = set(), []
    for pair in pairs:
        key = tuple((m["role"], m["content"]) for m in pair.messages)
        if key not in seen:
            seen.add(key)
            prompts.append(pair.messages)
    return prompts


# ----- the starting persona and what is saved ---------------------------------------------------------
@dataclasses.dataclass
class StartAdapters:
    """The fine-tuned persona's adapters the run starts from (fused into the weights in memory)."""

    directory: Path
    weights: dict  # mlx-lm adapter weights
    rank: int
    scale: float
    num_layers: int
    keys: list | None
    turn: tuple | None  # (ids, rows) or None


def read_start_adapters(directory: Path) -> StartAdapters:
    import json

    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise TrainingError(f"{directory} holds {config.get('fine_tune_type')} adapters; preference training adds LoRA "
                            "on top of LoRA adapters only. Fuse them first (gemma-mlx fuse) and give the fused model.")
    parameters = config.get("lora_parameters", {})
    return StartAdapters(directory, dict(mx.load(str(directory / ADAPTERS_FILE))), int(parameters["rank"]),
                         float(parameters["scale"]), int(config["num_layers"]), parameters.get("keys"),
                         read_turn_tokens(directory))


def fuse_lora_layers(lm) -> None:
    """Fold every LoRA layer into its linear layer (in memory): the persona becomes the plain weights."""
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse()) for name, module in lm.named_modules() if hasattr(module, "lora_a")]
    if fused:
        lm.update_modules(tree_unflatten(fused))


def combined_adapter_io(setup: RunSetup, start: StartAdapters, num_layers: int):
    """(save_dir, load_flat) that write the start adapters and the new ones as one rank r1+r2 adapter."""
    lora = setup.lora
    ratio = lora.scale / start.scale  # the new B matrices are saved at the start adapters' scale
    combined = dataclasses.replace(lora, fine_tune_type="lora", rank=start.rank + lora.rank, scale=start.scale,
                                   dropout=0.0, num_layers=num_layers, keys=list(start.keys or []))

    def save_dir(directory, flat: dict) -> None:
        weights = {}
        for key, old in start.weights.items():
            new = flat[f"lm.{key}"]
            weights[key] = (mx.concatenate([old, new.astype(old.dtype)], axis=1) if key.endswith("lora_a")
                            else mx.concatenate([old, (new * ratio).astype(old.dtype)], axis=0))
        config = adapter_config(combined, num_layers, setup.model_dir, start.turn is not None)
        save_adapters(Path(directory), weights, config, start.turn)

    def load_flat(directory) -> list:
        saved = mx.load(str(Path(directory) / ADAPTERS_FILE))
        r = start.rank
        return [(f"lm.{k}", v[:, r:] if k.endswith("lora_a") else v[r:, :] / ratio) for k, v in saved.items()]

    return save_dir, load_flat


def preference_parts(setup: RunSetup, say) -> Parts:
    """Load the persona (with its adapters fused in memory), the pairs and their reference log-probs."""
    from .. import models

    prefs = setup.preferences
    same: list[str] = []
    train_pairs, valid_pairs = load_pair_splits(setup.data, setup.train.seed, same)
    if same:
        say(f"{len(same)} pairs with the same reply on both sides were left out (first: {same[0]})")
    if not train_pairs:
        raise TrainingError(f"{setup.data} has no preference pairs to train on (ties are left out). Vote in the "
                            "arena, or make pairs with gemma-mlx prefs.")
    start = read_start_adapters(setup.start_adapters) if setup.start_adapters else None
    lm, tokenizer = models.load(setup.model_dir, setup.start_adapters)  # adapters and turn rows applied
    fuse_lora_layers(lm)
    train_pairs, train_seqs = tokenize_pairs(tokenizer, train_pairs, setup.train.max_seq_length, say)
    valid_pairs, valid_seqs = tokenize_pairs(tokenizer, valid_pairs, setup.train.max_seq_length, say)
    if not train_pairs:
        raise TrainingError(f"None of the pairs in {setup.data} has reply tokens within train.max_seq_length "
                            f"({setup.train.max_seq_length} tokens). Raise it, or check the pairs.")
    lora = setup.lora
    if start is not None:  # the new LoRA sits exactly where the old one was, so the two can be saved as one
        lora = dataclasses.replace(lora, fine_tune_type="lora", num_layers=start.num_layers, keys=list(start.keys or []))
    mx.random.seed(setup.train.seed)  # LoRA initialisation
    trainee = prepare(lm, lora, False, setup.train.grad_checkpoint)
    num_layers = resolve_num_layers(lora, lm)
    orpo = prefs.objective == "orpo"
    objective = PreferenceObjective(setup, prefs.beta, train_pairs, valid_pairs, train_seqs, valid_seqs, prefs.chosen_weight,
                                    prefs.per_token_reward, orpo)
    if not orpo:
        say(f"reference log-probs of {len(train_pairs) + len(valid_pairs)} pairs (the starting model, new adapters off)")
        objective.compute_reference(trainee)
    save_dir, load_flat = combined_adapter_io(setup, start, num_layers) if start else (None, None)
    return Parts(trainee, tokenizer, objective, num_layers, save_dir, load_flat)
