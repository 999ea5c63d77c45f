"""The generation engine: load a model, then answer many prompts in one batch with Gemma's stop rules.

Every prompt is rendered with the one turn format (chat_format), for -pt and -it alike. A reply is
the *first* model turn only: generation stops on <eos>, <end_of_turn> and on any other special or
<unusedN> token (a fine-tuned base model ends its turn with those, see docs/DESIGN.md), the stop token is
never part of the text, and `Reply.stop_token` names it. A thought channel (Gemma 4) does not end a
reply: its text is kept apart in `Reply.thought`, never in `Reply.text`, and decoding goes on to the
answer; `thinking` turns the model's thinking on where its family has it. A reply that reaches max_tokens is reported
with finish_reason "length" (a cut reply), never silently shown as complete.

All prompts x samples of a call go through one mlx-lm BatchGenerator, each row with its own sampler,
logits processors and token limit, so a settings sweep is one batch too. Sampling draws come from a
per-row key made from (seed, sample index): a row's reply does not depend on what else is in the
batch, and the same seed gives the same replies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from .chat_format import prompt_ids, reply_end_token_ids, thought_channel_ids
from .models import LoadedModel, load_model  # noqa: F401  (load_model: the documented import path)
from .config import GenerationSettings, check_settings
from .errors import ConfigError, GemmaMlxError
from .manifest import Progress

# Rows decoded together: as many as fit in memory (decode_step.rows_that_fit), at most MAX_BATCH_ROWS;
# more rows than that still run, continuously batched by mlx-lm. DEFAULT_ROWS for a generator whose
# rows join later (the arena).
MAX_BATCH_ROWS = 1024
DEFAULT_ROWS = 128
MAX_PREFILL_ROWS = 32
PROGRESS_SECONDS = 15.0  # a progress line at least this often while a batch runs


@dataclass
class Reply:
    prompt_index: int
    sample_index: int
    prompt: str  # the last user message
    text: str  # the first model turn, without the stop token, stripped
    tokens: int  # tokens in `text` (the stop token is not counted)
    finish_reason: str  # "stop" | "length"
    stop_token: str | None  # the token that ended the reply, e.g. "<end_of_turn>" or "<unused1359>"
    seconds: float  # wall time from the start of the batch until this reply was done (prefill included)
    tokens_per_second: float  # generated tokens (stop token included) / seconds
    settings: dict  # the GenerationSettings this row used
    thought: str = ""  # what the model wrote in thought channels, never part of `text` ("" when none)

    @property
    def cut(self) -> bool:
        """True when the token limit ended the reply: show it as cut, never as complete."""
        return self.finish_reason == "length"


def _row_key(seed: int, sample_index: int):
    """A PRNG key for one (seed, sample) pair, independent of the batch around it."""
    import mlx.core as mx

    digest = hashlib.sha256(f"{seed}:{sample_index}".encode()).digest()
    return mx.random.key(int.from_bytes(digest[:8], "little") >> 1)


NUCLEUS_CANDIDATES = 1024  # a row's most likely tokens searched for the nucleus before mlx-lm's full sort


def nucleus(logprobs, top_p: float, top_k: int = 0, candidates: int = NUCLEUS_CANDIDATES):
    """The tokens mlx-lm's top-p and then top-k would keep for one row [1, V] of log-probs, as (ids, log-probs)
    [1, n], found among the row's `candidates` most likely tokens; None when the nucleus is wider than those.

    Why: mlx-lm's apply_top_p sorts the whole vocabulary, about 37 ms per row per token on Gemma's 262,144
    tokens here; a partial selection of the top thousand costs about a tenth of that, and a nucleus of p=0.95
    from a fine-tuned persona is a few dozen tokens. The rule is mlx-lm's: a token stays while the mass of
    the tokens above it is below top_p (the row's log-probs are normalised, so the total mass is 1), and
    every token as likely as the last one kept stays too.
    """
    import mlx.core as mx

    vocab = logprobs.shape[-1]
    sampling_top_p = 0 < top_p < 1
    width = min(candidates if sampling_top_p else top_k, vocab)
    ids = mx.argpartition(-logprobs, kth=width - 1, axis=-1)[..., :width]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    if not sampling_top_p:
        return ids, values
    order = mx.argsort(-values, axis=-1)
    ids, values = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    probs = mx.exp(values.astype(mx.float32))
    mass_above = mx.cumsum(probs, axis=-1, inclusive=False)
    last = (mass_above < top_p).sum() - 1  # the last token inside the nucleus
    threshold = mx.take(values[0], last)
    # one sync per row and step (this runs for every sampled row at every token): the mass, the count kept
    total, kept = mx.stack([mass_above[0, -1] + probs[0, -1], (values >= threshold).sum().astype(mx.float32)]).tolist()
    if width < vocab and total < top_p:
        return None  # the nucleus reaches past the candidates
    kept = int(kept)
    if top_k:
        kept = min(kept, top_k)
    return ids[:, :kept], values[:, :kept]


def make_row_sampler(settings: GenerationSettings, sample_index: int = 0):
    """mlx-lm's sampling (temperature, top-p, min-p, top-k, in make_sampler's order) with a row's own key.

    Top-p and top-k draw among the kept tokens only (nucleus()): the same distribution as mlx-lm's masked
    full-vocabulary draw, at a fraction of its cost. min-p, and a nucleus too wide to find that way, take
    mlx-lm's own path.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if settings.temperature == 0:
        return greedy_sampler  # one shared object: mlx-lm then samples all greedy rows in one call
    state = {"key": _row_key(settings.seed, sample_index)}
    scale = 1 / settings.temperature
    truncates = 0 < settings.top_p < 1 or settings.top_k > 0

    def sample(logprobs):
        state["key"], draw = mx.random.split(state["key"])
        if truncates and settings.min_p == 0 and logprobs.shape[0] == 1:
            kept = nucleus(logprobs, settings.top_p, settings.top_k)
            if kept is not None:
                ids, values = kept
                pick = mx.random.categorical(values * scale, key=draw)
                return mx.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        if 0 < settings.top_p < 1:
            logprobs = apply_top_p(logprobs, settings.top_p)
        if settings.min_p > 0:
            logprobs = apply_min_p(logprobs, settings.min_p)
        if 0 < settings.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, settings.top_k)
        return mx.random.categorical(logprobs * scale, key=draw)

    return sample


