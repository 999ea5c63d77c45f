"""Blind A/B votes: an append-only file, Bradley-Terry ratings with bootstrap intervals, a preference set.

Each vote is one JSON line (prompt, both replies with their flags, settings, both models, the
choice, the time), written with an fsync, so a crash never loses an acknowledged vote. A write that
fails (a full disk) is cut back off, so the file only ever grows by whole lines; a last line that a
crash still cut short is moved aside at the next start (recover_votes). Ratings are
the Bradley-Terry strengths that best explain the wins (a tie or "both bad" counts half a win each
way), on an Elo-like scale (400 * log10, centred on 1000), with the 2.5-97.5 percentiles of the
same fit on votes resampled with replacement as a 95% interval.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import time
from pathlib import Path

from ..errors import DataError, VoteNotSavedError
from ..manifest import write_failure
from .journal import append_record

CHOICES = ("A", "B", "tie", "bad")  # bad: both replies were bad
MIN_VOTES_FOR_INTERVAL = 5  # below this the resamples are nearly all alike: an interval would claim false certainty


def append_vote(path: Path, vote: dict) -> None:
    """Add one vote to the file and make it durable before returning (fsync).

    Raises VoteNotSavedError (the file unchanged) when it cannot be written, so the caller can keep
    the battle open for another try instead of losing the vote.
    """
    try:
        append_record(path, vote)
    except OSError as error:
        raise _not_saved(Path(path), error) from None


def _not_saved(path: Path, error: OSError) -> VoteNotSavedError:
    """The page shows this as it is: say what happened and that the battle is still open."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some space" if full else "make it a file the arena can write"
    return VoteNotSavedError(
        f"{'Disk full' if full else 'Vote not saved'}: the vote could not be written to {path} ({write_failure(error)}). "
        f"Nothing was added to the file and this battle is still open: {fix}, then vote again."
    )


def recover_votes(path: Path, kind: str = "vote") -> str | None:
    """Move a cut-off last line of a votes file aside, keeping every whole vote; say what was done.

    A crash (or a full disk before whole-line appends) can leave the last line cut short, which
    would stop every later start. Only the last line is touched, and only when every line before
    it is JSON: anything else is not a cut-off write, and read_votes reports it with its line.
    Returns the one-line report, or None when there was nothing to recover. Any JSONL file the arena
    appends to (the saved conversations too) is recovered the same way; `kind` names its records.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1  # where the last line begins
    last = data[start:]
    if not last.strip() or (last.endswith(b"\n") and _is_json(last)):
        return None
    if not last.lstrip().startswith(b"{"):  # not the start of a record cut short: not ours to cut (read_votes says)
        return None
    kept = [line for line in data[:start].splitlines() if line.strip()]
    if not all(_is_json(line) for line in kept):
        return None
    try:
        if _is_json(last):  # whole, only its line end is missing: give it one, or the next vote glues onto it
            with open(path, "ab") as handle:
                handle.write(b"\n")
            return None
        aside = _set_aside(path, last)
        with open(path, "r+b") as handle:
            handle.truncate(start)
            os.fsync(handle.fileno())
    except OSError as error:
        raise DataError(f"{path}: its last line is cut off, and moving it aside failed ({write_failure(error)}). "
                        "The votes file is unchanged; fix that, then start again.") from None
    return (f"{path}: its last line was cut off (a write interrupted by a crash or a full disk); kept the "
            f"{len(kept)} whole {kind}(s) before it and moved the damaged line ({len(last)} bytes) to {aside}")


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # bad JSON, or bytes that are not UTF-8
        return False
    return True


def _set_aside(path: Path, data: bytes) -> Path:
    """Write `data` durably to a new `<votes>.damaged-<time>` file next to `path`; return its name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            with open(aside, "xb") as handle:
                handle.write(data)
                os.fsync(handle.fileno())
            return aside
        except FileExistsError:
            continue
    raise DataError(f"{path}: its last line is cut off, and no free name was found to move it aside. "
                    "Move the old *.damaged-* files next to it away, then start again.")


def read_votes(path: Path) -> list[dict]:
    """Every vote in the file; a damaged line is an error that names it (votes are never guessed)."""
    from ..state import Vote, as_dict, load_state_lines

    path = Path(path)
    if not path.is_file():
        return []
    return [as_dict(vote) for vote in load_state_lines(path, Vote)]  # bad bytes, JSON or fields: file:line


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


def _has_pair(vote: dict) -> bool:
    replies = [vote.get("reply_a"), vote.get("reply_b")]
    return isinstance(vote.get("prompt"), str) and all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                                        for r in replies)


def preference_rows(votes: list[dict]) -> list[dict]:
    """{"prompt", "chosen", "rejected"} per decided vote: the shape DPO trainers read (ties are left out,
    and so is a hand-edited vote that lacks its prompt or a reply's text: it cannot make a pair)."""
    rows = []
    for vote in votes:
        if vote.get("choice") not in ("A", "B") or not _has_pair(vote):
            continue
        win, lose = ("reply_a", "reply_b") if vote["choice"] == "A" else ("reply_b", "reply_a")
        rows.append({"prompt": vote["prompt"], "chosen": vote[win]["text"], "rejected": vote[lose]["text"],
                     "chosen_model": vote["model_a" if win == "reply_a" else "model_b"],
                     "rejected_model": vote["model_b" if win == "reply_a" else "model_a"]})
    return rows
