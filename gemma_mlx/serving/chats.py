"""Conversations in the arena: each side keeps its own history, and the whole of it is every prompt.

A conversation has sides: one per model side by side (keyed by the model's name), or "A" and "B" in
a blind battle, whose models stay hidden until the vote. A side holds its messages (user turns and
its own model's replies) and the stream of the reply it is writing now. A new user turn goes to
every side once every side's reply has been shown; each model then gets its own side's whole
conversation, system prompt first, which the engine renders in the one Gemma turn format
(chat_format, through generate.prompt_rows), so a side never sees what another side's model said.

Saved conversations are whole JSON lines appended to conversations.jsonl beside the votes (the
same durable, whole-line appends as the votes); saving again appends a newer line for the same id,
and the newest line of each id is the conversation.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError, GemmaMlxError
from ..manifest import now_iso
from .streams import ReplyStream, hidden_reply

MAX_TURNS = 50  # user turns in one conversation
MAX_CONVERSATIONS = 1000  # kept in memory; the oldest is forgotten (a late vote on it is refused)


class Conflict(GemmaMlxError):
    """The request does not fit the conversation's state now (a reply still being written, a vote given)."""


@dataclass
class Side:
    """One model's half of a conversation."""

    model: str
    messages: list[dict] = field(default_factory=list)  # user turns and finished replies ("reply": its flags)
    stream: ReplyStream | None = None  # the reply to the last user turn, until the next turn takes it in

    def transcript(self, hidden: bool = False) -> list[dict]:
        """The messages with the current reply, once shown; hidden: replies without their badges' data."""
        messages = list(self.messages)
        if self.stream is not None and self.stream.reply is not None:
            messages.append(_assistant(self.stream.reply))
        if hidden:  # a reply's on-topic flag is about its text, like its words: kept (streams.hidden_reply)
            messages = [{**{k: v for k, v in m.items() if k != "reply"},
                         **({"reply": _hidden(m["reply"])} if "on_topic" in (m.get("reply") or {}) else {})}
                        for m in messages]
        return messages

    def running(self) -> bool:
        return self.stream is not None and not self.stream.ended

    def last_reply(self) -> dict | None:
        messages = self.transcript()
        return messages[-1]["reply"] if messages and messages[-1]["role"] == "assistant" else None

    def prompt(self, system: str) -> list[dict]:
        """The conversation the model reads: the system prompt, then this side's turns."""
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]


def _hidden(reply: dict) -> dict:
    return {k: v for k, v in hidden_reply(reply).items() if k != "text"}  # the text is the message's content


def _assistant(reply: dict) -> dict:
    return {"role": "assistant", "content": reply["text"], "reply": reply}


