"""The one turn format used everywhere (training, compare, chat), for -pt and -it alike.

Gemma 3:

    <bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n

with a system message folded into the first user turn, as Gemma 3's own template does. Gemma 4
writes `<|turn>user\n{text}<turn|>\n` and gives a system message a turn of its own. Which one a
model uses is its family's (families.py), read from the tokenizer; the names below are the
default family's, for code that only knows Gemma 3. Using the same format for both models of a
pair is what makes the base-vs-instruct comparison fair.
"""

from __future__ import annotations

from .families import DEFAULT, FAMILIES, Family, family_of_tokenizer

BOS, EOS, PAD = DEFAULT.bos, DEFAULT.eos, DEFAULT.pad
START_OF_TURN, END_OF_TURN = DEFAULT.turn_start, DEFAULT.turn_end
PAD_ID, EOS_ID, BOS_ID = DEFAULT.pad_id, DEFAULT.eos_id, DEFAULT.bos_id
START_OF_TURN_ID, END_OF_TURN_ID = DEFAULT.turn_start_id, DEFAULT.turn_end_id
TURN_TOKEN_IDS = DEFAULT.turn_token_ids
STOP_TOKEN_IDS = DEFAULT.stop_token_ids
UNUSED_TOKEN = DEFAULT.unused_token

# Jinja template written for this project; its output matches Gemma 3's turn layout.
GEMMA_TURN_TEMPLATE = DEFAULT.chat_template()


def render(messages: list[dict], add_generation_prompt: bool = False, family: Family = DEFAULT) -> str:
    """The turn text for a conversation, with a leading <bos> (tokenize it without adding another)."""
    return family.render(messages, add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered turn text; the text carries its own <bos>, so add none."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    # verbose=False: no transformers notice that the text is longer than the model's maximum (we cut ourselves)
    options = {"verbose": False} if hasattr(hf, "model_max_length") else {}
    return list(hf.encode(text, add_special_tokens=False, **options))


def prompt_ids(tokenizer, messages: list[dict], thinking: bool = False) -> list[int]:
    """Ids of a conversation ending in an open model turn, ready for generation (the tokenizer's family).

    thinking: turn the model's thinking on (a family without thinking raises ValueError)."""
    family = family_of_tokenizer(tokenizer)
    return encode(tokenizer, family.render(messages, add_generation_prompt=True, thinking=thinking))


def thought_channel_ids(tokenizer) -> tuple[int, int] | None:
    """The ids that open and close a thought channel in this tokenizer's family, or None (no thinking)."""
    family = family_of_tokenizer(tokenizer)
    if not family.channel_open:
        return None
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = hf.get_vocab()
    ids = vocab.get(family.channel_open), vocab.get(family.channel_close)
    return None if None in ids else (int(ids[0]), int(ids[1]))


def reply_end_token_ids(tokenizer) -> set[int]:
    """Every token that must end a reply: <eos>, the turn end, any other special token, <unusedN>.

    A fine-tuned base model spreads "end of turn" probability over all the never-trained tokens
    (see docs/DESIGN.md), so stopping only on <eos> and the turn end lets it ramble to the token
    limit. The thought channel's own tokens are the exception: a thought is not the end of a reply
    (decoding.Driver keeps it apart from the reply's text and goes on to the answer).
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    family = family_of_tokenizer(tokenizer)
    ids = set(family.stop_token_ids)
    ids.update(int(i) for i in (getattr(hf, "all_special_ids", None) or []))
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    names = family.special_names
    for token, token_id in hf.get_vocab().items():
        if token in names or family.unused_token.match(token):
            ids.add(int(token_id))
    return ids - set(thought_channel_ids(tokenizer) or ())


SPECIAL_NAMES = set().union(*(f.special_names for f in FAMILIES))
