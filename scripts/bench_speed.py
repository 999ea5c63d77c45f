"""Benchmark: gemma-mlx against mlx-lm on the real 270M, training and decoding, in one command.

    python scripts/bench_speed.py [--model DIR] [--quick] [--examples N] [--tokens N]

Side by side on this machine, each part in its own process (so its peak memory is its own):

- one epoch of LoRA: `mlx_lm lora` against `gemma-mlx train`, the same examples (the shipped Bluey
  conversations) and settings (16 LoRA layers, rank 8, scale 20, batch 4, Adam at 1e-4, constant
  rate, prompt masked, a 4-example validation set; gemma-mlx without its turn-token rows,
  greedy validation replies and <end_of_turn> weight, which mlx-lm does not have). Whole process
  (the parent's wall clock around the child: start, load, steps, validation, saving), steps only
  (each trainer's own timer) and peak memory. gemma-mlx also runs with GEMMA_MLX_FULL_LOGITS=1,
  the loss path before the chunked one, for the memory ratio. mlx-lm's process gets the same
  OpenBLAS preload as gemma-mlx's (its CLI alone would use MLX's reference BLAS, 30x slower).
- greedy decoding of 16 and 64 prompts (the conversations' first user turns in the Gemma turn
  format): mlx-lm's batch_generate (its default batch sizes) against gemma-mlx's generate_replies,
  in one process, alternating, each on its own copy of the model as it loads one (gemma-mlx's
  MLPs take the multiply-add GELU on the CPU); both stop on the same tokens, and every reply must
  be identical. Then once more with the repetition penalty 1.1 (compare's default) on both sides.
  Each setting runs --repeats pairs (default 3), back to back and in alternating order; the table
  shows the median pair's figures and the range of the ratios (one pair of 8-second runs moved by
  up to 15% on a shared machine).
  gemma-mlx runs as configured (its half-precision screen of the output layer on when torch is there;
  GEMMA_MLX_FAST_ARGMAX=0 for the full logits, GEMMA_MLX_PLAIN_DECODE=1 for mlx-lm's own step and GELU).
- this machine's float32 matmul rate (the best 2048x2048 matmul, before and after), and the share
  of it that each trainer's steps reach, counting the useful FLOPs of the epoch.

--quick: 24 examples (6 steps), 16 and 32 prompts of 32 tokens: about 10-15 minutes on a shared
2-core machine. Not a test: the absolute figures are the machine's and its load's; the ratios
come from the same run.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_MODEL = Path.home() / ".cache" / "gemma-mlx" / "models" / "gemma-3-270m-q4_k_m"
DATA = HERE.parent / "data" / "bluey" / "conversations.jsonl"
LAYERS, RANK, SCALE, BATCH, LR, VALID = 16, 8, 20.0, 4, 1e-4, 4


def write_data(root: Path, examples: int) -> Path:
    """train.jsonl (the first `examples` conversations) and valid.jsonl (the next 4)."""
    records = DATA.read_text().splitlines()
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(records[:examples]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(records[examples:examples + VALID]) + "\n")
    return data


# ----------------------------------------------------------------------------- the child parts
def part_peak(args) -> dict:
    from bench_train import matmul_peak

    return {"peak_flops": matmul_peak()}


def part_mlx_lm(args) -> dict:
    """`mlx_lm lora` as its CLI runs it; a reporting hook records its own step timer and peak memory."""
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    seen = {}

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            seen.update(info)

    lora.get_reporting_callbacks = lambda *a, **k: Record()  # run() builds its callbacks through this
    steps = args.examples // BATCH
    sys.argv = ["mlx_lm.lora", "--model", str(args.model), "--train", "--data", str(Path(args.root) / "data"),
                "--fine-tune-type", "lora", "--num-layers", str(args.num_layers), "--batch-size", str(BATCH),
                "--iters", str(steps), "--learning-rate", str(LR), "--mask-prompt", "--val-batches", "1",
                "--steps-per-report", str(steps), "--steps-per-eval", str(10**6), "--save-every", str(10**6),
                "--adapter-path", str(Path(args.root) / "mlx-lm"), "--max-seq-length", "2048", "--seed", "0"]
    with open(os.devnull, "w") as quiet, _redirect(quiet):
        lora.main()
    return {"steps": steps, "step_seconds": steps / seen["iterations_per_second"], "peak_gb": seen["peak_memory"],
            "loss": seen["train_loss"]}


def our_command(args, root: Path, out: Path) -> list[str]:
    """`gemma-mlx train` with mlx-lm's settings, as its own process."""
    return [sys.executable, "-m", "gemma_mlx.cli", "train", "--model", str(args.model), "--data", str(root / "data"),
            "--out", str(out), "--epochs", "1", "--batch-size", str(BATCH), "--num-layers", str(args.num_layers), "--rank",
            str(RANK), "--scale", str(SCALE), "--learning-rate", str(LR), "--lr-schedule", "constant", "--optimizer",
            "adam", "--max-seq-length", "2048", "--train-turn-tokens", "off", "--end-of-turn-weight", "1",
            "--val-generation-tokens", "0", "--best-by", "loss", "--force"]


