"""`gemma-mlx chat`: a multi-turn conversation in the terminal, with compare's format and stop rules.

The loop takes its input and output as callables, so tests drive it with a list of lines and the
CLI with `input()` and stdout. Commands: /retry, /undo, /system, /save, /reset, /settings, /help, /quit.

Best of N (`--best-of N`, `/settings best_of=N`): each reply is N rows decoded in one batch, and the
one scoring/best_of.py picks is shown whole once the batch ends (N replies cannot be streamed as
one). The persona's length comes from the training run that made the adapters; the on-topic term
only with `--on-topic-model` (a second model in memory, so it is not loaded by default). With that
model every kept reply ends with "[on topic]" or "[off topic]" (scoring/ontopic.py's rule: does it
answer the message?); best of N scores its N candidates in one call and shows the kept one's.
Ctrl-D or Ctrl-C at the prompt leave; Ctrl-C while a reply is being written stops that reply.

Thinking (`--thinking`, `/settings thinking=on`; Gemma 4 only): the model is asked to think first, and
its thought is shown on a line of its own, marked "thinking: ", before the answer. A thought is never
kept in the history: only the answer is. With thinking off a thought the model writes anyway is not
shown at all.

Only replies that came out whole go into the history the model sees next turn: a reply stopped by
Ctrl-C or by a loop is shown as far as it got and then left out, so one bad turn cannot teach the
rest of the conversation to loop. A message that cannot be answered (too long for the model, a line
that is not UTF-8) is refused on its own line and the conversation goes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from . import decode_step
from .chat_save import save_command, save_conversation  # noqa: F401  (save_conversation: its documented import path)
from .config import LARGEST_INT, GenerationSettings, apply_text_overrides, check_settings
from .errors import GemmaMlxError
from .generate import (LoadedModel, check_context, generate_replies, load_model, no_thinking_message, prompt_rows,
                       stream_reply)
from .scoring.best_of import candidate_settings, persona_words, pick_reply
from .scoring.ontopic import is_on_topic
from .text import is_loop

USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
THOUGHT_MARK = "thinking: "  # opens the line that shows a thought (thinking on), apart from the answer
HELP = (
    "Commands: /retry (a new reply to your last message), /undo (drop the last exchange), /system TEXT "
    "(set the system prompt; /system alone clears it), /save PATH (the conversation as JSONL; /save --force "
    "PATH replaces a file), /reset (forget the conversation), /settings (show), /settings key=value ... "
    "(change, e.g. /settings temperature=0.7 max_tokens=128; best_of=4 keeps the best of 4 replies; thinking=on lets "
    "a Gemma 4 model think first and shows its thought), /help, /quit. Ctrl-D or Ctrl-C leaves."
)
MAX_BEST_OF = 16  # as compare's --best-of
NOT_UTF8 = "(that line is not UTF-8 text, so it was skipped; the conversation is kept)"

ReadLine = Callable[[str], str]  # shows a prompt, returns a line; EOFError / KeyboardInterrupt end the chat
Write = Callable[[str], None]  # writes text as is (no newline added)


def read_piped_line(prompt: str) -> str:
    """input() for piped stdin: the prompt goes nowhere, so stdout holds only the replies."""
    import sys

    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.readline() if stream is not None else sys.stdin.readline()
    if not raw:
        raise EOFError
    # bytes are decoded one line at a time, so a bad line raises here and the next line still reads
    line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return line.rstrip("\r\n")


def write_stdout(text: str) -> None:
    print(text, end="", flush=True)


def write_stderr(text: str) -> None:
    """Piped chat's notes (command answers, settings): stdout keeps the replies alone."""
    import sys

    print(text, end="", flush=True, file=sys.stderr)


def describe_settings(settings: GenerationSettings, best_of: int = 1, thinking: bool = False) -> str:
    values = dataclasses.asdict(settings)
    values.pop("samples")  # chat writes one reply per turn
    return " ".join(f"{key}={value}" for key, value in values.items()) + f" best_of={best_of}" + (
        " thinking=on" if thinking else "")  # off, the default, goes unsaid


def parse_thinking(loaded, value: str) -> bool:
    """/settings thinking=on|off; on is refused for a model whose family has no thinking."""
    from .families import family_of_tokenizer

    switch = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}.get(value.lower())
    if switch is None:
        raise GemmaMlxError(f"thinking must be on or off, not '{value}'. Example: /settings thinking=on")
    if switch and not family_of_tokenizer(loaded.tokenizer).thinks:
        raise GemmaMlxError(no_thinking_message(loaded.tokenizer))
    return switch


