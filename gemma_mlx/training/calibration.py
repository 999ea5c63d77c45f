"""Length calibration: greedy replies as long as the persona's, from a shift of the reply-end logit kept in the weights.

A fine-tuned 270M ends its replies too early: on the shipped Bluey data the kept adapters' held-out
replies had 0.73-0.76x the training replies' words, and on a uniform 40-80-word set 0.73x (docs/DESIGN.md).
The checkpoint choice cannot fix that, and the training recipe moved length unpredictably (a lower
end-of-turn weight gave 0.80x on one set and 0.58x on another). A bias on the turn-end logit moves it
smoothly: on the Bluey persona's 26 held-out prompts, -1, -2 and -3 gave 0.86x, 1.03x and 1.20x the
training replies' words, every reply still ending cleanly and none looping.

A bias added by the decoder would not reach llama.cpp, Ollama, LM Studio or the web page, so it is folded
into the weights. The turn-end token's row is the output layer's row for that logit (Gemma ties them), and
it is one of the rows training already learns. With H the hidden states at the reply positions of the
validation conversations (teacher-forced, the kept adapters), the direction d solves
min ||H d - 1||^2 + lam ||d||^2 (ridge, lam = 0.01 rows): the smallest change of the row that raises its
logit by 1 at those positions (on Bluey's: 0.999 +- 0.023 per unit, |d| 0.14 against the row's 1.06).
The row becomes row + shift * d. The same row is also the token's input embedding, which the
measurement above includes.

The shift is chosen on the validation prompts, never on held-out ones: greedy replies (the generation
defaults: repetition penalty 1.1) at shift 0, then at +-LIMIT (2), and bisection when that goes past the
target, at most MAX_TRIALS decodes; the pick is the shift whose mean words come nearest the persona's (the training replies' mean:
16 validation replies alone are a noisy target), among those that end at least as many replies cleanly
and loop no more than shift 0. The calibrated row goes into the
kept adapters' turn_tokens.safetensors, with the shift and the direction beside it, so a resumed run
undoes it before it calibrates again; fusing and every export carry it without knowing of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# the largest shift either way (logit units). A weak persona (one epoch of the real 270M) took -3.75 at 4: all
# 16 validation replies clean, but 11 of 16 held-out replies stopped and none of 4 in llama.cpp without a penalty
LIMIT = 2.0
FIRST_STEP = 2.0
MAX_TRIALS = 6  # greedy decodes of the validation prompts, shift 0 included
TOLERANCE = 0.05  # mean words within 5% of the target: done
RIDGE = 0.01  # lam per hidden-state row
SHIFT_KEY, DIRECTION_KEY = "end_shift", "end_direction"  # stored beside ids and rows in turn_tokens.safetensors


@dataclass
class Trial:
    """The greedy validation replies at one shift."""

    shift: float
    mean_words: float
    clean: int
    loops: int
    replies: int


def choose_shift(trial: Callable[[float], Trial], target: float, limit: float = LIMIT,
                 most: int = MAX_TRIALS) -> tuple[float, list[Trial]]:
    """The shift whose replies' mean words come nearest `target` (0 when none does better), and every trial.

    Words fall as the shift rises (a likelier end), so: shift 0; if its replies are too short, shifts of
    -FIRST_STEP, twice that, ... up to -limit, until one is long enough (too long, or losing clean endings
    or adding loops: too far); then bisection between the last shift short of the target and the first
    past it. A shift that loses clean endings or adds loops is never picked.
    """
    base = trial(0.0)
    trials = [base]

    def error(t: Trial) -> float:
        return abs(math.log(max(t.mean_words, 1e-9) / target))

    def acceptable(t: Trial) -> bool:
        return t.clean >= base.clean and t.loops <= base.loops

    if error(base) > math.log1p(TOLERANCE) and base.mean_words > 0:
        sign = -1.0 if base.mean_words < target else 1.0  # too short: make the end less likely
        short_of, past = 0.0, None
        shift = sign * FIRST_STEP
        while len(trials) < most:
            t = trial(shift)
            trials.append(t)
            if acceptable(t) and error(t) <= math.log1p(TOLERANCE):
                break
            went_past = not acceptable(t) or (t.mean_words > target if sign < 0 else t.mean_words < target)
            if went_past:
                past = shift
            else:
                short_of = shift
            if past is None:
                if abs(shift) >= limit:
                    break
                shift = sign * min(limit, 2 * abs(shift))
            else:
                shift = (short_of + past) / 2
    best = min((t for t in trials if acceptable(t)), key=lambda t: (round(error(t), 6), abs(t.shift)))
    return best.shift, trials


def direction(hidden: np.ndarray) -> np.ndarray:
    """d minimising ||H d - 1||^2 + lam ||d||^2 (lam = RIDGE rows), in float64: the row change per unit shift."""
    h = hidden.astype(np.float64)
    lam = RIDGE * len(h)
    return np.linalg.solve(h.T @ h + lam * np.eye(h.shape[1]), h.T @ np.ones(len(h)))


def reply_hidden_states(lm, tokenizer, conversations: list[list[dict]], end_id: int) -> np.ndarray:
    """The final hidden states [N, hidden] at every position that predicts a reply token or the reply's end."""
    import mlx.core as mx

    from ..chat_format import encode
    from ..families import family_of_tokenizer

    family = family_of_tokenizer(tokenizer)
    rows = []
    for messages in conversations:
        full = encode(tokenizer, family.render(messages))
        start = len(encode(tokenizer, family.render(messages[:-1], add_generation_prompt=True)))
        ends = [i for i in range(start, len(full)) if full[i] == end_id]
        if not ends:
            continue
        hidden = lm.model(mx.array([full[:ends[0]]]))[0, start - 1:ends[0]]
        rows.append(np.asarray(hidden.astype(mx.float32)))
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def read_saved(path: Path):
    """(ids, rows [n, hidden] float32, shift, direction or None) of a turn_tokens.safetensors, or None without one."""
    import mlx.core as mx

    if not path.is_file():
        return None
    saved = mx.load(str(path))
    shift = float(saved[SHIFT_KEY].item()) if SHIFT_KEY in saved else 0.0
    d = np.asarray(saved[DIRECTION_KEY]).astype(np.float64) if DIRECTION_KEY in saved else None
    return [int(i) for i in saved["ids"].tolist()], np.asarray(saved["rows"].astype(mx.float32)), shift, d


