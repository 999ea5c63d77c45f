"""The one Gemma 3 turn format used everywhere (training, compare, chat), for -pt and -it alike.

    <bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n

A system message is folded into the first user turn, as Gemma 3's own template does.
Using the same format for both models is what makes the base-vs-instruct comparison fair.
"""

from __future__ import annotations

import re

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
TURN_TOKEN_IDS = (START_OF_TURN_ID, END_OF_TURN_ID)
STOP_TOKEN_IDS = (EOS_ID, END_OF_TURN_ID)
UNUSED_TOKEN = re.compile(r"^<unused\d+>$")

# Jinja template written for this project; its output matches Gemma 3's turn layout.
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _role(message: dict) -> str:
    return "model" if message["role"] == "assistant" else message["role"]


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The turn text for a conversation, with a leading <bos> (tokenize it without adding another)."""
    system = ""
    parts = [BOS]
    for message in messages:
        if message["role"] == "system":
            system = message["content"] + "\n\n"
            continue
        prefix = system if message["role"] == "user" else ""
        if message["role"] == "user":
            system = ""
        parts.append(f"{START_OF_TURN}{_role(message)}\n{prefix}{message['content'].strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered turn text; the text carries its own <bos>, so add none."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(hf.encode(text, add_special_tokens=False))


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a conversation ending in an open model turn, ready for generation."""
    return encode(tokenizer, render(messages, add_generation_prompt=True))


def reply_end_token_ids(tokenizer) -> set[int]:
    """Every token that must end a reply: <eos>, <end_of_turn>, any other special token, <unusedN>.

    A fine-tuned base model spreads "end of turn" probability over all the never-trained tokens
    (see docs/DESIGN.md), so stopping only on {1, 106} lets it ramble to the token limit.
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = set(STOP_TOKEN_IDS)
    ids.update(int(i) for i in (getattr(hf, "all_special_ids", None) or []))
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    for token, token_id in hf.get_vocab().items():
        if token in SPECIAL_NAMES or UNUSED_TOKEN.match(token):
            ids.add(int(token_id))
    return ids


SPECIAL_NAMES = {BOS, EOS, PAD, START_OF_TURN, END_OF_TURN, "<unk>", "<mask>", "[multimodal]"}