def part_decode(args) -> dict:
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load_tokenizer

    from gemma_mlx.chat_format import prompt_ids
    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.generate import end_token_ids, generate_replies, load_model

    loaded = load_model(args.model)
    theirs_model = mlx_lm_load(str(args.model))[0]  # as mlx-lm runs it (our load_model changes the CPU's GELU)
    theirs_tokenizer = load_tokenizer(Path(args.model))
    theirs_tokenizer.eos_token_ids = sorted(end_token_ids(loaded.tokenizer))  # the same stop tokens on both sides
    prompts = [json.loads(line)["messages"][0]["content"] for line in DATA.read_text().splitlines()]

    def mlx_lm_side(count, penalty):
        from mlx_lm.sample_utils import make_logits_processors

        ids = [prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]) for p in prompts[:count]]
        extra = {"logits_processors": make_logits_processors(repetition_penalty=penalty)} if penalty != 1.0 else {}
        started = time.perf_counter()
        out = batch_generate(theirs_model, theirs_tokenizer, ids, max_tokens=args.tokens, return_token_ids=True, **extra)
        seconds = time.perf_counter() - started
        return seconds, [theirs_tokenizer.decode(t).strip() for t in out.token_ids], sum(len(t) for t in out.token_ids)

    def our_side(count, penalty):
        settings = GenerationSettings(max_tokens=args.tokens, repetition_penalty=penalty)
        started = time.perf_counter()
        replies = generate_replies(loaded, prompts[:count], settings)
        seconds = time.perf_counter() - started
        return seconds, [r.text for r in replies], sum(r.tokens for r in replies)

    mlx_lm_side(4, 1.0), our_side(4, 1.0)  # warm-up: kernels, allocations
    results, pairs = [], 0
    for count, penalty in [(args.prompts[0], 1.0), (args.prompts[1], 1.0), (args.prompts[0], 1.1)]:
        runs = []
        for _ in range(args.repeats):  # back-to-back pairs, the order alternating: the load's drift cancels out
            order = (mlx_lm_side, our_side) if pairs % 2 == 0 else (our_side, mlx_lm_side)
            pairs += 1
            timed = {side.__name__: side(count, penalty) for side in order}
            (t_theirs, text_theirs, n_theirs), (t_ours, text_ours, n_ours) = timed["mlx_lm_side"], timed["our_side"]
            runs.append({"mlx_lm_tok_s": n_theirs / t_theirs, "ours_tok_s": n_ours / t_ours,
                         "identical": sum(a == b for a, b in zip(text_theirs, text_ours)), "tokens": [n_theirs, n_ours]})
            mx.clear_cache()
        ratios = sorted(r["ours_tok_s"] / r["mlx_lm_tok_s"] for r in runs)
        middle = sorted(runs, key=lambda r: r["ours_tok_s"] / r["mlx_lm_tok_s"])[len(runs) // 2]
        results.append({"prompts": count, "penalty": penalty, "mlx_lm_tok_s": middle["mlx_lm_tok_s"],
                        "ours_tok_s": middle["ours_tok_s"], "ratios": ratios,
                        "identical": min(r["identical"] for r in runs), "runs": runs})
    from gemma_mlx import fast_argmax

    head = fast_argmax.greedy_head(loaded.model)
    return {"decode": results, "argmax": f"{head.format} screen + exact candidates (fast_argmax)" if head else "full logits"}


class _redirect:
    """stdout and stderr of this process (the trainers' progress) to a file; the JSON line goes out after."""

    def __init__(self, target):
        self.target = target

    def __enter__(self):
        self.saved = os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self.target.fileno(), 1), os.dup2(self.target.fileno(), 2)

    def __exit__(self, *exc):
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self.saved[0], 1), os.dup2(self.saved[1], 2)


PARTS = {"peak": part_peak, "mlx-lm": part_mlx_lm, "decode": part_decode}


# ----------------------------------------------------------------------------- the parent
def run_part(part: str, args, root: Path) -> dict:
    """One part in its own process; its figures (the last line it prints, or gemma-mlx's summary.json)."""
    command = [sys.executable, __file__, "--part", part, "--root", str(root), "--model", str(args.model),
               "--examples", str(args.examples), "--tokens", str(args.tokens), "--num-layers", str(args.num_layers),
               "--repeats", str(args.repeats),
               "--prompts", *(str(p) for p in args.prompts)]
    env = dict(os.environ)
    env.pop("MLX_DISABLE_COMPILE", None)
    if part.startswith("ours"):
        command = our_command(args, root, root / part)
        env["GEMMA_MLX_FULL_LOGITS"] = "1" if part == "ours-full-logits" else "0"
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{part} failed:\n{done.stderr[-3000:]}")
    if part.startswith("ours"):
        summary = json.loads((root / part / "summary.json").read_text())
        figures = {"steps": summary["steps"], "step_seconds": summary["train_seconds"],
                   "peak_gb": summary["peak_memory_gb"], "loss": summary["final_loss"],
                   "padding": summary["padding_fraction"]}
    else:
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = seconds
    print(f"{part} ({seconds:.0f}s): {json.dumps(figures)}", flush=True)
    return figures


