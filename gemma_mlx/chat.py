"""`gemma-mlx chat`: a multi-turn conversation in the terminal, with compare's format and stop rules.

The loop takes its input and output as callables, so tests drive it with a list of lines and the
CLI with `input()` and stdout. Commands: /reset, /settings [key=value ...], /help, /quit.
Ctrl-D or Ctrl-C at the prompt leave; Ctrl-C while a reply is being written stops that reply.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .config import GenerationSettings, apply_text_overrides, check_settings
from .errors import GemmaMlxError
from .generate import LoadedModel, load_model, stream_reply
from .text import is_loop

USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
HELP = (
    "Commands: /reset (forget the conversation), /settings (show), /settings key=value ... (change, "
    "e.g. /settings temperature=0.7 max_tokens=128), /help, /quit. Ctrl-D or Ctrl-C leaves."
)

ReadLine = Callable[[str], str]  # shows a prompt, returns a line; EOFError / KeyboardInterrupt end the chat
Write = Callable[[str], None]  # writes text as is (no newline added)


def read_piped_line(prompt: str) -> str:
    """input() for piped stdin: the prompt goes nowhere, so stdout holds only the replies."""
    import sys

    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


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


def chat_loop(
    loaded: LoadedModel,
    settings: GenerationSettings = GenerationSettings(),
    read_line: ReadLine = input,
    write: Write = write_stdout,
    system: str | None = None,
    labels: bool = True,
) -> list[dict]:
    """Run the conversation until /quit, Ctrl-D or Ctrl-C; return its messages (for tests and callers).

    `labels` False leaves out the "model> " label (piped use: one reply a line on stdout).
    """
    check_settings(settings)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read_line(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, *args = line.split()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                messages = list(start)
                write("(conversation cleared)\n")
            elif command == "/settings":
                try:
                    settings = change_settings(settings, args) if args else settings
                except GemmaMlxError as error:
                    write(f"{error}\n")
                    continue
                write(f"settings: {describe_settings(settings)}\n")
            elif command == "/help":
                write(HELP + "\n")
            else:
                write(f"Unknown command {command}. {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        if labels:
            write(MODEL_PROMPT)
        try:
            reply = stream_reply(loaded, messages, settings, on_text=write)
        except KeyboardInterrupt:  # stop this reply, keep the conversation as it was
            messages.pop()
            write(" [stopped]\n")
            continue
        flags = ([f"[cut at {reply.tokens} tokens]"] if reply.cut else []) + (["[loop]"] if is_loop(reply.text) else [])
        write(" " + " ".join(flags) + "\n" if flags else "\n")
        messages.append({"role": "assistant", "content": reply.text})
    return messages


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