def calibrate_adapters(model_dir: Path, adapter_dir: Path, valid_conversations: list[list[dict]],
                       target_words: float, max_tokens: int, say=lambda line: None) -> dict | None:
    """Calibrate the turn-end row of the adapters in `adapter_dir` (see the module docstring); what was done, or
    None where nothing could be (no validation replies to aim at). Writes turn_tokens.safetensors there."""
    import mlx.core as mx

    from ..adapters import TURN_TOKENS_FILE, set_embedding_rows
    from ..config import GenerationSettings
    from ..families import family_of_tokenizer
    from ..generate import generate_replies, load_model
    from ..text import is_loop, word_count

    conversations = [c for c in valid_conversations if len(c) >= 2 and c[-1].get("role") == "assistant"]
    if not conversations or not target_words or max_tokens <= 0:
        return None
    loaded = load_model(model_dir, adapter_path=adapter_dir)
    end_id = family_of_tokenizer(loaded.tokenizer).turn_end_id
    path = Path(adapter_dir) / TURN_TOKENS_FILE
    saved = read_saved(path)
    row = embedding_row(loaded.model.model.embed_tokens, end_id)
    if saved is not None and saved[3] is not None:  # calibrated before (an interrupted run): start from the row it had
        row = row - saved[2] * saved[3]
        set_embedding_rows(loaded.model, [end_id], mx.array(row[None].astype(np.float32)))
    hidden = reply_hidden_states(loaded.model, loaded.tokenizer, conversations, end_id)
    if not len(hidden):
        return None
    d = direction(hidden)
    prompts = [c[:-1] for c in conversations]
    settings = GenerationSettings(max_tokens=max_tokens)

    def trial(shift: float) -> Trial:
        set_embedding_rows(loaded.model, [end_id], mx.array((row + shift * d)[None].astype(np.float32)))
        replies = generate_replies(loaded, prompts, settings)
        t = Trial(shift, sum(word_count(r.text) for r in replies) / len(replies),
                  sum(not r.cut and not is_loop(r.text) for r in replies), sum(is_loop(r.text) for r in replies),
                  len(replies))
        say(f"length calibration: shift {shift:+.2f}: {t.mean_words:.1f} words a reply (target {target_words:.1f}), "
            f"{t.clean}/{t.replies} clean, {t.loops} looping")
        return t

    shift, trials = choose_shift(trial, target_words)
    if saved is not None or shift:  # (an instruction-tuned run trains no turn rows: no file for a shift of 0)
        _save_row(path, saved, end_id, row, shift, d)
    base = trials[0]
    picked = next(t for t in trials if t.shift == shift)
    return {"shift": shift, "target_words": target_words, "words_before": base.mean_words, "words_after": picked.mean_words,
            "clean_before": base.clean, "clean_after": picked.clean, "replies": base.replies,
            "trials": [asdict(t) for t in trials]}


def embedding_row(embed, token: int) -> np.ndarray:
    """One row of an embedding as float64, de-quantized when the base is quantized (4- or 8-bit bases)."""
    import mlx.core as mx
    import mlx.nn as nn

    if isinstance(embed, nn.QuantizedEmbedding):
        part = slice(token, token + 1)
        biases = None if getattr(embed, "biases", None) is None else embed.biases[part]
        row = mx.dequantize(embed.weight[part], embed.scales[part], biases, embed.group_size, embed.bits,
                            mode=embed.mode)[0]
    else:
        row = embed.weight[token]
    return np.asarray(row.astype(mx.float32)).astype(np.float64)


def _save_row(path: Path, saved, end_id: int, row: np.ndarray, shift: float, d: np.ndarray) -> None:
    """The turn rows file with the turn-end row calibrated (added when the file lacks it), the shift beside it."""
    import mlx.core as mx

    from ..adapters import save_safetensors

    ids, rows = ([], np.zeros((0, len(row)), dtype=np.float32)) if saved is None else saved[:2]
    new_row = (row + shift * d).astype(np.float32)
    if end_id in ids:
        rows = rows.copy()
        rows[ids.index(end_id)] = new_row
    else:
        ids, rows = [*ids, end_id], np.concatenate([rows, new_row[None]])
    save_safetensors(path, {"ids": mx.array(ids, dtype=mx.int32), "rows": mx.array(rows),
                            SHIFT_KEY: mx.array(shift, dtype=mx.float32), DIRECTION_KEY: mx.array(d.astype(np.float32))})
