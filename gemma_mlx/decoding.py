"""The one way gemma-mlx drives an mlx-lm BatchGenerator: rows in, token streams and text pieces out.

compare, chat and validation (generate.generate_replies, stream_reply) and the arena's engine
(serving/engine.py) all decode through a Driver. It keeps, per row the generator decodes, the
caller's tag, the reply's tokens (the stop token is never one of them) and, when asked, an
incremental detokenizer (mlx-lm's streaming one, copied per row): each new token adds only its
own text, instead of decoding the reply's whole text again at every step.

The driver knows nothing of prompts, settings or replies: the caller inserts rows into the
generator (generate.insert_rows) and tells the driver their uids; step() reports what each row
did. Text pieces hold back the reply's leading whitespace, since a finished reply's text is
stripped; the pieces joined and stripped are the reply's text.

Thought channels (Gemma 4's `<|channel>thought\n...<channel|>`, the ids given as `channel`): a model
may think before it answers, even with thinking off. A thought is not the end of a reply: its tokens
go to the stream's `thought`, never to its tokens or text pieces, and decoding goes on to the answer.
Events carry the thought's own text pieces apart (`thought`), less the channel's name, for a caller
that shows thinking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One row being decoded."""

    tag: object  # the caller's: a generate.Row, or the engine's request state
    started: float  # perf_counter at insertion: a reply's time includes its prefill
    detokenizer: object | None = None  # None when the caller wants no text pieces
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # the text pieces handed out so far, joined
    thought: list[int] = field(default_factory=list)  # tokens inside thought channels (the channel tokens left out)
    thinking: bool = False  # inside a thought channel now
    thought_detokenizer: object | None = None
    thought_text: str = ""  # the thought's decoded text so far, its channel name included
    thought_shown: str = ""  # the thought pieces handed out so far, joined


@dataclass
class Event:
    """What one row did in one step: a token (and the text it added), and whether that ended it."""

    uid: int
    stream: Stream
    piece: str  # text this step added ("" when none yet: half a character, leading whitespace, a stop)
    finish_reason: str | None  # None while the row goes on; "stop" | "length" when it ended
    stop_id: int | None  # the token that ended it ("stop"), never part of the tokens or the text
    seconds: float  # since the row was inserted
    thought: str = ""  # thought text this step added (a token inside a thought channel)


class Driver:
    """Steps one BatchGenerator and keeps its rows' token streams. close() frees the generator."""

    def __init__(self, generator, tokenizer, text: bool = False, channel: tuple[int, int] | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.text = text  # whether rows get a streaming detokenizer and events carry text pieces
        self.channel = channel  # (open id, close id) of a thought channel, or None
        self.streams: dict[int, Stream] = {}

    def track(self, uids: list[int], tags: list) -> None:
        """Rows just inserted into the generator (in the order of their uids)."""
        now = time.perf_counter()
        for uid, tag in zip(uids, tags):
            self.streams[uid] = Stream(tag, now, self.tokenizer.detokenizer if self.text else None)

    def step(self) -> list[Event] | None:
        """One generator step: an Event per row that made a token; None when the generator has nothing left."""
        responses = self.generator.next_generated()
        if not responses:
            return None
        now = time.perf_counter()
        events = []
        for response in responses:
            stream = self.streams.get(response.uid)
            if stream is None:  # removed meanwhile
                continue
            stop_id = response.token if response.finish_reason == "stop" else None
            piece = thought = ""
            if stop_id is None:
                if self.channel is not None and response.token in self.channel:
                    if stream.thinking and response.token == self.channel[1]:
                        thought = self._end_thought(stream)
                    stream.thinking = response.token == self.channel[0]
                elif stream.thinking:
                    stream.thought.append(response.token)
                    thought = self._add_thought(stream, response.token)
                else:
                    stream.tokens.append(response.token)
                    piece = self._add(stream, response.token)
            if response.finish_reason is not None:
                piece += self._finish(stream)
                del self.streams[response.uid]
            events.append(Event(response.uid, stream, piece, response.finish_reason, stop_id, now - stream.started,
                                thought))
        return events

    def remove(self, uid: int) -> tuple[Stream, str] | None:
        """Take a row out of the batch now (no more decoding for it): its stream and its last text piece."""
        stream = self.streams.pop(uid, None)
        if stream is None:
            return None
        self.generator.remove([uid])
        return stream, self._finish(stream)

    def close(self) -> None:
        self.streams.clear()
        self.generator.close()

    # ----- text pieces --------------------------------------------------------------------------
    def _add(self, stream: Stream, token: int) -> str:
        if stream.detokenizer is None:
            return ""
        stream.detokenizer.add_token(token)
        return self._show(stream, stream.detokenizer.last_segment)

    def _add_thought(self, stream: Stream, token: int) -> str:
        """The thought text this token adds, less the channel's name ("thought\n") that opens it."""
        if not self.text:
            return ""
        if stream.thought_detokenizer is None:
            stream.thought_detokenizer = self.tokenizer.detokenizer
        stream.thought_detokenizer.add_token(token)
        stream.thought_text += stream.thought_detokenizer.last_segment
        return self._show_thought(stream, final=False)

    def _end_thought(self, stream: Stream) -> str:
        """The rest of a thought's text when its channel closes (what the detokenizer held back)."""
        if stream.thought_detokenizer is None:
            return ""
        stream.thought_detokenizer.finalize()
        stream.thought_text += stream.thought_detokenizer.last_segment
        stream.thought_detokenizer = None
        return self._show_thought(stream, final=True)

    @staticmethod
    def _show_thought(stream: Stream, final: bool) -> str:
        clean = thought_without_name(stream.thought_text, final)
        clean = clean.rstrip() if final else clean
        if not clean.startswith(stream.thought_shown):
            return ""
        piece, stream.thought_shown = clean[len(stream.thought_shown):], clean
        return piece

    def _finish(self, stream: Stream) -> str:
        """The rest of the reply's text when its row ends: what the detokenizer held back, less the
        trailing whitespace a reply loses. Checked once against the reply's whole decoded text (the
        text a Reply carries), so the pieces joined are that text wherever a prefix of it was shown."""
        if stream.detokenizer is None:
            return ""
        stream.detokenizer.finalize()
        whole = self.tokenizer.decode(stream.tokens).strip()
        rest = whole[len(stream.shown):] if whole.startswith(stream.shown) else ""
        stream.shown += rest
        return rest

    @staticmethod
    def _show(stream: Stream, text: str) -> str:
        if not stream.shown:  # the reply's text is stripped: hold back its leading whitespace
            text = text.lstrip()
        stream.shown += text
        return text


CHANNEL_NAME = "thought"  # what a thought channel is called right after it opens


def thought_without_name(text: str, final: bool = True) -> str:
    """A thought's text less the channel's name line. While it is still being written (final False), text
    that may yet become the name is held back."""
    body = text.lstrip()
    if body.startswith(CHANNEL_NAME + "\n") or (final and body == CHANNEL_NAME):
        return body[len(CHANNEL_NAME):].lstrip()
    if not final and (CHANNEL_NAME + "\n").startswith(body):
        return ""
    return body
