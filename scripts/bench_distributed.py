"""Benchmark: one process against two local ranks (`mlx.launch -n 2`), same global batch, same steps.

    python scripts/bench_distributed.py [--examples 48] [--ranks 2]

A random model with gemma-3-270m's shapes (a 32,768-token vocabulary instead of 262,144, so it
builds in seconds) trains one epoch of the shipped persona data's first N examples, in one process
and then under mlx.launch, in the same command. Printed: seconds per step for both and their ratio,
the loss of both (they must agree), and the communication cost of a step: the time of all-summing
a gradient tree as large as the LoRA + turn-row parameters, measured on its own under the launcher.
On one 2-core machine two ranks share the cores, so they cannot be faster; what decides scaling
across Macs is the communication cost against the compute time of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, vocab_size=32768)
LAUNCHER = str(Path(sys.executable).parent / "mlx.launch")

ALL_SUM = """
import sys, time, json
import gemma_mlx
import mlx.core as mx
from gemma_mlx.distributed import world
params, repeats = int(sys.argv[1]), 20
x = mx.zeros((params,), dtype=mx.float32)
mx.eval(mx.distributed.all_sum(x))  # connect and warm up
started = time.perf_counter()
for _ in range(repeats):
    mx.eval(mx.distributed.all_sum(x))
if world().main:
    print(json.dumps({"seconds": (time.perf_counter() - started) / repeats}))
"""


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48, help="training examples (batches of 4)")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()

    import gemma_mlx  # noqa: F401  (BLAS preload)
    from gemma_mlx.tiny import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    env = {**os.environ, "GEMMA_MLX_OUTPUTS": str(work / "outputs"), "HF_HUB_OFFLINE": "1"}
    checkpoint = write_tiny_checkpoint(work / "hf", "pt", seed=0, shape=SHAPE)
    cli = [sys.executable, "-m", "gemma_mlx.cli"]
    run([*cli, "convert", str(checkpoint), "--out", str(work / "model"), "--dtype", "float32", "--flavour", "pt"], env)
    lines = (ROOT / "data" / "bluey" / "conversations.jsonl").read_text().splitlines()[: args.examples + 4]
    data = work / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines[: args.examples]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[args.examples:]) + "\n")
    train = ["train", "--model", str(work / "model"), "--data", str(data), "--epochs", "1", "--lr-schedule", "constant",
             "--val-generation-tokens", "0"]

    results = {}
    for ranks in (1, args.ranks):
        out = work / f"run-{ranks}"
        command = [*cli, *train, "--out", str(out)]
        if ranks > 1:
            command = [LAUNCHER, "-n", str(ranks), "--backend", "ring", "--", *command]
        started = time.perf_counter()
        run(command, env)
        summary = json.loads((out / "summary.json").read_text())
        results[ranks] = {"seconds_per_step": summary["train_seconds"] / summary["steps"], "steps": summary["steps"],
                          "final_loss": summary["final_loss"], "wall": time.perf_counter() - started}

    adapters = json.loads((work / "run-1" / "adapter_config.json").read_text())
    import mlx.core as mx

    trainable = sum(v.size for v in mx.load(str(work / "run-1" / "adapters.safetensors")).values())
    trainable += 2 * SHAPE["hidden_size"]  # the turn-token rows
    script = work / "all_sum.py"
    script.write_text(ALL_SUM)
    comm = json.loads(run([LAUNCHER, "-n", str(args.ranks), "--backend", "ring", "--", sys.executable, str(script),
                           str(trainable)], env).stdout.strip().splitlines()[-1])

    one, many = results[1], results[args.ranks]
    print(f"model: gemma-3-270m shapes, vocab {SHAPE['vocab_size']}, LoRA on {adapters['num_layers']} layers, "
          f"{trainable / 1e6:.2f}M trainable parameters; {one['steps']} steps of 4 examples")
    print(f"1 process:  {one['seconds_per_step']:.2f} s/step, final loss {one['final_loss']:.4f}")
    print(f"{args.ranks} ranks:    {many['seconds_per_step']:.2f} s/step, final loss {many['final_loss']:.4f}  "
          f"({many['seconds_per_step'] / one['seconds_per_step']:.2f}x the time of one process)")
    print(f"communication: all-summing {trainable * 4 / 1e6:.1f} MB of gradients takes {comm['seconds'] * 1e3:.1f} ms "
          f"per step over the ring backend on 127.0.0.1 ({comm['seconds'] / one['seconds_per_step']:.1%} of a "
          "one-process step)")


if __name__ == "__main__":
    main()