@dataclass
class Conversation:
    """A chat with one or more models at once; blind: a battle between two hidden models."""

    id: str
    blind: bool
    sides: dict[str, Side]
    system: str = ""
    settings: dict = field(default_factory=dict)
    started: str = field(default_factory=now_iso)
    choice: str | None = None  # a blind battle's vote

    @property
    def hidden(self) -> bool:
        return self.blind and self.choice is None

    def turns(self) -> int:
        return sum(m["role"] == "user" for m in next(iter(self.sides.values())).messages)

    def busy(self) -> bool:
        return any(side.running() for side in self.sides.values())

    # ----- what the page asks for ---------------------------------------------------------------
    def ask(self, engine, text: str, settings) -> None:
        """A new user turn on every side; each side's model answers its own history."""
        if self.choice is not None:
            raise Conflict("This battle has its vote; start the next battle (key N) to go on.")
        if self.turns() >= MAX_TURNS:
            raise Conflict(f"This conversation has {MAX_TURNS} turns, the most the arena keeps; start a new one.")
        for key, side in self.sides.items():
            if side.stream is not None and side.stream.failed:
                raise Conflict(f"The last reply of {self._name(key)} failed ({side.stream.failed}); regenerate it "
                               "first, or start a new conversation.")
            if side.stream is not None and side.stream.reply is None:
                raise Conflict("Wait until every reply is finished (or press Stop), then send the next message.")
        before = {key: (list(side.messages), side.stream) for key, side in self.sides.items()}
        for side in self.sides.values():
            side.messages = side.transcript()
            side.messages.append({"role": "user", "content": text})
            side.stream = None
        self._submit(engine, list(self.sides), settings, before)

    def regenerate(self, engine, settings, key: str | None = None) -> list[str]:
        """A new reply to the last user turn, on one side or all; the old reply is dropped."""
        if self.choice is not None:
            raise Conflict("This battle has its vote; start the next battle (key N) to go on.")
        keys = [key] if key is not None else list(self.sides)
        if any(k not in self.sides for k in keys):
            raise ConfigError(f"Unknown side {key!r}; this conversation has {', '.join(self.sides)}.")
        if any(self.sides[k].running() for k in keys):
            raise Conflict("That reply is still being written; press Stop first, then regenerate.")
        before = {k: (list(self.sides[k].messages), self.sides[k].stream) for k in keys}
        for k in keys:
            side = self.sides[k]
            if side.stream is None and side.messages and side.messages[-1]["role"] == "assistant":
                side.messages.pop()  # a reply taken in already (a reopened conversation)
            if not side.messages or side.messages[-1]["role"] != "user":
                raise Conflict("There is no message to answer again yet; send one first.")
            side.stream = None
        self._submit(engine, keys, settings, before)
        return keys

    def stop(self, engine) -> int:
        """End every reply being written; the engine takes their rows out of its batches."""
        stopped = 0
        for side in self.sides.values():
            if side.running() and side.stream.handle is not None:
                engine.cancel(side.stream.handle)
                stopped += 1
        return stopped

    def _submit(self, engine, keys: list[str], settings, before: dict) -> None:
        """Start a reply on each side in `keys`; when the engine refuses one, the conversation is as it was."""
        from dataclasses import asdict

        self.settings = asdict(settings)
        started = []
        try:
            streams = {key: ReplyStream(hidden=self.hidden, model=self.sides[key].model) for key in keys}
            requests = [(self.sides[key].model, self.sides[key].prompt(self.system), settings, streams[key].on_event)
                        for key in keys]
            # the turn's replies together where the engine takes them so (best of N, the on-topic score)
            submit_turn = getattr(engine, "submit_turn", None)
            handles = submit_turn(requests) if submit_turn else None
            for i, key in enumerate(keys):
                stream = streams[key]
                stream.handle = handles[i] if handles else engine.submit(*requests[i])
                self.sides[key].stream = stream
                started.append(stream)
        except GemmaMlxError:
            for stream in started:
                if stream.handle is not None:
                    engine.cancel(stream.handle)
            for key, (messages, stream) in before.items():
                self.sides[key].messages, self.sides[key].stream = messages, stream
            raise

    def _name(self, key: str) -> str:
        return key if self.blind else self.sides[key].model

    # ----- the vote -----------------------------------------------------------------------------
    def vote_record(self, choice: str) -> dict:
        """The votes.jsonl line: the last turn's prompt and replies (as before multi-turn), the conversation's
        id and system prompt, and each side's earlier turns when there were any."""
        if self.busy() or any(side.last_reply() is None for side in self.sides.values()):
            raise Conflict("Wait until both replies are finished, then vote.")
        a, b = self.sides["A"], self.sides["B"]
        record = {"time": now_iso(), "prompt": _last_user(a),
                  "settings": self.settings, "model_a": a.model, "model_b": b.model,
                  "reply_a": a.last_reply(), "reply_b": b.last_reply(), "choice": choice,
                  "conversation": self.id, "system": self.system, "turns": self.turns()}
        if self.turns() > 1:
            record["history_a"], record["history_b"] = _earlier(a.transcript()), _earlier(b.transcript())
        return record

    def voted(self, choice: str) -> None:
        self.choice = choice
        for side in self.sides.values():
            if side.stream is not None:
                side.stream.hidden = False

    # ----- what is shown and saved --------------------------------------------------------------
    def view(self) -> dict:
        """The conversation as the page shows it; a blind one before its vote without models or badges."""
        return {"id": self.id, "blind": self.blind, "choice": self.choice, "system": self.system,
                "busy": self.busy(), "turns": self.turns(),
                "sides": {key: {"model": None if self.hidden else side.model,
                                "messages": side.transcript(hidden=self.hidden)}
                          for key, side in self.sides.items()}}

    def record(self) -> dict:
        """The conversations.jsonl line: everything, models included."""
        first = next((m["content"] for m in next(iter(self.sides.values())).messages if m["role"] == "user"), "")
        return {"id": self.id, "time": now_iso(), "started": self.started, "blind": self.blind,
                "choice": self.choice, "system": self.system, "settings": self.settings, "title": first[:80],
                "sides": {key: {"model": side.model, "messages": side.transcript()} for key, side in self.sides.items()}}


