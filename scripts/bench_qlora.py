"""QLoRA vs LoRA on a float base: CPU seconds per training step and peak memory, in one process.

Both models are the same checkpoint (a float32 model dir and its `convert -q 4` copy); each gets
LoRA rank 8 on the last 16 layers and the base's turn-token rows, the same 4-example batch from the
shipped data, and `--steps` loss+gradient+update steps after one warm-up step. CPU time (not wall
time) is the figure on a shared machine; the ratio against the float32 run is what to read.
Usage: python scripts/bench_qlora.py FLOAT_MODEL_DIR QUANTIZED_MODEL_DIR [--steps 3]
"""

import argparse
import json
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm import load

from gemma_mlx.config import LoraSettings, SHIPPED_DATA
from gemma_mlx.training import batching
from gemma_mlx.training.chunked_loss import output_matrix
from gemma_mlx.training.trainee import loss_fn, prepare


def one_batch(tokenizer, size: int = 4):
    from gemma_mlx.examples import Example

    lines = (SHIPPED_DATA / "bluey" / "conversations.jsonl").read_text(encoding="utf-8").splitlines()[:size]
    examples = [Example(messages=json.loads(line)["messages"], text=None, source=f"conversations.jsonl:{i + 1}")
                for i, line in enumerate(lines)]
    sequences = [batching.tokenize_example(tokenizer, e) for e in examples]
    batch = batching.make_batch(sequences, list(range(size)))
    return mx.array(batch.inputs), mx.array(batch.positions), mx.array(batch.targets)


def measure(model_dir: Path, steps: int) -> dict:
    model, tokenizer = load(str(model_dir))
    trainee = prepare(model, LoraSettings(), train_turn_tokens=True)
    arrays = one_batch(tokenizer)
    optimizer = optim.Adam(learning_rate=1e-4)
    step = nn.value_and_grad(trainee, lambda t, *a: loss_fn(t, *a)[0])
    mx.eval(trainee.parameters())
    mx.reset_peak_memory()
    timings = []
    for number in range(steps + 1):
        started = time.process_time()
        loss, grads = step(trainee, *arrays)
        optimizer.update(trainee, grads)
        mx.eval(loss, trainee.parameters(), optimizer.state)
        if number:  # the first step is a warm-up
            timings.append(time.process_time() - started)
    return {"model": str(model_dir), "cpu_s_per_step": sum(timings) / len(timings), "peak_gb": mx.get_peak_memory() / 1e9,
            "loss": float(loss.item()), "chunked_loss": output_matrix(model) is not None,
            "trained_tokens": int(arrays[1].size)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("quantized_model", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = measure(args.float_model, args.steps)
    print(json.dumps(base), flush=True)
    quantized = measure(args.quantized_model, args.steps)
    print(json.dumps(quantized), flush=True)
    print(f"4-bit / float32: CPU time per step x{quantized['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}, "
          f"peak memory x{quantized['peak_gb'] / base['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