def min_new_tokens_processor(end_ids: set[int], prompt_length: int, min_new_tokens: int):
    """A logits processor that forbids every reply-ending token until min_new_tokens were generated.

    mlx-lm's batch generator hands processors the prompt plus the tokens so far, so the number
    generated is the context length minus the prompt length.
    """
    import mlx.core as mx
    import numpy as np

    masks: dict[int, object] = {}

    def processor(context, logits):
        if len(context) - prompt_length >= min_new_tokens:
            return logits
        vocab = logits.shape[-1]
        if vocab not in masks:
            blocked = np.zeros(vocab, dtype=bool)
            blocked[[i for i in end_ids if i < vocab]] = True
            masks[vocab] = mx.array(blocked)
        return mx.where(masks[vocab], mx.array(-float("inf"), logits.dtype), logits)

    return processor


def no_repeat_ngram_processor(n: int, prompt_length: int):
    """A logits processor that forbids any token completing an n-gram the reply already contains.

    Greedy decoding of a small fine-tuned model falls into loops ("a big house with a big house
    with ..."); once a token n-gram was said, it cannot be said again. Only the reply counts (the
    prompt may be quoted), and the ending tokens are never banned, so a reply can always stop.
    """
    import mlx.core as mx

    def processor(context, logits):
        reply = context[prompt_length:].tolist() if len(context) > prompt_length else []
        if len(reply) < n:
            return logits
        prefix = reply[len(reply) - n + 1:]
        banned = {reply[i + n - 1] for i in range(len(reply) - n + 1) if reply[i:i + n - 1] == prefix}
        if not banned:
            return logits
        index = mx.array(sorted(banned), dtype=mx.int32)
        logits[:, index] = -float("inf")
        return logits

    return processor


def logits_processors(settings: GenerationSettings, end_ids: set[int], prompt_length: int) -> list:
    """A row's processors, in the order they act. The repetition penalty comes first: the lean decode
    step (decode_step.py) runs it for all rows at once."""
    from .decode_step import RepetitionPenalty

    processors = []
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(settings.repetition_penalty))
    if settings.no_repeat_ngram:
        processors.append(no_repeat_ngram_processor(settings.no_repeat_ngram, prompt_length))
    if settings.min_new_tokens > 0:
        processors.append(min_new_tokens_processor(end_ids, prompt_length, settings.min_new_tokens))
    return processors


_END_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def end_token_ids(tokenizer) -> set[int]:
    """reply_end_token_ids, computed once per tokenizer (it scans the whole vocabulary)."""
    try:
        if tokenizer not in _END_IDS:
            _END_IDS[tokenizer] = reply_end_token_ids(tokenizer)
        return _END_IDS[tokenizer]
    except TypeError:  # not weak-referenceable
        return reply_end_token_ids(tokenizer)


