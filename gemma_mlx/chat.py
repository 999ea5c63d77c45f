"""`gemma-mlx chat`: a multi-turn conversation in the terminal, with compare's format and stop rules.

The loop takes its input and output as callables, so tests drive it with a list of lines and the
CLI with `input()` and stdout. Commands: /retry, /undo, /system, /save, /reset, /settings, /help, /quit.
Ctrl-D or Ctrl-C at the prompt leave; Ctrl-C while a reply is being written stops that reply.

Only replies that came out whole go into the history the model sees next turn: a reply stopped by
Ctrl-C or by a loop is shown as far as it got and then left out, so one bad turn cannot teach the
rest of the conversation to loop. A message that cannot be answered (too long for the model, a line
that is not UTF-8) is refused on its own line and the conversation goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import LARGEST_INT, GenerationSettings, apply_text_overrides, check_settings
from .errors import GemmaMlxError
from .generate import LoadedModel, check_context, load_model, prompt_rows, stream_reply
from .text import is_loop

USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
HELP = (
    "Commands: /retry (a new reply to your last message), /undo (drop the last exchange), /system TEXT "
    "(set the system prompt; /system alone clears it), /save PATH (the conversation as JSONL; /save --force "
    "PATH replaces a file), /reset (forget the conversation), /settings (show), /settings key=value ... "
    "(change, e.g. /settings temperature=0.7 max_tokens=128), /help, /quit. Ctrl-D or Ctrl-C leaves."
)
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


def describe_settings(settings: GenerationSettings) -> str:
    values = dataclasses.asdict(settings)
    values.pop("samples")  # chat writes one reply per turn
    return " ".join(f"{key}={value}" for key, value in values.items())


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
            raise GemmaMlxError(f"Unknown setting '{key}'. Settings: {', '.join(known)}.")
        texts[key] = value
    return apply_text_overrides(settings, texts, where="/settings")


@dataclass
class Conversation:
    """What the model sees next turn, plus the message whose reply was not kept (for /retry)."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user/assistant pairs, whole replies only
    pending: str | None = None  # the last message sent whose reply was stopped, looped or refused
    attempt: int = 0  # tries at the same message: /retry varies the sampling seed with it

    def messages(self, *extra: dict) -> list[dict]:
        start = [{"role": "system", "content": self.system}] if self.system else []
        return start + self.turns + list(extra)


class _LoopFound(Exception):
    """Raised from the text callback to end a reply as soon as it goes round in circles."""


def save_conversation(path: Path, messages: list[dict], force: bool = False) -> Path:
    """Write one JSONL line {"messages": [...]}, the shape of the persona data (`gemma-mlx data check` reads it).

    An existing file is kept unless `force`; the file appears whole or not at all (temp file, rename).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise GemmaMlxError(f"{path} is a folder. Give a file name, e.g. /save {path / 'chat.jsonl'}")
    if path.exists() and not force:
        raise GemmaMlxError(f"{path} already exists and was left as it is. /save --force {path} replaces it.")
    if not path.parent.is_dir():
        raise GemmaMlxError(f"The folder {path.parent} does not exist. Create it or save somewhere else.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise GemmaMlxError(f"Could not write {path}: {error.strerror or error}. Nothing was saved.") from None
    return path


def _save_command(conversation: Conversation, rest: str) -> str:
    words = rest.split()
    force = "--force" in words[:1] + words[-1:]
    target = " ".join(w for i, w in enumerate(words) if not (w == "--force" and i in (0, len(words) - 1)))
    if not target:
        return "Give a file name: /save chat.jsonl"
    if not conversation.turns:
        return "Nothing to save yet: no exchange has been kept."
    try:
        path = save_conversation(Path(target), conversation.messages(), force)
    except GemmaMlxError as error:
        return str(error)
    count = len(conversation.turns) // 2
    return f"(saved {count} exchange{'' if count == 1 else 's'} to {path})"


def _check_fits(loaded: LoadedModel, conversation: Conversation, settings: GenerationSettings) -> None:
    """The context check of generation, made now: a reply limit the model cannot hold is refused at /settings."""
    check_context(loaded, prompt_rows(loaded.tokenizer, [conversation.messages({"role": "user", "content": ""})], settings))


def _answer(loaded, conversation: Conversation, text: str, settings: GenerationSettings, write: Write, labels: bool):
    """Stream a reply to `text`; keep the exchange only when the reply came out whole."""
    conversation.pending = text
    seeded = dataclasses.replace(settings, seed=(settings.seed + conversation.attempt) % (LARGEST_INT + 1))
    shown: list[str] = []
    if labels:
        write(MODEL_PROMPT)

    def show(piece: str) -> None:
        shown.append(piece)
        write(piece)
        if is_loop("".join(shown)):
            raise _LoopFound

    try:
        reply = stream_reply(loaded, conversation.messages({"role": "user", "content": text}), seeded, on_text=show)
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
    if is_loop(reply.text):  # a loop only the final, stripped text shows
        write(" [loop: left out of the conversation; /retry for another reply]\n")
        return
    write(f" [cut at {reply.tokens} tokens]\n" if reply.cut else "\n")
    conversation.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
    conversation.pending = None


def _command(line: str, loaded, conversation: Conversation, settings: GenerationSettings, write: Write):
    """Run one /command; returns the settings to use from now on, or None to leave."""
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
        write(_save_command(conversation, rest) + "\n")
    elif command == "/settings":
        try:
            changed = change_settings(settings, rest.split()) if rest else settings
            _check_fits(loaded, conversation, changed)
        except GemmaMlxError as error:
            write(f"{error} Settings unchanged.\n")
            return settings
        settings = changed
        write(f"settings: {describe_settings(settings)}\n")
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
) -> list[dict]:
    """Run the conversation until /quit, Ctrl-D or Ctrl-C; return its kept messages (for tests and callers).

    `labels` False leaves out the "model> " label (piped use: one reply a line on stdout).
    """
    check_settings(settings)
    conversation = Conversation(system=system)
    while True:
        try:
            line = read_line(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        except UnicodeDecodeError:
            write(NOT_UTF8 + "\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.split()[0] == "/retry":
            text = _retry(conversation, write)
        elif line.startswith("/"):
            settings = _command(line, loaded, conversation, settings, write)
            if settings is None:
                break
            continue
        else:
            text, conversation.attempt = line, 0
        if text is not None:
            _answer(loaded, conversation, text, settings, write, labels)
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
) -> list[dict]:
    """Load a model (dir, fused dir, or BASE::ADAPTERS) and chat with it."""
    check_settings(settings)
    if progress is not None:
        progress(f"loading {spec}" + (f" with adapters {adapter_path}" if adapter_path else ""))
    loaded = load_model(spec, adapter_path)
    if progress is not None:
        progress(f"chatting with {loaded.name} ({describe_settings(settings)}). {HELP}")
    return chat_loop(loaded, settings, read_line=read_line, write=write, system=system, labels=labels)
