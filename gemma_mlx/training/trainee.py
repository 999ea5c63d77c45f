"""The model side of training: which weights learn, and a loss that skips work it does not need.

- LoRA/DoRA layers come from mlx-lm (`linear_to_lora_layers`); "full" unfreezes whole layers.
- Turn-token rows: a base (-pt) Gemma never saw `<start_of_turn>`/`<end_of_turn>`, and their tied
  embeddings look like the ~6,200 `<unusedN>` rows, so LoRA alone teaches "end here" to all of
  them (docs/DESIGN.md). The full embedding stays frozen; a small trainable [2, hidden] parameter is
  spliced into the input embeddings AND into the output logits for those ids, so the rows learn
  as inputs and as outputs, and nothing else in the 262k-row table moves.
- The MLP activation uses fast_gelu (same function, no slow CPU tanh): about half of a CPU step
  went to mlx's tanh-GELU and its gradient.
- The loss runs the transformer once, gathers only the positions whose next token is trained,
  and applies the (tied, vocabulary-sized) output layer there alone: on real Gemma models that
  layer is a large share of each step, and prompts and padding are a large share of positions.
  It does so in vocabulary chunks (chunked_loss.py), never holding the [N, 262k] float32 logits.
"""

from __future__ import annotations

import contextlib
import types

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import fast_exp
from ..errors import TrainingError
from ..families import DEFAULT, Family
from .chunked_loss import CHUNK_ROWS, chunked_cross_entropy, output_matrix
from ..fast_gelu import use_fast_gelu


class Trainee(nn.Module):
    """The language model plus the optional trainable turn-token rows, as one trainable tree."""

    def __init__(self, lm: nn.Module, turn_ids: tuple[int, ...] = (), init: str = "keep", family: Family = DEFAULT):
        super().__init__()
        self.lm = lm
        self.turn_ids = tuple(turn_ids)  # a tuple is not a parameter
        # the model's family's reply end (<end_of_turn>, Gemma 4's <turn|>): what validation measures
        self.end_id, self.eos_id = family.turn_end_id, family.eos_id
        if self.turn_ids:
            # "eos": the turn end starts as a copy of <eos>, which the base model already predicts where
            # a text ends; its own row is still where initialisation left it (next to the <unusedN> rows)
            start = [self.eos_id if init == "eos" and t == self.end_id else t for t in self.turn_ids]
            # embed() de-quantizes rows of a quantized table too
            self.turn_rows = lm.model.embed_tokens(mx.array(start)).astype(mx.float32)

    @property
    def embed(self):
        return self.lm.model.embed_tokens

    def input_embeddings(self, inputs: mx.array) -> mx.array:
        h = self.embed(inputs)
        for k, token_id in enumerate(self.turn_ids):
            h = mx.where((inputs == token_id)[..., None], self.turn_rows[k].astype(h.dtype), h)
        return h

    def output_logits(self, hidden: mx.array) -> mx.array:
        """Logits [N, vocab] for hidden states [N, hidden]; turn-token columns from the trainable rows."""
        # Gemma 3 ties the output layer to the embedding (mlx-lm then has no lm_head).
        logits = self.lm.lm_head(hidden) if "lm_head" in self.lm else self.embed.as_linear(hidden)
        if self.turn_ids:
            turn = hidden @ self.turn_rows.astype(hidden.dtype).T
            logits[:, mx.array(self.turn_ids)] = turn.astype(logits.dtype)
        cap = getattr(self.lm.args, "final_logit_softcapping", None)  # Gemma 4 caps its logits, as the model does
        return mx.tanh(logits / cap) * cap if cap else logits


@contextlib.contextmanager
def turn_rows_in_model(trainee: Trainee):
    """Put the trainee's current turn-token rows into the model's embedding for a while (for generation).

    The training graph keeps them apart; mlx-lm's generator only knows the model. The embedding
    module (and its weight) is put back afterwards, untouched.
    """
    if not trainee.turn_ids:
        yield
        return
    from ..adapters import set_embedding_rows

    model = trainee.lm.model
    embed, weight = model.embed_tokens, getattr(model.embed_tokens, "weight", None)
    head = getattr(trainee.lm, "lm_head", None)
    head_weight = getattr(head, "weight", None)
    set_embedding_rows(trainee.lm, list(trainee.turn_ids), trainee.turn_rows)
    try:
        yield
    finally:
        model.embed_tokens = embed
        if weight is not None:
            embed.weight = weight
        if head is not None and head_weight is not None:
            head.weight = head_weight


