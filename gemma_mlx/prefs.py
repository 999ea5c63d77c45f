"""`gemma-mlx prefs`: preference pairs from the model's own samples, when no person is at hand.

For each training prompt the fine-tuned model samples K replies (all prompts x K in one batch), and
the scorecard ranks them the way a reader judges a reply:
  1. it ended by itself, says something, ends a sentence, and does not loop (then: does not loop);
  2. its length is within half to twice the persona's mean reply length (the training replies');
  3. it has a voice marker of the persona (persona.yaml's markers);
  4. inside the band, the higher on-topic score (scoring/ontopic.py, scored by the base model; an
     echo of the prompt gets none); outside it, the nearer length.
The best reply becomes "chosen", the worst "rejected"; a prompt whose best and worst rank the same
gives no pair. The rule is printed and every pair carries why each side ranked where it did, so a
person can read and edit the file before `gemma-mlx train --preferences` uses it. Every sample, in
its prompt's ranked order, goes to a second file beside it (samples_path): sampling is most of the
command's time, and a person who wants other pairs can pick them from there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import GenerationSettings
from .errors import DataError, OutputExistsError
from .manifest import Progress, lock_output, quiet, release_output, write_text_atomic
from .scoring.best_of import LENGTH_BAND, ends_cleanly, length_ratio
from .scoring.ontopic import echoes
from .text import is_loop, word_count

SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # varied but sensible replies to choose between


def rule_text(target_words: float | None, markers: bool, on_topic: bool) -> str:
    """The ranking rule, as printed and recorded."""
    band = (f"{LENGTH_BAND[0]:g}-{LENGTH_BAND[1]:g}x the persona's mean reply ({target_words:.0f} words)"
            if target_words else "any length (no training replies to measure)")
    steps = ["ends by itself with a whole sentence and no loop (then: no loop)", f"length within {band}"]
    if markers:
        steps.append("has a voice marker")
    steps.append("the higher on-topic score inside the band, the nearer length outside it" if on_topic
                 else "the nearer length (on-topic scoring is off)")
    return "best = chosen, worst = rejected, ranked by: " + "; ".join(f"{i}. {s}" for i, s in enumerate(steps, 1))


@dataclass
class Ranked:
    text: str
    key: tuple
    why: str


def rank_reply(prompt: str, text: str, finish_reason: str, target_words: float | None, markers: list[str],
               on_topic: float | None) -> Ranked:
    """The sort key (higher is better) of one reply and a short note of what decided it."""
    from .persona import find_phrases

    loop = is_loop(text)
    clean = ends_cleanly(text, finish_reason)
    tier = 2 if clean and not loop else 1 if not loop and text.strip() else 0
    words = word_count(text)
    ratio = length_ratio(words, target_words)
    in_band = ratio is None or LENGTH_BAND[0] <= ratio <= LENGTH_BAND[1]
    found = find_phrases(text, markers) if markers else []
    echo = echoes(prompt, text)
    topic = on_topic if on_topic is not None and not echo else -math.inf
    last = topic if in_band else -abs(math.log(ratio))
    ending = "clean" if tier == 2 else "loops" if loop else "cut" if finish_reason == "length" else "unfinished"
    notes = [ending, f"{words} word{'' if words == 1 else 's'}" + ("" if in_band else " (outside the band)")]
    if markers:
        notes.append(f"markers: {', '.join(found)}" if found else "no marker")
    if on_topic is not None:
        notes.append("echoes the prompt" if echo else f"on-topic {on_topic:+.2f}")
    return Ranked(text, (tier, in_band, bool(found), last), "; ".join(notes))


def best_first(ranked: list[Ranked]) -> list[Ranked]:
    """One prompt's replies from best to worst (of equal keys, the earlier sample first)."""
    return [ranked[i] for i in sorted(range(len(ranked)), key=lambda i: (ranked[i].key, -i), reverse=True)]


def pick_pair(ranked: list[Ranked]) -> tuple[Ranked, Ranked] | None:
    """(best, worst) of one prompt's replies; None when nothing separates them."""
    order = best_first(ranked)
    best, worst = order[0], order[-1]
    if best.key == worst.key or best.text.strip() == worst.text.strip():
        return None
    return best, worst


@dataclass
class PrefsResult:
    out: Path
    pairs: int
    prompts: int
    rule: str
    skipped: int  # prompts whose replies ranked the same


def samples_path(out: Path) -> Path:
    """Where every ranked sample goes: prefs.jsonl -> prefs.samples.jsonl, beside the pairs."""
    out = Path(out)
    return out.with_name(f"{out.stem}.samples{out.suffix or '.jsonl'}")