@dataclass
class BestOf:
    """Chat's best of N: how many candidates, the persona's mean words (None: length is not ranked),
    and the on-topic scorer of (message, reply) pairs (None: the on-topic term is skipped)."""

    n: int = 1
    target_words: float | None = None
    scorer: Callable[[list[tuple[str, str]]], list[float | None]] | None = None

    def cost(self) -> str:
        """The one line that says what best of N costs and what it ranks by."""
        length = (f"nearest the persona's {self.target_words:.0f} words" if self.target_words
                  else "any length (no training summary gives the persona's)")
        topic = ("then the highest on-topic score" if self.scorer
                 else "no on-topic score (add --on-topic-model BASE_DIR for it)")
        return (f"best of {self.n}: every reply is {self.n} rows decoded in one batch (about {self.n}x the work "
                f"of one reply; shown when all have ended, not streamed); kept: a clean ending without a loop, "
                f"{length}, {topic}")


def parse_best_of(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_BEST_OF:
        raise GemmaMlxError(f"best_of must be a whole number from 1 to {MAX_BEST_OF}, not '{value}'. "
                            "Example: /settings best_of=4")
    return n


def change_settings(settings: GenerationSettings, assignments: list[str]) -> GenerationSettings:
    """`key=value` words applied to a copy of settings; values are read as YAML scalars (0.7, 64, true)."""
    known = [f.name for f in dataclasses.fields(GenerationSettings) if f.name != "samples"]
    texts = {}
    for word in assignments:
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise GemmaMlxError(f"'{word}' is not key=value. Example: /settings temperature=0.7")
        if key == "samples":
            raise GemmaMlxError("chat writes one reply per turn; 'samples' applies to compare only.")
        if key not in known:
            raise GemmaMlxError(f"Unknown setting '{key}'. Settings: {', '.join([*known, 'best_of', 'thinking'])}.")
        texts[key] = value
    return apply_text_overrides(settings, texts, where="/settings")


@dataclass
class Conversation:
    """What the model sees next turn, plus the message whose reply was not kept (for /retry)."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user/assistant pairs, whole replies only
    pending: str | None = None  # the last message sent whose reply was stopped, looped or refused
    attempt: int = 0  # tries at the same message: /retry varies the sampling seed with it
    thinking: bool = False  # the model thinks before it answers (its thought shown, never kept here)

    def messages(self, *extra: dict) -> list[dict]:
        start = [{"role": "system", "content": self.system}] if self.system else []
        return start + self.turns + list(extra)


class _LoopFound(Exception):
    """Raised from the text callback to end a reply as soon as it goes round in circles."""


def _check_fits(loaded: LoadedModel, conversation: Conversation, settings: GenerationSettings) -> None:
    """The context check of generation, made now: a reply limit the model cannot hold is refused at /settings."""
    check_context(loaded, prompt_rows(loaded.tokenizer, [conversation.messages({"role": "user", "content": ""})], settings,
                                      conversation.thinking))


def _answer(loaded, conversation: Conversation, text: str, settings: GenerationSettings, write: Write, labels: bool,
            best: BestOf | None = None):
    """Stream a reply to `text` (or pick the best of N); keep the exchange only when the reply came out whole."""
    conversation.pending = text
    seeded = dataclasses.replace(settings, seed=(settings.seed + conversation.attempt) % (LARGEST_INT + 1))
    shown: list[str] = []
    if labels:
        write(MODEL_PROMPT)
    if best is not None and best.n > 1:
        _answer_best(loaded, conversation, text, seeded, write, best)
        return

    thought = {"open": False}  # a thought line is being written

    def think(piece: str) -> None:
        write(piece if thought["open"] else THOUGHT_MARK + piece)
        thought["open"] = True

    def show(piece: str) -> None:
        if thought["open"]:
            thought["open"] = False
            write("\n")
        shown.append(piece)
        write(piece)
        if is_loop("".join(shown)):
            raise _LoopFound

    try:
        thinking = {"thinking": True, "on_thought": think} if conversation.thinking else {}
        reply = stream_reply(loaded, conversation.messages({"role": "user", "content": text}), seeded, on_text=show,
                             **thinking)
        if thought["open"]:  # a reply that only thought
            write("\n")
    except GemmaMlxError as error:  # e.g. longer than the model can read: refuse this message only
        conversation.pending = None
        write(("\n" if shown else "") + f"{error} That message was not sent; the conversation is kept.\n")
        return
    except KeyboardInterrupt:
        write(" [stopped; left out of the conversation, /retry for another reply]\n")
        return
    except _LoopFound:
        write(" [loop: stopped here and left out of the conversation; /retry for another reply]\n")
        return
    score = best.scorer([(text, reply.text)])[0] if best is not None and best.scorer and not is_loop(reply.text) else None
    _keep(conversation, text, reply, write, on_topic_tag(best, score, text, reply.text))


def on_topic_tag(best: BestOf | None, score: float | None, message: str, reply: str) -> str:
    """" [on topic]" or " [off topic]" after a reply when an on-topic model scores them, else nothing."""
    if best is None or best.scorer is None:
        return ""
    return " [on topic]" if is_on_topic(score, message, reply) else " [off topic]"


def _keep(conversation: Conversation, text: str, reply, write: Write, topic: str = "") -> None:
    """Flag the shown reply's end (and whether it is on topic) and keep the exchange, unless the reply loops."""
    if is_loop(reply.text):  # a loop only the final, stripped text shows
        write(" [loop: left out of the conversation; /retry for another reply]\n")
        return
    write(topic + (f" [cut at {reply.tokens} tokens]\n" if reply.cut else "\n"))
    conversation.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
    conversation.pending = None


def _answer_best(loaded, conversation: Conversation, text: str, seeded: GenerationSettings, write: Write,
                 best: BestOf) -> None:
    """N candidate replies in one batch (the first with the settings as they are, the others sampled);
    the one pick_best keeps is written whole."""
    messages = conversation.messages({"role": "user", "content": text})
    variants = [dataclasses.replace(v, samples=1) for v in candidate_settings(seeded, best.n)]
    try:
        replies = generate_replies(loaded, [messages] * best.n, variants, **({"thinking": True} if conversation.thinking
                                                                             else {}))
        scores = best.scorer([(text, r.text) for r in replies]) if best.scorer else None
    except GemmaMlxError as error:  # e.g. longer than the model can read: refuse this message only
        conversation.pending = None
        write(f"{error} That message was not sent; the conversation is kept.\n")
        return
    except KeyboardInterrupt:
        write("[stopped; left out of the conversation, /retry for another reply]\n")
        return
    kept = pick_reply(replies, text, best.target_words, scores)
    reply = replies[kept]
    write((f"{THOUGHT_MARK}{reply.thought}\n" if conversation.thinking and reply.thought else "") + reply.text)
    _keep(conversation, text, reply, write, on_topic_tag(best, scores[kept] if scores else None, text, reply.text))


def _command(line: str, loaded, conversation: Conversation, settings: GenerationSettings, write: Write,
             best: BestOf):
    """Run one /command; returns the settings to use from now on, or None to leave (best_of changes `best`)."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command in ("/quit", "/exit"):
        return None
    if command == "/reset":
        conversation.turns, conversation.pending = [], None
        write("(conversation cleared)\n")
    elif command == "/undo":
        if not conversation.turns:
            write("(nothing to undo)\n")
        else:
            dropped = conversation.turns[-2]["content"]
            del conversation.turns[-2:]
            write(f"(dropped the exchange that began {dropped[:40]!r}; {len(conversation.turns) // 2} left)\n")
    elif command == "/system":
        conversation.system = rest or None
        write(f"(system prompt set: {rest!r})\n" if rest else "(system prompt cleared)\n")
    elif command == "/save":
        write(save_command(conversation, rest) + "\n")
    elif command == "/settings":
        words = rest.split()
        best_words = [w.partition("=")[2] for w in words if w.startswith("best_of=")]
        think_words = [w.partition("=")[2] for w in words if w.startswith("thinking=")]
        try:
            n = parse_best_of(best_words[-1]) if best_words else best.n
            thinking = parse_thinking(loaded, think_words[-1]) if think_words else conversation.thinking
            others = [w for w in words if not w.startswith(("best_of=", "thinking="))]
            changed = change_settings(settings, others) if others else settings
            _check_fits(loaded, dataclasses.replace(conversation, thinking=thinking), changed)
        except GemmaMlxError as error:
            write(f"{error} Settings unchanged.\n")
            return settings
        settings, conversation.thinking = changed, thinking
        if n != best.n:
            best.n = n
            if n > 1:
                write(f"({best.cost()})\n")
        write(f"settings: {describe_settings(settings, best.n, conversation.thinking)}\n")
    elif command == "/help":
        write(HELP + "\n")
    else:
        write(f"Unknown command {command}. {HELP}\n")
    return settings


def _retry(conversation: Conversation, write: Write) -> str | None:
    """The message to answer again: the one left without a reply, else the last kept one (its reply dropped)."""
    if conversation.pending is None and conversation.turns:
        conversation.pending = conversation.turns[-2]["content"]
        del conversation.turns[-2:]
    if conversation.pending is None:
        write("(nothing to retry: send a message first)\n")
        return None
    conversation.attempt += 1
    return conversation.pending


def chat_loop(
    loaded: LoadedModel,
    settings: GenerationSettings = GenerationSettings(),
    read_line: ReadLine = input,
    write: Write = write_stdout,
    system: str | None = None,
    labels: bool = True,
    best_of: BestOf | None = None,
    thinking: bool = False,
    note: Write | None = None,
) -> list[dict]:
    """Run the conversation until /quit, Ctrl-D or Ctrl-C; return its kept messages (for tests and callers).

    `labels` False leaves out the "model> " label (piped use: one reply a line on stdout). `best_of`:
    keep the best of N replies (BestOf; /settings best_of=N changes N). `thinking`: the model thinks
    first and its thought is shown (a family without thinking is refused). `note` takes what is not a
    reply (answers to /commands, settings, a line that is not UTF-8); `write` when not given.
    """
    check_settings(settings)
    note = note or write
    best = best_of or BestOf()
    conversation = Conversation(system=system, thinking=thinking and parse_thinking(loaded, "on"))
    while True:
        try:
            line = read_line(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            if labels:  # end the prompt's line; piped output ends with the last reply's own newline
                write("\n")
            break
        except UnicodeDecodeError:
            note(NOT_UTF8 + "\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.split()[0] == "/retry":
            text = _retry(conversation, note)
        elif line.startswith("/"):
            settings = _command(line, loaded, conversation, settings, note, best)
            if settings is None:
                break
            continue
        else:
            text, conversation.attempt = line, 0
        if text is not None:
            _answer(loaded, conversation, text, settings, write, labels, best)
    return conversation.messages()


def run_chat(
    spec: str,
    adapter_path: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    system: str | None = None,
    read_line: ReadLine = input,
    write: Write = write_stdout,
    progress: Callable[[str], None] | None = None,
    labels: bool = True,
    best_of: int = 1,
    on_topic_model: str | None = None,
    thinking: bool = False,
    note: Write | None = None,
) -> list[dict]:
    """Load a model (dir, fused dir, or BASE::ADAPTERS) and chat with it (thinking, note: see chat_loop).

    best_of: keep the best of that many replies; on_topic_model: a base model that scores whether a
    candidate answers the message (loaded once, beside the chat model), else that term is skipped.
    """
    check_settings(settings)
    n = parse_best_of(str(best_of))
    say = progress or (lambda _: None)
    say(f"loading {spec}" + (f" with adapters {adapter_path}" if adapter_path else ""))
    loaded = load_model(spec, adapter_path)
    if thinking:
        parse_thinking(loaded, "on")  # refused before anything else loads
    if settings.temperature == 0:
        decode_step.warm_up(loaded.model)  # one greedy row a step: the screen pays back over a session's replies
    best = BestOf(n, persona_words(loaded), on_topic_scorer(on_topic_model, say) if on_topic_model else None)
    if n > 1:
        say(best.cost())
    if best.scorer:
        say("every reply ends with [on topic] or [off topic]: whether it answers the message, by the on-topic model")
    say(f"chatting with {loaded.name} ({describe_settings(settings, n, thinking)}). {HELP}")
    return chat_loop(loaded, settings, read_line=read_line, write=write, system=system, labels=labels, best_of=best,
                     thinking=thinking, note=note)


def on_topic_scorer(spec: str, say: Callable[[str], None]):
    """(message, reply) pairs -> on-topic scores under the base model `spec`, loaded once now."""
    from .scoring.ontopic import on_topic_scores

    say(f"loading {spec} to score whether replies answer the message")
    scoring = load_model(spec)
    return lambda pairs: on_topic_scores(scoring.model, scoring.tokenizer, pairs)
