"""Benchmark: our trainer vs mlx-lm's LoRA trainer on a gemma-3-270m-shaped model, in one command.

    python scripts/bench_train.py [--epochs 2] [--examples 32] [--vocab 32768] [--compile]

Builds a random model with gemma-3-270m's shapes (hidden 640, 18 layers, intermediate 2048, 4 heads,
1 KV head, head_dim 256; the vocabulary is cut from 262144 to --vocab to fit the time budget),
converts it to float32, writes ~140-token chat examples of mixed lengths, then trains the same
examples with equal settings (16 LoRA layers, rank 8, batch 4, response-only loss, Adam, same
learning rate) twice: with mlx-lm's `tuner.trainer.train` and with `gemma_mlx.train.train_model`.
Each trainer runs in its own process, so peak memory is its own. Prints the ratios (ours / mlx-lm)
and our achieved FLOP/s as a share of this machine's measured float32 matmul peak.
Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)

SHAPE_270M = dict(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256)
LORA_LAYERS, RANK, BATCH, LR = 16, 8, 4, 1e-5
WORDS = ("I reckon we should play a game in the backyard today Hooray my little sister wants to be the shopkeeper "
         "and I will be the customer Mum says we can have lunch after the game Dad is going to be a big grumpy "
         "monster who chases us around the garden").split()


def build(root: Path, vocab: int, examples: int, seed: int = 0) -> tuple[Path, Path]:
    """A converted random 270m-shaped model and a train/valid chat dataset of mixed lengths."""
    from gemma_mlx.convert import convert_checkpoint
    from gemma_mlx.tiny import write_tiny_checkpoint

    hf = write_tiny_checkpoint(root / "hf", "it", seed, shape={**SHAPE_270M, "vocab_size": vocab})
    model = convert_checkpoint(str(hf), out=root / "model", dtype="float32").path
    rng = random.Random(seed)
    data = root / "data"
    data.mkdir()
    for split, count in (("train", examples), ("valid", BATCH)):
        with open(data / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                # prompts of 10-50 words and replies of 30-170 words: ~140 tokens on average
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 50)))
                reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 170)))
                record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
                handle.write(json.dumps(record) + "\n")
    return model, data


def matmul_peak(size: int = 2048, repeats: int = 20) -> float:
    """The best float32 matmul FLOP/s this process reaches (same BLAS the trainers use).

    Best of many: on a shared machine other processes lower some of the repeats.
    """
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def step_flops(lengths: list[int], trained: int, vocab: int) -> float:
    """Useful FLOPs of one epoch of our step: the real tokens only, padding and masked logits excluded.

    Forward: every layer; backward (input gradients only, weights are frozen): the LoRA layers;
    output layer: forward and backward at the trained positions only.
    """
    s = SHAPE_270M
    h, inter, q, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    lora = 2 * RANK * ((h + q) * 2 + (h + kv) * 2 + (h + inter) * 2 + (inter + h))
    total = 0.0
    for n in lengths:
        attention = 2 * 2 * n * q / 2  # scores and weighted sum, causal (half the square)
        layer = (per_token + attention) * n
        total += layer * s["num_hidden_layers"] + (layer + 3 * lora * n) * LORA_LAYERS
    return total + 2 * 2 * h * vocab * trained


def run_mlx_lm(model_dir: Path, data: Path, epochs: int, out: Path) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(str(model_dir))
    records = {s: [json.loads(line) for line in (data / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "valid")}
    train_set = CacheDataset(ChatDataset(records["train"], tokenizer, mask_prompt=True))
    valid_set = CacheDataset(ChatDataset(records["valid"], tokenizer, mask_prompt=True))
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, {"rank": RANK, "scale": 20.0, "dropout": 0.0})
    shapes, val_seconds, epoch_seconds = [], [], []

    def recording_batches(**kwargs):
        for batch, lengths in iterate_batches(**kwargs):
            if kwargs.get("loop"):
                shapes.append((batch.shape, [int(x) for x in lengths[:, 1].tolist()]))
            yield batch, lengths

    class Callback:
        def on_train_loss_report(self, info):
            epoch_seconds.append(steps_per_epoch / info["iterations_per_second"])

        def on_val_loss_report(self, info):
            val_seconds.append(info["val_time"])

    steps_per_epoch = len(records["train"]) // BATCH
    steps = epochs * steps_per_epoch
    args = TrainingArgs(batch_size=BATCH, iters=steps, val_batches=1, steps_per_report=steps_per_epoch, steps_per_eval=10**9,
                        steps_per_save=10**9, adapter_file=str(out / "adapters.safetensors"), max_seq_length=2048)
    mx.reset_peak_memory()
    started = time.perf_counter()
    train(model, optim.Adam(learning_rate=LR), train_set, valid_set, args=args, iterate_batches=recording_batches,
          training_callback=Callback())
    seconds = time.perf_counter() - started - sum(val_seconds)
    padded = sum(shape[0] * shape[1] for shape, _ in shapes)
    real = sum(sum(lengths) for _, lengths in shapes)
    return {"seconds": seconds, "epochs": epochs, "steps": steps, "tokens": real, "padding": 1 - real / padded,
            "peak_gb": mx.get_peak_memory() / 1e9, "examples": steps * BATCH, "epoch_seconds": epoch_seconds}


def run_ours(model_dir: Path, data: Path, epochs: int, out: Path, compiled: bool) -> dict:
    import mlx.core as mx

    from gemma_mlx.training import loop as train_loop
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model

    train_loop.COMPILE_STEP = compiled
    lora = LoraSettings(num_layers=LORA_LAYERS, rank=RANK, scale=20.0, train_turn_tokens="off")
    settings = TrainSettings(epochs=epochs, batch_size=BATCH, learning_rate=LR, lr_schedule="constant", optimizer="adam",
                             max_seq_length=2048, end_of_turn_weight=1.0, val_generation_tokens=0, best_by="loss")
    epoch_seconds = [0.0] * epochs

    class EpochTimes(train_loop.TrainingCallback):
        def on_step(self, report):
            epoch_seconds[report.epoch - 1] += report.seconds

    mx.reset_peak_memory()
    result = train_model(model_dir, data, out=out, lora=lora, train=settings, force=True, callback=EpochTimes())
    s = result.summary
    sequences = _our_sequences(model_dir, data)
    flops = step_flops([len(x) - 1 for x in sequences], sum(x.trained_tokens for x in sequences),
                       json.loads((model_dir / "config.json").read_text())["vocab_size"])
    return {"seconds": s["train_seconds"], "epochs": epochs, "steps": s["steps"], "tokens": s["trained_tokens"],
            "padding": s["padding_fraction"], "peak_gb": s["peak_memory_gb"], "examples": s["examples_seen"],
            "flops_per_epoch": flops, "epoch_seconds": epoch_seconds}


def _our_sequences(model_dir: Path, data: Path):
    from mlx_lm.utils import load_tokenizer

    from gemma_mlx.training.batching import tokenize_example
    from gemma_mlx.examples import load_examples

    tokenizer = load_tokenizer(model_dir)
    return [tokenize_example(tokenizer, e) for e in load_examples(data / "train.jsonl")]


def child(args) -> None:
    """One trainer in this process; prints its figures as JSON on the last line."""
    root = Path(args.root)
    if args.part == "mlx-lm":
        figures = run_mlx_lm(root / "model", root / "data", args.epochs, root / "mlx-lm")
    elif args.part == "peak":
        figures = {"peak_flops": matmul_peak()}
    else:
        figures = run_ours(root / "model", root / "data", args.epochs, root / args.part, compiled=args.part == "ours-compiled")
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trainer (default 2; the first holds warm-up)")
    parser.add_argument("--examples", type=int, default=32, help="training examples, a multiple of 4 (default 32)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (real Gemma 3: 262144)")
    parser.add_argument("--compile", action="store_true", help="also time our trainer with an mx.compile'd step")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return child(args)
    if args.examples % BATCH:
        parser.error(f"--examples must be a multiple of {BATCH} (mlx-lm drops the remainder; ours would not)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build(root, args.vocab, args.examples)  # the trainers find the model and data under root
        print(f"model: gemma-3-270m shapes, vocab {args.vocab} (real: 262144), float32, random weights; "
              f"{args.examples} examples, built in {time.perf_counter() - started:.0f}s", flush=True)
        # the peak is measured before and after the trainers; the higher one counts
        parts = ["peak", "mlx-lm", "ours"] + (["ours-compiled"] if args.compile else []) + ["peak"]
        results = {}
        for part in parts:
            started = time.perf_counter()
            command = [sys.executable, __file__, "--part", part, "--root", tmp, "--epochs", str(args.epochs)]
            env = {k: v for k, v in os.environ.items() if k != "MLX_DISABLE_COMPILE"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{part} failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            if part == "peak" and "peak" in results:
                figures["peak_flops"] = max(figures["peak_flops"], results["peak"]["peak_flops"])
            results[part] = figures
            print(f"{part} ({time.perf_counter() - started:.0f}s): {results[part]}", flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    base, peak = results["mlx-lm"], results["peak"]["peak_flops"]
    print(f"\nmachine float32 matmul peak: {peak / 1e9:.0f} GFLOP/s; LoRA {LORA_LAYERS} layers, rank {RANK}, batch {BATCH}, "
          f"{args.epochs} epoch(s), examples seen: mlx-lm {base['examples']}, ours {results['ours']['examples']}")
    for name in [p for p in ("ours", "ours-compiled") if p in results]:
        ours = results[name]
        per_epoch = ours["seconds"] / ours["epochs"], base["seconds"] / base["epochs"]
        tok_s = ours["tokens"] / ours["seconds"], base["tokens"] / base["seconds"]
        achieved = ours["flops_per_epoch"] * ours["epochs"] / ours["seconds"]
        print(f"[{name}] epoch wall time {per_epoch[0]:.1f}s vs mlx-lm {per_epoch[1]:.1f}s: ratio {per_epoch[0] / per_epoch[1]:.2f} "
              f"(goal <= 0.60)")
        if ours["epochs"] > 1:
            steady = sum(ours["epoch_seconds"][1:]) / (ours["epochs"] - 1), sum(base["epoch_seconds"][1:]) / (base["epochs"] - 1)
            print(f"[{name}] after the first epoch (warm-up done): {steady[0]:.1f}s vs {steady[1]:.1f}s per epoch: "
                  f"ratio {steady[0] / steady[1]:.2f}")
        print(f"[{name}] tokens/s {tok_s[0]:.0f} vs {tok_s[1]:.0f}: ratio {tok_s[0] / tok_s[1]:.2f}")
        print(f"[{name}] peak memory {ours['peak_gb']:.2f} GB vs {base['peak_gb']:.2f} GB: ratio {ours['peak_gb'] / base['peak_gb']:.2f}")
        print(f"[{name}] padding {ours['padding']:.1%} vs mlx-lm {base['padding']:.1%}")
        print(f"[{name}] achieved {achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of the matmul peak "
              "(useful FLOPs: real tokens, trained positions' logits)")


if __name__ == "__main__":
    main()