@contextlib.contextmanager
def adapters_off(module):
    """Switch every LoRA layer under `module` off (scale 0) for a while: the network it started as.

    DPO's reference model and validation's on-topic scorer are this: the same weights, no second copy.
    """
    layers = [m for _, m in module.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def trained_hidden(trainee: Trainee, inputs: mx.array, positions: mx.array) -> mx.array:
    """Final hidden states [N, H] at the trained positions only (flat indices into B*L)."""
    embeddings = trainee.input_embeddings(inputs) if trainee.turn_ids else None
    hidden = trainee.lm.model(inputs, input_embeddings=embeddings)  # [B, L, H]
    return hidden.reshape(-1, hidden.shape[-1])[positions]


def trained_logits(trainee: Trainee, inputs: mx.array, positions: mx.array) -> mx.array:
    """Float32 logits [N, V] at the trained positions only (flat indices into B*L)."""
    return trainee.output_logits(trained_hidden(trainee, inputs, positions)).astype(mx.float32)


def token_losses(trainee: Trainee, hidden: mx.array, targets: mx.array, gradient: bool = True):
    """Cross-entropy [N] of hidden states [N, H] against targets [N], and the logsumexp [N] (None on the plain path).

    In vocabulary chunks (chunked_loss.py) whenever the output layer allows it; otherwise through
    the full [N, V] logits. `gradient=False` (validation) skips the chunked path's gradient work.
    """
    weight = output_matrix(trainee.lm)
    if weight is None:
        logits = trainee.output_logits(hidden).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="none"), None
    rows = trainee.turn_rows if trainee.turn_ids else None
    return chunked_cross_entropy(hidden, weight, targets, trainee.turn_ids, rows, gradient=gradient)


def loss_fn(trainee: Trainee, inputs: mx.array, positions: mx.array, targets: mx.array, weights: mx.array | None = None,
            normalizer: float | None = None):
    """Mean cross-entropy over the trained positions (weighted when `weights` [N] is given), and their count.

    inputs [B, L]; positions [N] flat indices into B*L; targets [N]. `normalizer` divides the sum
    instead of this batch's own count (or weight sum): with data parallelism each rank holds a slice
    of the global batch and divides by the global count, so the ranks' losses and gradients add up to
    the one-process ones.
    """
    losses, _ = token_losses(trainee, trained_hidden(trainee, inputs, positions), targets)
    count = positions.size
    if weights is not None:
        losses = losses * weights
    if normalizer is None:
        normalizer = weights.sum() if weights is not None else count
    return losses.sum() / normalizer, mx.array(count)


def loss_weights(targets, end_of_turn_weight: float, end_id: int = DEFAULT.turn_end_id):
    """Per-position loss weights: `end_of_turn_weight` where the target ends a reply (`end_id`, the
    family's turn end), 1 elsewhere (numpy)."""
    import numpy as np

    return np.where(targets == end_id, np.float32(end_of_turn_weight), np.float32(1.0)).astype(np.float32)


def validation_sums(trainee: Trainee, inputs: mx.array, positions: mx.array, targets: mx.array,
                    ends: mx.array, unused: mx.array) -> dict:
    """Loss and end-of-turn numbers of one validation batch, as sums (the caller divides).

    `ends` [E] indexes the positions whose target is <end_of_turn> (a reply end). There we record
    p(<end_of_turn>), whether it is the top-1 token, and the probability mass on <unusedN> tokens:
    a base model that has not learned to end its turn spreads "stop" over all of those.
    """
    hidden = trained_hidden(trainee, inputs, positions)
    losses, _ = token_losses(trainee, hidden, targets, gradient=False)
    sums = {"loss": losses.sum(), "count": positions.size}
    if ends.size:
        # full logits for the few reply ends only (about one per example), not for all N positions
        at_end = trainee.output_logits(hidden[ends]).astype(mx.float32)  # [E, V]
        logprobs = at_end - fast_exp.logsumexp(at_end, axis=-1, keepdims=True)
        sums["end_p"] = mx.exp(logprobs[:, trainee.end_id]).sum()
        sums["end_top1"] = (mx.argmax(at_end, axis=-1) == trainee.end_id).sum()
        sums["end_unused_mass"] = mx.exp(logprobs[:, unused]).sum() if unused.size else mx.array(0.0)
    sums["ends"] = ends.size
    return sums