@dataclass
class Row:
    prompt_index: int
    sample_index: int
    prompt: str
    ids: list[int]
    settings: GenerationSettings


def _as_messages(prompt, index: int) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
        and all(m.get("role") in ("system", "user", "assistant") for m in prompt)
        and prompt[-1]["role"] == "user"
    ):
        return prompt
    raise GemmaMlxError(
        f"Prompt {index + 1} is neither a string nor a list of chat turns ending in a user turn "
        f"({{'role': 'system'|'user'|'assistant', 'content': str}}): {prompt!r:.200}"
    )


def _settings_per_prompt(settings, count: int) -> list[GenerationSettings]:
    if isinstance(settings, GenerationSettings):
        per_prompt = [settings] * count
    else:
        per_prompt = list(settings)
        if len(per_prompt) != count:
            raise ConfigError(
                f"Got {len(per_prompt)} generation settings for {count} prompts; give one GenerationSettings "
                "for all prompts, or a list with exactly one per prompt."
            )
    for item in per_prompt:
        check_settings(item)
    return per_prompt


def prompt_rows(tokenizer, prompts, settings, thinking: bool = False) -> list[Row]:
    """One row per prompt x sample, in the order replies are returned (thinking: turned on in every prompt)."""
    rows = []
    for index, (prompt, row_settings) in enumerate(zip(prompts, _settings_per_prompt(settings, len(prompts)))):
        messages = _as_messages(prompt, index)
        try:
            ids = prompt_ids(tokenizer, messages, thinking)
        except ValueError:
            raise GemmaMlxError(no_thinking_message(tokenizer)) from None
        for sample in range(row_settings.samples):
            rows.append(Row(index, sample, messages[-1]["content"], ids, row_settings))
    return rows


