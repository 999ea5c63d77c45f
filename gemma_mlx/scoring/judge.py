"""`--judge MODEL`: a local MLX model grades every reply 1-5 against a fixed rubric.

A small model is a noisy judge, so the rubric is short, the answer is one digit, and anything
that is not a digit from 1 to 5 counts as no score rather than a guess.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from ..config import GenerationSettings
from ..generate import generate_replies
from ..model_ref import ModelRef

JUDGE_RUBRIC = "in character, on topic, complete"
JUDGE_SETTINGS = GenerationSettings(max_tokens=8, temperature=0.0)
JUDGE_TEMPLATE = (
    "You are grading one reply written by a chatbot that should speak as {who}.\n"
    "Rubric: the reply is in character, on topic (it answers the message), and complete (it ends "
    "properly instead of stopping mid-sentence). 5 = all three fully, 1 = none of them.\n\n"
    "Message: {prompt}\n\nReply: {reply}\n\n"
    "Answer with a single digit from 1 to 5."
)


def parse_judge_score(text: str) -> int | None:
    """The first digit of the judge's answer if it is 1-5; anything else is no score."""
    match = re.search(r"\d", text)
    return int(match.group()) if match and 1 <= int(match.group()) <= 5 else None


def judge_prompt(prompt: str, reply: str, persona: dict) -> str:
    who = persona["name"] or "the persona it was given"
    if persona.get("description"):
        who = f"{who} ({persona['description'].strip()})"
    return JUDGE_TEMPLATE.format(who=who, prompt=prompt, reply=reply.strip() or "(empty)")


def judge_replies(judge: ModelRef, prompts: list[str], models: list, persona: dict, seed: int,
                  progress: Callable[[str], None]) -> None:
    """Score every reply of every model (compare.ModelRun) in one batch; fills reply["judge_score"] and ["judge_raw"].

    The judge is loaded here and dropped on return; the caller frees MLX's buffer cache.
    """
    replies = [r for m in models for r in m.replies]
    progress(f"judge: loading {judge.spec}")
    loaded = judge.load()
    progress(f"judge: scoring {len(replies)} replies")
    texts = [judge_prompt(prompts[r["prompt_index"]], r["text"], persona) for r in replies]
    answers = generate_replies(loaded, texts, dataclasses.replace(JUDGE_SETTINGS, seed=seed))
    for reply, answer in zip(replies, answers):
        reply["judge_raw"] = answer.text[:200]
        reply["judge_score"] = parse_judge_score(answer.text)