def resolve_num_layers(lora, model) -> int:
    """How many of the last layers get LoRA: -1 is all; the default 16 is all of a model with fewer."""
    from ..config import DEFAULT_NUM_LAYERS

    total = len(model.layers)
    if lora.num_layers == -1 or lora.num_layers == DEFAULT_NUM_LAYERS >= total:
        return total
    if not 0 < lora.num_layers <= total:
        raise TrainingError(
            f"lora.num_layers is {lora.num_layers}, but this model has {total} layers. "
            f"Use a number from 1 to {total}, or -1 for all of them."
        )
    return lora.num_layers


def _checkpoint_layer(layer: nn.Module) -> None:
    """Recompute this layer's activations in the backward pass (less memory, more compute).

    mlx-lm's helper patches the layer *class* for the whole process; we give this instance its
    own subclass instead, so models loaded later (e.g. for generation) are untouched.
    """
    base_call = type(layer).__call__

    def checkpointed(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return base_call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    layer.__class__ = types.new_class(f"Checkpointed{type(layer).__name__}", (type(layer),), {},
                                      lambda ns: ns.update(__call__=checkpointed))


def prepare(lm: nn.Module, lora, train_turn_tokens: bool, grad_checkpoint: bool = False,
            turn_init: str = "keep", family: Family = DEFAULT) -> Trainee:
    """Freeze the model, add LoRA/DoRA layers (or unfreeze layers for full), wrap it for training.

    `turn_init` is "eos" or "keep" (only ever "eos" for a base model, whose turn rows are untrained).
    `family` is the model's (families.py): its turn-token ids are the rows a base model trains.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = resolve_num_layers(lora, lm)
    lm.freeze()
    if lora.fine_tune_type == "full":
        for layer in lm.layers[-num_layers:]:
            layer.unfreeze()
    elif lora.fine_tune_type in ("lora", "dora"):
        config = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout}
        if lora.keys:
            config["keys"] = list(lora.keys)
        linear_to_lora_layers(lm, num_layers, config, use_dora=lora.fine_tune_type == "dora")
    else:
        raise TrainingError(f"lora.fine_tune_type is '{lora.fine_tune_type}'; use lora, dora or full.")
    if not tree_flatten(lm.trainable_parameters()):
        raise TrainingError(
            f"No weights would train: lora.keys {lora.keys} matched nothing in the last {num_layers} layers. "
            "Use projection paths such as self_attn.q_proj or mlp.down_proj, or leave keys empty for all."
        )
    use_fast_gelu(lm)
    if grad_checkpoint:
        for layer in lm.layers[-num_layers:] if not train_turn_tokens else lm.layers:
            _checkpoint_layer(layer)
    return Trainee(lm, family.turn_token_ids if train_turn_tokens else (), init=turn_init, family=family)


def count_parameters(tree) -> int:
    return sum(v.size for _, v in tree_flatten(tree))


def estimate_memory(trainee: Trainee, batch_size: int, max_length: int, max_trained: int, backward_layers: int,
                    grad_checkpoint: bool = False) -> dict:
    """A rough peak-memory estimate in bytes, to warn before a run that cannot fit.

    Weights + trainable copies (weight, gradient, two Adam moments) + activations kept for the
    backward pass of the layers it reaches (with grad_checkpoint: only each layer's input, plus one
    layer's activations while it is recomputed) + the logits of the trained positions (a few
    vocabulary chunks of them when the chunked loss applies).
    """
    args = trainee.lm.args
    hidden, inter = args.hidden_size, args.intermediate_size
    heads = args.num_attention_heads
    vocab = args.vocab_size
    weights = sum(v.nbytes for _, v in tree_flatten(trainee.lm.parameters()))
    itemsize = trainee.embed.weight.dtype.size if hasattr(trainee.embed, "weight") else 4
    trainable = sum(v.nbytes for _, v in tree_flatten(trainee.trainable_parameters())) * 4
    tokens = batch_size * max_length
    per_layer = tokens * (12 * hidden + 4 * inter) * itemsize + batch_size * heads * max_length**2 * 4 * 2
    if grad_checkpoint:
        activations = per_layer + tokens * hidden * itemsize * backward_layers
    else:
        activations = per_layer * max(backward_layers, 1)
    columns = vocab if output_matrix(trainee.lm) is None else min(vocab, CHUNK_ROWS)
    logits = max_trained * columns * 4 * 3
    total = weights + trainable + activations + logits
    return {"weights": weights, "trainable": trainable, "activations": activations, "logits": logits, "total": total}
