"""One training recipe on three persona sets of different shape, measured the way a user would judge it.

    python scripts/recipe_study.py BASE_DIR --out /tmp/study [--sets bluey,uniform,shipcat] [-- TRAIN OPTIONS...]

For each set it trains BASE_DIR with `gemma-mlx train --config data/experiment-270m.yaml` plus the
options after `--` (the recipe), then compares the un-tuned base and the persona greedily on held-out
prompts, and the persona again with `--best-of 4`. It prints one table row per set: clean endings,
loops, words against the set's training replies, the persona-marker rate against the base's, on topic
(greedy and best of 4) and the kept epoch. Run again, it picks up where it stopped: `train --resume`
continues an interrupted run and does nothing for a finished one with the same settings (another recipe in
the same --out is refused: use another --out), and a comparison with the same inputs is not made again.

The three sets (issue 19):
- bluey: the shipped Bluey data, replies of 11-148 words; held out: data/prompts (25 prompts);
- uniform: only its replies of 40-80 words (66 conversations, written to OUT/data/uniform); the same prompts;
- shipcat: data/shipcat, a terse ship's cat, replies of 6-20 words; held out: data/shipcat/prompts.txt (20).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLUEY_PROMPTS = [ROOT / "data" / "prompts" / name for name in ("comparison.txt", "personality.txt", "everyday.txt")]


def uniform_set(out: Path) -> Path:
    """The shipped Bluey conversations whose reply has 40-80 words, with Bluey's persona spec."""
    folder = out / "data" / "uniform"
    folder.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "data" / "bluey" / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if 40 <= len(json.loads(line)["messages"][-1]["content"].split()) <= 80]
    (folder / "conversations.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    (folder / "persona.yaml").write_text((ROOT / "data" / "bluey" / "persona.yaml").read_text(encoding="utf-8"))
    return folder


SETS = ("bluey", "uniform", "shipcat")


def dataset(name: str, out: Path) -> tuple[Path, list[Path]]:
    """A set's folder and its held-out prompt files (the uniform set is written under `out` first)."""
    if name == "bluey":
        return ROOT / "data" / "bluey", BLUEY_PROMPTS
    if name == "uniform":
        return uniform_set(out), BLUEY_PROMPTS
    return ROOT / "data" / "shipcat", [ROOT / "data" / "shipcat" / "prompts.txt"]


def gemma_mlx(*args: str, log: Path) -> None:
    """One gemma-mlx command, its progress written to `log` (minutes to an hour each on a CPU)."""
    command = [sys.executable, "-m", "gemma_mlx.cli", *args]
    print(f"$ gemma-mlx {' '.join(args[:3])} ... (progress: {log})", flush=True)
    with open(log, "w") as handle:
        if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            sys.exit(f"gemma-mlx {args[0]} failed; the last lines of {log} say why")


def study_one(base: Path, name: str, data: Path, prompts: list[Path], out: Path, recipe: list[str]) -> dict:
    run, greedy, best = out / name, out / f"{name}-greedy", out / f"{name}-best4"
    shared = [arg for p in prompts for arg in ("--prompts", str(p))]
    shared += ["--persona", str(data / "persona.yaml"), "--training-data", str(data)]
    gemma_mlx("train", "--model", str(base), "--data", str(data), "--config", str(ROOT / "data" / "experiment-270m.yaml"),
              "--out", str(run), "--resume", *recipe, log=out / f"{name}.train.log")
    # --force replaces a comparison whose inputs changed (the run trained again); the same inputs are a no-op
    gemma_mlx("compare", str(base), str(run), *shared, "--out", str(greedy), "--force", log=out / f"{name}-greedy.log")
    gemma_mlx("compare", str(run), *shared, "--best-of", "4", "--out", str(best), "--force", log=out / f"{name}-best4.log")
    return row(name, run, greedy, best)


def scorecards(comparison: Path) -> list[dict]:
    return [m["scorecard"] for m in json.loads((comparison / "comparison.json").read_text())["models"]]


def row(name: str, run: Path, greedy: Path, best: Path) -> dict:
    (base, tuned), (picked,) = scorecards(greedy), scorecards(best)
    summary = json.loads((run / "summary.json").read_text())
    return {"set": name, "replies": tuned["replies"], "clean": tuned["clean_rate"], "loops": tuned["loop_rate"],
            "words_vs_training": tuned["mean_words_vs_training"],
            "markers": tuned["persona_marker_rate"], "markers_base": base["persona_marker_rate"],
            "on_topic": tuned.get("on_topic_rate"), "on_topic_best4": picked.get("on_topic_rate"),
            "kept_epoch": summary.get("best_epoch"), "train_seconds": summary.get("train_seconds")}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(rows: list[dict]) -> str:
    lines = ["| set | clean | loops | words / training | markers (base) | on topic | best of 4 | kept epoch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {pct(r['clean'])} | {pct(r['loops'])} | {r['words_vs_training']:.2f}x | "
                     f"{pct(r['markers'])} ({pct(r['markers_base'])}) | {pct(r['on_topic'])} | {pct(r['on_topic_best4'])} | "
                     f"{r['kept_epoch']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the converted base model directory (the real 270M)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sets", default="bluey,uniform,shipcat")
    argv = sys.argv[1:]
    ours, recipe = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)  # what follows -- goes to `gemma-mlx train` as it is: the recipe
    names = args.sets.split(",")
    unknown = sorted(set(names) - set(SETS))
    if unknown:
        parser.error(f"--sets names {', '.join(unknown)}; the sets are {', '.join(SETS)} (comma-separated)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [study_one(args.base, name, *dataset(name, args.out), args.out, recipe) for name in names]
    (args.out / "study.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
