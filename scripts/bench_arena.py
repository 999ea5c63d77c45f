"""Benchmark: 8 arena requests at once vs the same 8 one after another, through the real server.

Both halves go over HTTP to one `gemma-mlx arena` server (uvicorn in this process) serving one
model, with the same prompts, greedy decoding and max tokens; each request reads its reply stream
to the end. Concurrent requests to one model join the engine's running batch, so the 8 should take
far less than 8 times one. The script prints both wall times, tokens/s and the ratio.

By default the model is a random Gemma 3 checkpoint of a realistic width (hidden 640 like
gemma-3-270m, 6 layers, a 32k vocabulary): it never stops early, so every reply has exactly
--max-tokens tokens. --model DIR measures a real model instead (e.g. the demo's fused model).

    python scripts/bench_arena.py [--max-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import PROMPTS, build_models  # noqa: E402  (the same prompts and model shape)


def serve(model: Path, votes: Path):
    """Start an arena server on a free port; returns (url, server, engine, thread)."""
    import uvicorn

    from gemma_mlx.arena import allowed_hosts_for, arena_setup, make_app
    from gemma_mlx.serving.engine import Engine

    setup = arena_setup([str(model)], votes=votes)
    engine = Engine(setup.models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(setup, engine, allowed_hosts_for("127.0.0.1")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", next(iter(setup.models)), server, engine, thread


async def ask(client, url: str, model: str, prompt: str, max_tokens: int) -> int:
    """One reply, streamed to its end; returns its token count."""
    params = {"model": model, "prompt": prompt, "max_tokens": str(max_tokens), "temperature": "0"}
    async with client.stream("GET", f"{url}/api/stream", params=params, timeout=None) as response:
        response.raise_for_status()
        kind = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "done":
                return json.loads(line[6:])["tokens"]
            elif line.startswith("data: ") and kind == "error":
                raise RuntimeError(json.loads(line[6:])["message"])
    raise RuntimeError("the reply stream ended without a reply")


async def measure(url: str, model: str, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        await ask(client, url, model, "Hello", 4)  # warm-up: the first batch builds its graph
        started = time.perf_counter()
        alone = [await ask(client, url, model, p, max_tokens) for p in PROMPTS]
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        together = await asyncio.gather(*(ask(client, url, model, p, max_tokens) for p in PROMPTS))
        concurrent = time.perf_counter() - started
    return {"sequential_s": sequential, "sequential_tokens": sum(alone),
            "concurrent_s": concurrent, "concurrent_tokens": sum(together)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, help="A converted or fused model dir (default: a random 270M-width one).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            print("building a random 270M-width Gemma 3 model ...", file=sys.stderr)
            model = build_models(root)[0]
        with contextlib.redirect_stdout(sys.stderr):
            url, name, server, engine, thread = serve(model, root / "votes.jsonl")
        try:
            result = asyncio.run(measure(url, name, args.max_tokens))
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            engine.close()

    seq, con = result["sequential_s"], result["concurrent_s"]
    print(f"model: {model if args.model else 'random, hidden 640, 6 layers, vocab 32768'}; "
          f"{len(PROMPTS)} prompts, greedy, max {args.max_tokens} tokens")
    print(f"one at a time : {seq:7.2f} s  {result['sequential_tokens']:5d} tokens  "
          f"{result['sequential_tokens'] / seq:7.1f} tok/s")
    print(f"8 at once     : {con:7.2f} s  {result['concurrent_tokens']:5d} tokens  "
          f"{result['concurrent_tokens'] / con:7.1f} tok/s")
    print(f"ratio         : 8 at once took {con / seq:.2f}x the time of one at a time ({seq / con:.2f}x faster)")


if __name__ == "__main__":
    main()