def check_context(loaded: LoadedModel, rows: list[Row]) -> None:
    """A prompt plus max_tokens beyond the model's context would run for a long time and then fail or babble."""
    limit = getattr(getattr(loaded.model, "args", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    longest = max(rows, key=lambda r: len(r.ids) + r.settings.max_tokens)
    if len(longest.ids) >= limit:  # no max_tokens can help: the prompt alone fills the context
        raise ConfigError(
            f"The prompt is {len(longest.ids)} tokens, more than {loaded.name} can read ({limit} tokens with its "
            "reply). Shorten it."
        )
    if len(longest.ids) + longest.settings.max_tokens > limit:
        raise ConfigError(
            f"max_tokens {longest.settings.max_tokens} plus a prompt of {len(longest.ids)} tokens is more than "
            f"{loaded.name} can read ({limit} tokens). Lower max_tokens to at most {limit - len(longest.ids)}."
        )


def new_generator(loaded: LoadedModel, rows: int = DEFAULT_ROWS):
    """An mlx-lm BatchGenerator for one model that stops on every reply-ending token.

    Its decode step is the lean one (decode_step.py): no full-vocabulary normalisation for greedy
    rows, the repetition penalty batched.
    """
    from mlx_lm.generate import BatchGenerator

    from .decode_step import make_lean

    generator = BatchGenerator(
        loaded.model,
        stop_tokens=[[i] for i in sorted(end_token_ids(loaded.tokenizer))],
        completion_batch_size=min(rows, MAX_BATCH_ROWS),
        prefill_batch_size=min(rows, MAX_PREFILL_ROWS),
    )
    make_lean(generator)
    return generator


def insert_rows(generator, loaded: LoadedModel, rows: list[Row]) -> list[int]:
    """Queue rows in a (possibly running) generator, each with its own limit, sampler and processors."""
    check_context(loaded, rows)
    end_ids = end_token_ids(loaded.tokenizer)
    return generator.insert(
        [row.ids for row in rows],
        max_tokens=[row.settings.max_tokens for row in rows],
        samplers=[make_row_sampler(row.settings, row.sample_index) for row in rows],
        logits_processors=[logits_processors(row.settings, end_ids, len(row.ids)) for row in rows],
    )


def no_thinking_message(tokenizer) -> str:
    from .families import family_of_tokenizer

    title = family_of_tokenizer(tokenizer).title
    return (f"{title} models have no thinking: their turn format has no way to turn it on and they write no "
            "thought channel. Leave thinking off for this model (drop --thinking, or /settings thinking=off); "
            "a Gemma 4 model can think.")


def finished_reply(tokenizer, row: Row, tokens: list[int], reason: str, stop_id: int | None, seconds: float,
                   thought: list[int] = ()) -> Reply:
    """The Reply of a finished row: its text without the stop token or any thought, and why and when it ended.

    A row that only thought until the token limit has empty text and is cut."""
    from .decoding import thought_without_name

    generated = len(tokens) + len(thought) + (stop_id is not None)
    return Reply(
        prompt_index=row.prompt_index,
        sample_index=row.sample_index,
        prompt=row.prompt,
        text=tokenizer.decode(tokens).strip(),
        tokens=len(tokens),
        finish_reason=reason,
        stop_token=None if stop_id is None else str(tokenizer._tokenizer.convert_ids_to_tokens(int(stop_id))),
        seconds=round(seconds, 4),
        tokens_per_second=round(generated / seconds, 2) if seconds > 0 else 0.0,
        settings=dataclasses.asdict(row.settings),
        thought=thought_without_name(tokenizer.decode(list(thought))) if thought else "",
    )


def _run_rows(loaded: LoadedModel, rows: list[Row], progress: Progress | None = None,
              on_text: Callable[[str], None] | None = None,
              on_thought: Callable[[str], None] | None = None) -> list[Reply]:
    """Decode all rows in one BatchGenerator (through a decoding.Driver) and turn them into Replies.

    on_text, for one row (chat), hears the reply's text piece by piece as it is made; on_thought the
    text of its thought channels.
    """
    check_context(loaded, rows)
    from .decode_step import rows_that_fit
    from .decoding import Driver

    generator = new_generator(loaded, rows_that_fit(loaded.model, rows, DEFAULT_ROWS, MAX_BATCH_ROWS))
    driver = Driver(generator, loaded.tokenizer, text=on_text is not None or on_thought is not None,
                    channel=thought_channel_ids(loaded.tokenizer))
    try:
        driver.track(insert_rows(generator, loaded, rows), list(range(len(rows))))
        replies: dict[int, Reply] = {}
        made = 0
        started = last_report = time.perf_counter()
        while (events := driver.step()) is not None:
            now = time.perf_counter()
            if progress is not None and now - last_report >= PROGRESS_SECONDS:  # a long batch shows it is alive
                last_report = now
                progress(f"{loaded.name}: {len(replies)}/{len(rows)} replies done, {made} tokens in {now - started:.0f}s "
                         f"({made / (now - started):.0f} tokens/s)")
            for event in events:
                made += event.stop_id is None
                if event.thought and on_thought is not None:
                    on_thought(event.thought)
                if event.piece and on_text is not None:
                    on_text(event.piece)
                if event.finish_reason is not None:
                    i = event.stream.tag
                    replies[i] = finished_reply(loaded.tokenizer, rows[i], event.stream.tokens, event.finish_reason,
                                                event.stop_id, event.seconds, event.stream.thought)
                    # a line per quarter of the batch: enough to see it move, not a wall of text
                    done = len(replies)
                    if progress is not None and (done == len(rows) or done % max(1, len(rows) // 4) == 0):
                        progress(f"{loaded.name}: {done}/{len(rows)} replies done")
    finally:
        driver.close()
    return [replies[i] for i in range(len(rows))]


def generate_replies(
    loaded: LoadedModel,
    prompts: list[str] | list[list[dict]],
    settings: GenerationSettings | list[GenerationSettings] = GenerationSettings(),
    progress: Progress | None = None,
    thinking: bool = False,
) -> list[Reply]:
    """Replies to every prompt (a string is one user turn; or a list of chat turns), `samples` each.

    `settings` is one GenerationSettings for all prompts or a list with one per prompt (a sweep).
    All prompts x samples run as one batch; replies come back ordered by prompt, then sample.
    The batch's throughput is sum(r.tokens) / max(r.seconds).
    """
    if not prompts:
        return []
    rows = prompt_rows(loaded.tokenizer, list(prompts), settings, thinking)
    if progress is not None:
        progress(f"{loaded.name}: generating {len(rows)} replies ({len(prompts)} prompts) in one batch")
    return _run_rows(loaded, rows, progress)


def stream_reply(
    loaded: LoadedModel,
    messages: list[dict],
    settings: GenerationSettings = GenerationSettings(),
    on_text: Callable[[str], None] | None = None,
    thinking: bool = False,
    on_thought: Callable[[str], None] | None = None,
) -> Reply:
    """One reply to a conversation, with its text handed to `on_text` piece by piece (for chat), and
    its thought's text to `on_thought`.

    Same engine, format and stop rules as generate_replies; `samples` is ignored (one reply).
    """
    settings = dataclasses.replace(settings, samples=1)
    rows = prompt_rows(loaded.tokenizer, [messages], settings, thinking)
    return _run_rows(loaded, rows, on_text=on_text, on_thought=on_thought)[0]
