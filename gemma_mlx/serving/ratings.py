"""Blind A/B votes: an append-only file, Bradley-Terry ratings with bootstrap intervals, a preference set.

Each vote is one JSON line (prompt, both replies with their flags, settings, both models, the
choice, the time), written with an fsync, so a crash never loses an acknowledged vote. Ratings are
the Bradley-Terry strengths that best explain the wins (a tie or "both bad" counts half a win each
way), on an Elo-like scale (400 * log10, centred on 1000), with the 2.5-97.5 percentiles of the
same fit on votes resampled with replacement as a 95% interval.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
from pathlib import Path

from ..errors import DataError

CHOICES = ("A", "B", "tie", "bad")  # bad: both replies were bad
MIN_VOTES_FOR_INTERVAL = 5  # below this the resamples are nearly all alike: an interval would claim false certainty
_WRITE_LOCK = threading.Lock()


def append_vote(path: Path, vote: dict) -> None:
    """Add one vote to the file and make it durable before returning (fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(vote, ensure_ascii=False) + "\n"
    with _WRITE_LOCK, open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_votes(path: Path) -> list[dict]:
    """Every vote in the file; a damaged line is an error that names it (votes are never guessed)."""
    path = Path(path)
    if not path.is_file():
        return []
    votes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            vote = json.loads(line)
            vote["model_a"], vote["model_b"], vote["choice"]  # noqa: B018  (all three must be there)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: not a vote (a JSON line with model_a, model_b and choice). "
                            "Fix or remove that line.") from None
        votes.append(vote)
    return votes


def _scores(vote: dict) -> tuple[float, float]:
    return {"A": (1.0, 0.0), "B": (0.0, 1.0)}.get(vote["choice"], (0.5, 0.5))


def bradley_terry(votes: list[dict], models: list[str], iterations: int = 200) -> dict[str, float]:
    """Strengths (Elo-like scale) from pairwise outcomes, by the minorize-maximize iteration.

    A small prior (one tie against an average opponent) keeps an unbeaten or winless model finite.
    """
    if not models:
        return {}
    wins = {m: 0.5 for m in models}  # the prior: half a win ...
    games: dict[tuple[str, str], float] = {}
    for vote in votes:
        a, b = vote["model_a"], vote["model_b"]
        if a not in wins or b not in wins or a == b:
            continue
        score_a, score_b = _scores(vote)
        wins[a] += score_a
        wins[b] += score_b
        key = tuple(sorted((a, b)))
        games[key] = games.get(key, 0.0) + 1.0
    strength = {m: 1.0 for m in models}
    for _ in range(iterations):
        new = {}
        for m in models:
            denominator = 1.0 / (strength[m] + 1.0)  # ... against a virtual opponent of strength 1
            for (a, b), n in games.items():
                if m in (a, b):
                    other = b if m == a else a
                    denominator += n / (strength[m] + strength[other])
            new[m] = wins[m] / denominator
        mean_log = sum(math.log(v) for v in new.values()) / len(new)
        strength = {m: v / math.exp(mean_log) for m, v in new.items()}
    return {m: 1000.0 + 400.0 * math.log10(v) for m, v in strength.items()}


def leaderboard(votes: list[dict], models: list[str], rounds: int = 200, seed: int = 0) -> dict:
    """Ratings with 95% bootstrap intervals, votes per model and per pair, and reply flag rates.

    A model with fewer than MIN_VOTES_FOR_INTERVAL votes gets no interval (low and high are None).
    """
    ratings = bradley_terry(votes, models)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {m: [] for m in models}
    if votes:
        for _ in range(rounds):
            resampled = [votes[rng.randrange(len(votes))] for _ in votes]
            for m, value in bradley_terry(resampled, models, iterations=60).items():
                samples[m].append(value)
    rows = []
    for m in models:
        count = sum(1 for v in votes if m in (v["model_a"], v["model_b"]))
        values = sorted(samples[m]) if count >= MIN_VOTES_FOR_INTERVAL else []
        low = values[int(0.025 * (len(values) - 1))] if values else None
        high = values[int(0.975 * (len(values) - 1))] if values else None
        replies = [v[side] for v in votes for side, name in (("reply_a", "model_a"), ("reply_b", "model_b"))
                   if v.get(name) == m and isinstance(v.get(side), dict)]
        n = len(replies)
        rows.append({
            "model": m, "rating": round(ratings[m], 1), "low": None if low is None else round(low, 1),
            "high": None if high is None else round(high, 1),
            "votes": count,
            "stop_rate": sum(r.get("finish_reason") == "stop" for r in replies) / n if n else None,
            "cut_rate": sum(bool(r.get("cut")) for r in replies) / n if n else None,
            "loop_rate": sum(bool(r.get("loop")) for r in replies) / n if n else None,
        })
    rows.sort(key=lambda r: -r["rating"])
    pairs: dict[str, dict] = {}
    for vote in votes:
        a, b = sorted((vote["model_a"], vote["model_b"]))
        entry = pairs.setdefault(f"{a} vs {b}", {"a": a, "b": b, "votes": 0, "a_wins": 0, "b_wins": 0, "ties": 0})
        entry["votes"] += 1
        winner = {"A": vote["model_a"], "B": vote["model_b"]}.get(vote["choice"])
        if winner is None:
            entry["ties"] += 1
        else:
            entry["a_wins" if winner == a else "b_wins"] += 1
    return {"models": rows, "pairs": list(pairs.values()), "votes": len(votes), "min_votes": MIN_VOTES_FOR_INTERVAL}


def preference_rows(votes: list[dict]) -> list[dict]:
    """{"prompt", "chosen", "rejected"} per decided vote: the shape DPO trainers read (ties are left out)."""
    rows = []
    for vote in votes:
        if vote["choice"] not in ("A", "B"):
            continue
        win, lose = ("reply_a", "reply_b") if vote["choice"] == "A" else ("reply_b", "reply_a")
        rows.append({"prompt": vote["prompt"], "chosen": vote[win]["text"], "rejected": vote[lose]["text"],
                     "chosen_model": vote["model_a" if win == "reply_a" else "model_b"],
                     "rejected_model": vote["model_b" if win == "reply_a" else "model_a"]})
    return rows
