"""How well the on-topic measure agrees with hand labels (docs/ontopic-labels.jsonl; docs/DESIGN.md, "On topic").

    python scripts/ontopic_agreement.py [MODEL_DIR] [LABELS]

Scores every labelled (message, reply) pair with scoring/ontopic.py under MODEL_DIR (default: the
real 270M base in the gemma-mlx cache) in one call, then prints the scores by label, the accuracy and
confusion counts of ontopic.is_on_topic (threshold, loops and echoes) and of the score alone, and the
best threshold for these labels. Writes the scores next to the labels as LABELS.scores.json.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (BLAS preload before mlx)
from gemma_mlx.generate import load_model
from gemma_mlx.scoring import ontopic

model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache/gemma-mlx/models/gemma-3-270m-q4_k_m"
labels_file = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "docs/ontopic-labels.jsonl"
items = [json.loads(line) for line in labels_file.read_text().splitlines() if line.strip()]
loaded = load_model(model_dir)
started = time.perf_counter()
scores = ontopic.on_topic_scores(loaded.model, loaded.tokenizer, [(i["message"], i["reply"]) for i in items])
seconds = time.perf_counter() - started
truth = [i["label"] == "on" for i in items]


def confusion(threshold: float, score_only: bool = False) -> dict:
    said = [s is not None and s >= threshold if score_only else ontopic.is_on_topic(s, i["message"], i["reply"], threshold)
            for s, i in zip(scores, items)]
    return {"both on": sum(t and s for t, s in zip(truth, said)), "both off": sum(not t and not s for t, s in zip(truth, said)),
            "measure on, label off": sum(s and not t for t, s in zip(truth, said)),
            "measure off, label on": sum(t and not s for t, s in zip(truth, said)),
            "accuracy": sum(t == s for t, s in zip(truth, said)) / len(items)}


for item, score in sorted(zip(items, scores), key=lambda p: p[1] if p[1] is not None else -9):
    print(f"{score:+.3f}  {item['label']:3}  {item['source']:18}  {item['message'][:40]!r} -> {item['reply'][:70]!r}")
for label in ("on", "off"):
    mine = [s for s, i in zip(scores, items) if i["label"] == label and s is not None]
    print(f"label {label}: n={len(mine)} mean {statistics.fmean(mine):+.3f} median {statistics.median(mine):+.3f}")
for source in sorted({i["source"] for i in items}):
    mine = [s for s, i in zip(scores, items) if i["source"] == source and s is not None]
    print(f"{source}: mean {statistics.fmean(mine):+.3f}")
print(f"threshold {ontopic.ON_TOPIC_THRESHOLD}: {confusion(ontopic.ON_TOPIC_THRESHOLD)}")
print(f"score alone, threshold {ontopic.ON_TOPIC_THRESHOLD}: {confusion(ontopic.ON_TOPIC_THRESHOLD, True)}")
sources = sorted({i["source"] for i in items})
for source in sources:
    pairs = [(t, ontopic.is_on_topic(s, i["message"], i["reply"])) for t, s, i in zip(truth, scores, items) if i["source"] == source]
    print(f"{source}: {sum(t == p for t, p in pairs)}/{len(pairs)} agree")
labels_file.with_suffix(".scores.json").write_text(json.dumps([round(s, 4) if s is not None else None for s in scores]) + "\n")
candidates = sorted({round(s, 2) for s in scores if s is not None})
best = max(candidates, key=lambda t: (confusion(t)["accuracy"], -abs(t)))
print(f"best threshold for these labels {best}: {confusion(best)}")
print(f"{len(items)} pairs scored in {seconds:.1f}s (one call, {2 * len(items)} rows)")
