"""The model side of training: which weights learn, and a loss that skips work it does not need.

- LoRA/DoRA layers come from mlx-lm (`linear_to_lora_layers`); "full" unfreezes whole layers.
- Turn-token rows: a base (-pt) Gemma never saw `<start_of_turn>`/`<end_of_turn>`, and their tied
  embeddings look like the ~6,200 `<unusedN>` rows, so LoRA alone teaches "end here" to all of
  them (DESIGN.md). The full embedding stays frozen; a small trainable [2, hidden] parameter is
  spliced into the input embeddings AND into the output logits for those ids, so the rows learn
  as inputs and as outputs, and nothing else in the 262k-row table moves.
- The MLP activation uses fast_gelu (same function, no slow CPU tanh): about half of a CPU step
  went to mlx's tanh-GELU and its gradient.
- The loss runs the transformer once, gathers only the positions whose next token is trained,
  and applies the (tied, vocabulary-sized) output layer there alone: on real Gemma models that
  layer is a large share of each step, and prompts and padding are a large share of positions.
"""

from __future__ import annotations

import os
import types

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .chat_format import TURN_TOKEN_IDS
from .errors import TrainingError
from .fast_gelu import use_fast_gelu


class Trainee(nn.Module):
    """The language model plus the optional trainable turn-token rows, as one trainable tree."""

    def __init__(self, lm: nn.Module, turn_ids: tuple[int, ...] = ()):
        super().__init__()
        self.lm = lm
        self.turn_ids = tuple(turn_ids)  # a tuple is not a parameter
        if self.turn_ids:
            # embed() de-quantizes rows of a quantized table too
            self.turn_rows = lm.model.embed_tokens(mx.array(self.turn_ids)).astype(mx.float32)

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
        return logits


def loss_fn(trainee: Trainee, inputs: mx.array, positions: mx.array, targets: mx.array):
    """Mean cross-entropy over the trained positions, and their count.

    inputs [B, L]; positions [N] flat indices into B*L; targets [N].
    """
    embeddings = trainee.input_embeddings(inputs) if trainee.turn_ids else None
    hidden = trainee.lm.model(inputs, input_embeddings=embeddings)  # [B, L, H]
    picked = hidden.reshape(-1, hidden.shape[-1])[positions]  # [N, H]
    logits = trainee.output_logits(picked).astype(mx.float32)  # [N, V]
    total = nn.losses.cross_entropy(logits, targets, reduction="sum")
    count = positions.size
    return total / count, mx.array(count)


def resolve_num_layers(lora, model) -> int:
    total = len(model.layers)
    if lora.num_layers == -1:
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


def prepare(lm: nn.Module, lora, train_turn_tokens: bool, grad_checkpoint: bool = False) -> Trainee:
    """Freeze the model, add LoRA/DoRA layers (or unfreeze layers for full), wrap it for training."""
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
    return Trainee(lm, TURN_TOKEN_IDS if train_turn_tokens else ())


def count_parameters(tree) -> int:
    return sum(v.size for _, v in tree_flatten(tree))


def estimate_memory(trainee: Trainee, batch_size: int, max_length: int, max_trained: int, backward_layers: int,
                    grad_checkpoint: bool = False) -> dict:
    """A rough peak-memory estimate in bytes, to warn before a run that cannot fit.

    Weights + trainable copies (weight, gradient, two Adam moments) + activations kept for the
    backward pass of the layers it reaches (with grad_checkpoint: only each layer's input, plus one
    layer's activations while it is recomputed) + the logits of the trained positions.
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
    logits = max_trained * vocab * 4 * 3
    total = weights + trainable + activations + logits
    return {"weights": weights, "trainable": trainable, "activations": activations, "logits": logits, "total": total}


def machine_memory() -> int | None:
    """Physical RAM in bytes (unified memory on a Mac), or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