def training_prompts(data, split: str, seed: int):
    """(prompts as message lists, the persona's mean reply words) of one split of the data."""
    from .examples import load_splits

    splits = load_splits(data, seed=seed)
    examples = getattr(splits, split)
    prompts = [e.messages[:-1] for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    replies = [word_count(e.reply) for e in splits.train if e.reply]
    return prompts, (sum(replies) / len(replies) if replies else None)


def make_prefs(model: str, data, out: Path, samples: int = 4, persona: Path | None = None, split: str = "train",
               max_tokens: int = 256, seed: int = 0, on_topic: bool = True, force: bool = False,
               progress: Progress = quiet) -> PrefsResult:
    """Sample `samples` replies per prompt of `data`'s split, rank them, write chosen/rejected pairs to `out`
    (and every sample to samples_path(out)), one process at a time per `out`."""
    out = Path(out)
    if samples < 2:
        from .errors import ConfigError

        raise ConfigError(f"--samples is {samples}; a pair needs at least 2 replies to choose between.")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_output(out, "prefs")  # a second prefs on the same --out is refused, not left to overwrite this one's
    try:
        return _make_prefs(model, data, out, samples, persona, split, max_tokens, seed, on_topic, force, progress)
    finally:
        release_output(out)


def check_prefs_target(out: Path, data, force: bool) -> None:
    """Before any sampling: the pairs and the samples file may be written where `--out` says. Never a folder,
    never the data (the outputs' rule 1) or a file in the data's folder (a dataset folder reads every JSONL
    in it), and an existing file only with force."""
    from .manifest import StageOutput, refuse_to_replace_inputs

    data_path = Path(data).expanduser()
    for path, what in ((out, "perhaps pairs someone edited"), (samples_path(out), "the samples of an earlier run")):
        if path.is_dir():
            raise OutputExistsError(f"{path} is a folder; --out takes the name of the pairs file to write, "
                                    f"e.g. {path / 'pairs.jsonl'}.")
        if data_path.is_dir() and data_path.resolve() in path.resolve().parents:
            raise OutputExistsError(f"{path} is inside the data folder ({data}); the pairs there would join its "
                                    "examples, so it is refused, even with --force. Write them beside the data instead.")
        if data_path.exists():
            refuse_to_replace_inputs(StageOutput("prefs", path, key={}, inputs={"the data": data_path}))
        if path.exists() and not force:
            raise OutputExistsError(f"{path} exists ({what}). Choose another --out, or add --force to replace it.")


def _make_prefs(model, data, out: Path, samples: int, persona, split: str, max_tokens: int, seed: int,
                on_topic: bool, force: bool, progress: Progress) -> PrefsResult:
    from .generate import generate_replies
    from .models import load_model
    from .persona import load_persona, persona_beside

    check_prefs_target(out, data, force)
    prompts, target = training_prompts(data, split, seed)
    if not prompts:
        raise DataError(f"{data} has no {split} prompts to sample (no {split} split, or none of its examples ends in a "
                        "reply). Give --split train, or data that has that split.")
    persona_path = Path(persona) if persona else persona_beside(data)
    markers = load_persona(persona_path).markers if persona_path else []
    spec = str(model)  # a train output dir stands for BASE::ADAPTERS (models.split_spec)
    loaded = load_model(spec)
    settings = GenerationSettings(max_tokens=max_tokens, samples=samples, seed=seed, **SAMPLING)
    progress(f"prefs: {len(prompts)} prompts x {samples} samples from {loaded.name} "
             f"(temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, up to {max_tokens} tokens)")
    replies = generate_replies(loaded, prompts, settings, progress)
    del loaded
    scores = _on_topic_scores(spec, replies, progress) if on_topic else None
    rule = rule_text(target, bool(markers), scores is not None)
    progress(rule)
    lines, samples, skipped = [], [], 0
    for p, messages in enumerate(prompts):
        mine = [i for i, r in enumerate(replies) if r.prompt_index == p]
        ranked = [rank_reply(replies[i].prompt, replies[i].text, replies[i].finish_reason, target, markers,
                             scores[i] if scores else None) for i in mine]
        pair = pick_pair(ranked)
        prompt = messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages
        samples += _ranked_samples(prompt, ranked, pair)
        if pair is None:
            skipped += 1
            continue
        lines.append(json.dumps({"prompt": prompt, "chosen": pair[0].text, "rejected": pair[1].text,
                                 "chosen_why": pair[0].why, "rejected_why": pair[1].why}, ensure_ascii=False))
    write_text_atomic(samples_path(out), "".join(line + "\n" for line in samples))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    progress(f"prefs: {len(lines)} pairs from {len(prompts)} prompts in {out} ({skipped} prompts whose replies ranked "
             f"the same gave none; all {len(samples)} samples, ranked, in {samples_path(out)}); read or edit it, then: "
             "gemma-mlx train --model MODEL --preferences " + str(out))
    return PrefsResult(out, len(lines), len(prompts), rule, skipped)


def _ranked_samples(prompt, ranked: list[Ranked], pair: tuple[Ranked, Ranked] | None) -> list[str]:
    """One JSONL line per sample of a prompt, best first: its rank, why, and whether the pair took it."""
    taken = {id(pair[0]): "chosen", id(pair[1]): "rejected"} if pair else {}
    return [json.dumps({"prompt": prompt, "rank": rank, "reply": reply.text, "why": reply.why,
                        "pair": taken.get(id(reply), "")}, ensure_ascii=False)
            for rank, reply in enumerate(best_first(ranked), 1)]


def _on_topic_scores(spec: str, replies: list, progress: Progress) -> list[float | None] | None:
    """On-topic scores by the base model of `spec` (None, with a note, when no base is found)."""
    from .model_ref import resolve
    from .scoring.ontopic import default_scoring_model, score_reply_lists

    base = default_scoring_model([resolve(spec)])
    if base is None:
        progress("prefs: no base model found to score on-topic; ranking without it")
        return None
    return score_reply_lists(resolve(base), [replies], progress)[0]

