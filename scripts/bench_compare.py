"""Benchmark: `gemma-mlx compare` (one batch per model) vs one prompt at a time with mlx_lm.generate.

Both sides get the same two models, the same 8 prompts in the same Gemma turn format, greedy
decoding and the same max tokens, and both load each model once; the script prints wall times,
tokens/s and the ratio. The models are random Gemma 3 checkpoints of a realistic width (hidden 640,
like gemma-3-270m, but 6 layers and a 32k vocabulary) so a run takes a minute or two on a CPU.

    python scripts/bench_compare.py [--max-tokens 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import mlx.core as mx

PROMPTS = [
    "I'm feeling sad",
    "What should I do today?",
    "Can you help me with my homework?",
    "Tell me a story",
    "What's your favourite game?",
    "How do you handle disagreements?",
    "Explain quantum physics",
    "What do you want for breakfast tomorrow?",
]
SHAPE = dict(hidden_size=640, num_hidden_layers=6, intermediate_size=2048, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, vocab_size=32768)


def build_models(root: Path) -> list[Path]:
    from gemma_mlx.convert import convert_checkpoint
    from gemma_mlx.tiny import write_tiny_checkpoint

    models = []
    for flavour, seed in (("pt", 0), ("it", 1)):
        hf = write_tiny_checkpoint(root / "hf" / f"bench-{flavour}", flavour, seed=seed, shape=SHAPE)
        with contextlib.redirect_stdout(sys.stderr):
            models.append(convert_checkpoint(str(hf), out=root / "mlx" / hf.name, dtype="float32").path)
    return models


def one_at_a_time(models: list[Path], max_tokens: int) -> tuple[float, int]:
    """mlx-lm's own loop: load each model once, then one generation per prompt.

    stream_generate is what mlx_lm.generate runs; calling it directly lets us count the tokens.
    """
    from mlx_lm import load, stream_generate

    from gemma_mlx.chat_format import prompt_ids

    started, tokens = time.perf_counter(), 0
    for path in models:
        model, tokenizer = load(str(path))
        for prompt in PROMPTS:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
            last = None
            for last in stream_generate(model, tokenizer, prompt=ids, max_tokens=max_tokens):
                pass
            tokens += last.generation_tokens if last else 0
        del model
        mx.clear_cache()
    return time.perf_counter() - started, tokens


def batched(models: list[Path], max_tokens: int, out: Path) -> tuple[float, int]:
    """Our compare: one batch per model, scoring and the four report files included."""
    from gemma_mlx.compare import compare_models
    from gemma_mlx.config import GenerationSettings

    started = time.perf_counter()
    # min_new_tokens = max_tokens: a random model hits an <unusedN> token early and our engine would stop
    # there; both sides must generate the same number of tokens for the timing to be comparable
    settings = GenerationSettings(max_tokens=max_tokens, min_new_tokens=max_tokens)
    result = compare_models([str(m) for m in models], list(PROMPTS), settings, out=out)
    seconds = time.perf_counter() - started
    return seconds, sum(m["tokens"] for m in result.results["models"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="Build the models here (and keep them, reused next time) instead of a temp dir.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        models = build_models(root)
        print(f"models: 2 x random Gemma 3 {SHAPE}, float32; 8 prompts; greedy; max {args.max_tokens} tokens", flush=True)
        # warm-up: the first call of a new shape pays one-time costs on both paths
        one_at_a_time(models[:1], 2)
        # reports always go to the fresh temp dir: a report kept from an earlier run with the same
        # inputs would make compare a no-op and the timing meaningless
        batched(models[:1], 2, Path(tmp) / "warmup")
        base_s, base_tokens = one_at_a_time(models, args.max_tokens)
        ours_s, ours_tokens = batched(models, args.max_tokens, Path(tmp) / "report")
    print(f"one at a time (mlx_lm.generate): {base_s:7.2f} s  {base_tokens:5d} tokens  {base_tokens / base_s:8.1f} tokens/s")
    print(f"batched (gemma-mlx compare):     {ours_s:7.2f} s  {ours_tokens:5d} tokens  {ours_tokens / ours_s:8.1f} tokens/s")
    print(f"wall-time ratio: {base_s / ours_s:.2f}x (goal >= 3x); tokens/s ratio: "
          f"{(ours_tokens / ours_s) / (base_tokens / base_s):.2f}x")


if __name__ == "__main__":
    main()
