"""Benchmark: the chunked (cut) cross-entropy against the full-logits loss, in one process, on the real 270M.

    python scripts/bench_loss.py [--model DIR] [--batch 4] [--repeats 5]

One training step (forward, backward, optimizer update) on a batch of ~150-token chat examples,
with LoRA on 16 layers, rank 8, and the trainable turn-token rows of a base model, as `train` does.
The two paths alternate (GEMMA_MLX_FULL_LOGITS=1 forces the old one); each step's peak memory is
mx.get_peak_memory() after mx.reset_peak_memory(), and includes the ~1.1 GB of float32 weights.
Prints both losses at the same weights first (they agree to float32 rounding), then medians and
the ratios new / old. Every timed step updates the weights, so the timed steps' losses fall and
differ between the paths. Not a test: the machine and its load set the times.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)

DEFAULT_MODEL = Path.home() / ".cache" / "gemma-mlx" / "models" / "gemma-3-270m-q4_k_m"
WORDS = ("I reckon we should play a game in the backyard today Hooray my little sister wants to be the "
         "shopkeeper Mum says we can have lunch after and Dad is a big grumpy monster").split()


def batch_arrays(tokenizer, size: int, seed: int = 0):
    """A batch of `size` chat examples of about 150 tokens (a short prompt, a long reply)."""
    import mlx.core as mx

    from gemma_mlx.examples import Example
    from gemma_mlx.training import batching
    from gemma_mlx.training.trainee import loss_weights

    rng = random.Random(seed)
    examples = [Example(messages=[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(20, 30)))},
                                  {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(100, 120)))}],
                        text=None, source=f"bench:{i}") for i in range(size)]
    sequences = [batching.tokenize_example(tokenizer, e) for e in examples]
    batch = batching.make_batch(sequences, list(range(size)))
    arrays = (mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets),
              mx.array(loss_weights(batch.targets, 5.0)))
    return arrays, [len(s) for s in sequences]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a converted float32 model directory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path (after one warm-up each)")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.training import chunked_loss, trainee as tuning
    from gemma_mlx.training.setup import make_optimizer

    lm, tokenizer = load(str(args.model))
    trainee = tuning.prepare(lm, LoraSettings(), train_turn_tokens=True, turn_init="eos")
    if tuning.output_matrix(trainee.lm) is None:
        raise SystemExit("this model's output layer cannot use the chunked loss (quantized?); nothing to compare")
    optimizer = make_optimizer(TrainSettings(), 1000, turn_rows=True)
    loss_and_grad = nn.value_and_grad(trainee, tuning.loss_fn)
    arrays, lengths = batch_arrays(tokenizer, args.batch)
    mx.eval(trainee.parameters())
    print(f"model {args.model.name}, batch {args.batch}, example lengths {lengths}, "
          f"{arrays[1].size} trained positions, vocabulary {lm.args.vocab_size}, chunk {chunked_loss.CHUNK_ROWS}")

    def step(full: bool):
        os.environ[chunked_loss.FULL_LOGITS_ENV] = "1" if full else "0"
        mx.reset_peak_memory()
        started = time.perf_counter()
        (loss, _), grads = loss_and_grad(trainee, *arrays)
        optimizer.update(trainee, grads)
        mx.eval(loss, trainee.trainable_parameters(), optimizer.state)
        return time.perf_counter() - started, mx.get_peak_memory(), loss.item()

    # both losses at the same weights, before any update: the timed steps below each update the
    # weights (the same batch, so the loss falls from step to step and their last losses differ)
    same = {}
    for full, name in ((True, "full logits"), (False, "chunked")):
        os.environ[chunked_loss.FULL_LOGITS_ENV] = "1" if full else "0"
        same[name] = tuning.loss_fn(trainee, *arrays)[0].item()
    print(f"loss at the same weights: full logits {same['full logits']:.6f}, chunked {same['chunked']:.6f} "
          f"(difference {abs(same['full logits'] - same['chunked']):.2e})")

    results = {"full logits": [], "chunked": []}
    for full in (True, False):  # warm-up (first-call allocations)
        step(full)
    for _ in range(args.repeats):
        for full, name in ((True, "full logits"), (False, "chunked")):
            results[name].append(step(full))

    print(f"\n{'path':<12} {'step s (median)':>16} {'all steps s':>30} {'peak GB':>8} {'last loss':>10}")
    medians = {}
    for name, runs in results.items():
        times = [r[0] for r in runs]
        medians[name] = (statistics.median(times), max(r[1] for r in runs))
        print(f"{name:<12} {medians[name][0]:>16.3f} {' '.join(f'{t:.2f}' for t in times):>30} "
              f"{medians[name][1] / 1e9:>8.3f} {runs[-1][2]:>10.4f}")
    (old_t, old_m), (new_t, new_m) = medians["full logits"], medians["chunked"]
    print(f"{'new / old':<12} {new_t / old_t:>16.2f}x {'':>30} {new_m / old_m:>7.2f}x")
    print("(last loss: after that path's last step; the paths alternate and every step updates the weights)")

    # the output layer alone (loss and d(hidden), d(turn rows) at fixed hidden states): the part that
    # changed, timed without the transformer's noise
    hidden = tuning.trained_hidden(trainee, *arrays[:2])
    mx.eval(hidden)

    def output_loss(rows, h):
        trainee.turn_rows = rows
        return (tuning.token_losses(trainee, h, arrays[2])[0] * arrays[3]).sum()

    grad_fn = mx.value_and_grad(output_loss, argnums=(0, 1))

    def output_step(full: bool):
        os.environ[chunked_loss.FULL_LOGITS_ENV] = "1" if full else "0"
        mx.reset_peak_memory()
        started = time.perf_counter()
        mx.eval(grad_fn(trainee.turn_rows, hidden))
        return time.perf_counter() - started, mx.get_peak_memory()

    layer = {"full logits": [], "chunked": []}
    for full in (True, False):
        output_step(full)
    for _ in range(args.repeats * 2):
        for full, name in ((True, "full logits"), (False, "chunked")):
            layer[name].append(output_step(full))
    print(f"\noutput layer + loss only, {args.repeats * 2} repeats:")
    print(f"{'path':<12} {'s (median)':>11} {'peak GB':>8}")
    for name, runs in layer.items():
        print(f"{name:<12} {statistics.median(r[0] for r in runs):>11.3f} {max(r[1] for r in runs) / 1e9:>8.3f}")
    (old_t, new_t) = (statistics.median(r[0] for r in layer[n]) for n in layer)
    (old_m, new_m) = (max(r[1] for r in layer[n]) for n in layer)
    print(f"{'new / old':<12} {new_t / old_t:>10.2f}x {new_m / old_m:>7.2f}x")
    os.environ.pop(chunked_loss.FULL_LOGITS_ENV, None)


if __name__ == "__main__":
    main()