def _last_user(side: Side) -> str:
    return next((m["content"] for m in reversed(side.messages) if m["role"] == "user"), "")


def _earlier(messages: list[dict]) -> list[dict]:
    """The turns before the last user message, as role and content."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last_user]]


def new_conversation(models: list[str], blind: bool, system: str) -> Conversation:
    sides = {key: Side(model) for key, model in zip("AB", models)} if blind else {m: Side(m) for m in models}
    return Conversation(secrets.token_hex(8), blind, sides, system)


def from_record(record: dict) -> Conversation:
    """A saved conversation, live again: every side's messages, its vote, its system prompt."""
    sides = {key: Side(value["model"], [dict(m) for m in value["messages"]]) for key, value in record["sides"].items()}
    return Conversation(record["id"], bool(record.get("blind")), sides, record.get("system") or "",
                        record.get("settings") or {}, record.get("started") or record.get("time", ""),
                        record.get("choice"))


class Conversations:
    """The live conversations, newest last; the oldest is forgotten past MAX_CONVERSATIONS."""

    def __init__(self):
        self._live: dict[str, Conversation] = {}

    def add(self, conversation: Conversation) -> Conversation:
        while len(self._live) >= MAX_CONVERSATIONS:
            self._live.pop(next(iter(self._live)))
        self._live[conversation.id] = conversation
        return conversation

    def get(self, conversation_id) -> Conversation | None:
        return self._live.get(conversation_id) if isinstance(conversation_id, str) else None


# ---------------------------------------------------------------------------- the saved file

def read_conversations(path: Path) -> dict[str, dict]:
    """The newest saved line of every conversation, by id; a damaged line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return {}
    found: dict[str, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _check_record(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{number}: not a saved conversation (a JSON line with id and sides, each with "
                            "model and messages). Fix or remove that line.") from None
        found.pop(record["id"], None)
        found[record["id"]] = record
    return found


def _check_record(record: dict) -> None:
    if not isinstance(record["id"], str) or not isinstance(record["sides"], dict) or not record["sides"]:
        raise ValueError("id or sides")
    for side in record["sides"].values():
        if not isinstance(side["model"], str) or not all(m["role"] in ("user", "assistant")
                                                         and isinstance(m["content"], str) for m in side["messages"]):
            raise ValueError("side")


def listing(records: dict[str, dict]) -> list[dict]:
    """The page's list of saved conversations, newest first; a blind battle not voted on names no model."""
    rows = []
    for record in reversed(records.values()):
        hidden = record.get("blind") and record.get("choice") is None
        first = next(iter(record["sides"].values()))
        rows.append({"id": record["id"], "time": record.get("time"), "title": record.get("title") or "(empty)",
                     "blind": bool(record.get("blind")), "choice": record.get("choice"),
                     "turns": sum(m["role"] == "user" for m in first["messages"]),
                     "models": None if hidden else [side["model"] for side in record["sides"].values()]})
    return rows