def epoch_flops(model: Path, data: Path) -> float:
    """The useful FLOPs of one epoch (real tokens, trained positions' logits), as bench_train counts them."""
    from bench_train import _our_sequences, step_flops

    sequences = _our_sequences(model, data)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return step_flops([len(s) - 1 for s in sequences], sum(s.trained_tokens for s in sequences), vocab)


def report(results: dict, args, flops: float) -> None:
    peak = max(results["peak"]["peak_flops"], results["peak-after"]["peak_flops"])
    base, ours, old = results["mlx-lm"], results["ours"], results["ours-full-logits"]
    print(f"\nfloat32 matmul rate: {peak / 1e9:.0f} GFLOP/s (best 2048x2048 matmul, before and after)")
    print(f"one epoch of LoRA: {args.examples} examples, {base['steps']} steps of {BATCH}, {args.num_layers} layers, rank {RANK}; "
          f"useful work {flops / 1e12:.2f} TFLOP\n")
    rows = ["| work | mlx-lm | gemma-mlx | ratio | target |", "|---|---|---|---|---|"]
    for label, key, unit, target in (("one epoch, whole process", "process_seconds", "s", "<= 0.35x"),
                                     ("one epoch, steps only", "step_seconds", "s", ""),
                                     ("peak memory", "peak_gb", "GB", "")):
        rows.append(f"| {label} | {base[key]:.1f} {unit} | {ours[key]:.1f} {unit} | {ours[key] / base[key]:.2f}x | {target} |")
    rows.append(f"| peak memory, gemma-mlx with the full-logits loss -> chunked | {old['peak_gb']:.2f} GB | "
                f"{ours['peak_gb']:.2f} GB | {ours['peak_gb'] / old['peak_gb']:.2f}x | <= 0.6x |")
    shares = [f"{flops / figures['step_seconds'] / peak:.0%}" for figures in (base, ours)]
    rows.append(f"| share of the matmul rate in the steps | {shares[0]} | {shares[1]} | | >= 50% |")
    print("\n".join(rows + decode_rows(results, args)))


def decode_rows(results: dict, args) -> list[str]:
    """The decode part's table rows (none when decoding was not run)."""
    rows = []
    for d in results.get("decode", {}).get("decode", []):
        label = f"greedy decode, {d['prompts']} prompts x {args.tokens} tokens, tok/s" + (
            f", repetition penalty {d['penalty']}" if d["penalty"] != 1.0 else "")
        target = ">= 2x" if d["prompts"] == args.prompts[0] and d["penalty"] == 1.0 else ""
        spread = f" ({d['ratios'][0]:.2f}-{d['ratios'][-1]:.2f}x in {len(d['ratios'])} pairs)" if len(d["ratios"]) > 1 else ""
        rows.append(f"| {label} (identical replies: {d['identical']}/{d['prompts']}) | {d['mlx_lm_tok_s']:.1f} | "
                    f"{d['ours_tok_s']:.1f} | {d['ours_tok_s'] / d['mlx_lm_tok_s']:.2f}x{spread} | {target} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a converted float32 model directory")
    parser.add_argument("--quick", action="store_true", help="24 examples, 16 and 32 prompts of 32 tokens")
    parser.add_argument("--examples", type=int, help="training examples, a multiple of 4 (default 132)")
    parser.add_argument("--tokens", type=int, help="max tokens per greedy reply (default 64)")
    parser.add_argument("--prompts", type=int, nargs=2, help="the two decode batch sizes (default 16 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="decode pairs per setting; the table shows the median pair and the range (default 3)")
    parser.add_argument("--num-layers", type=int, default=LAYERS, help=argparse.SUPPRESS)  # a tiny model has fewer
    parser.add_argument("--only", choices=["train", "decode"], help="run one half")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.examples = args.examples or (24 if args.quick else 132)
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.prompts = args.prompts or ([16, 32] if args.quick else [16, 64])
    if args.part:
        import gemma_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core, in every part)

        print(json.dumps(PARTS[args.part](args)))
        return
    if args.examples % BATCH:
        parser.error(f"--examples must be a multiple of {BATCH} (mlx-lm drops the remainder; gemma-mlx would not)")
    print(f"model {args.model}; {args.examples} examples; decode {args.prompts} prompts x {args.tokens} tokens; "
          f"load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root, args.examples)
        results = {"peak": run_part("peak", args, root)}
        if args.only != "decode":
            for part in ("mlx-lm", "ours", "ours-full-logits"):
                results[part] = run_part(part, args, root)
        if args.only != "train":
            results["decode"] = run_part("decode", args, root)
        results["peak-after"] = run_part("peak", args, root)
        flops = epoch_flops(args.model, data)
    print(f"load at the end: {os.getloadavg()[0]:.1f}")
    if args.only == "decode":
        print(f"gemma-mlx's greedy argmax: {results['decode']['argmax']}")
        print("\n".join(["| work | mlx-lm | gemma-mlx | ratio | target |", "|---|---|---|---|---|"]
                        + decode_rows(results, args)))
    else:
        report(results, args, flops)


if __name__ == "__main__":
    main()
