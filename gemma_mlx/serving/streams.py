"""A reply on its way to the page: server-sent events, one reader at a time, kept for a reader that returns."""

from __future__ import annotations

import asyncio
import json
import threading


def reply_json(reply) -> dict:
    """What the page and the votes file keep of a reply: its text and compare's flags for it."""
    from ..scoring.scorecard import reply_flags

    flags = reply_flags(reply.text, reply.finish_reason, markers=[], out_of_character=[])
    kept = getattr(reply, "best_of", None)  # serving/best_of.py: {"n", "kept"} when sampled n times
    on_topic = getattr(reply, "on_topic", None)  # serving/best_of.py, with an on-topic model: answers the message
    return {"text": reply.text, "tokens": reply.tokens, "finish_reason": reply.finish_reason,
            "stop_token": reply.stop_token, "seconds": reply.seconds,
            **{key: flags[key] for key in ("words", "cut", "empty", "mid_sentence", "loop")},
            **({"best_of": kept} if isinstance(kept, dict) else {}),
            **({"on_topic": on_topic} if isinstance(on_topic, bool) else {})}


def hidden_reply(reply: dict) -> dict:
    """What a blind battle shows of a reply before the vote: its text and what is about the text alone
    (words, on topic), nothing that could tell which model wrote it (stop token, tokens, cut, best of)."""
    shown = {"text": reply["text"], "words": reply["words"], "hidden": True}
    return {**shown, "on_topic": reply["on_topic"]} if "on_topic" in reply else shown


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class ReplyStream:
    """One reply on its way to the page: the engine thread appends its events, one reader sends them.

    The events are kept, so a reader that comes back (a reloaded page) gets the whole reply again,
    and a second reader at the same time is refused (claim), not left waiting for events the first
    one took. No thread waits for events: the engine thread wakes the reader's event loop, which may
    be another loop than the one that asked for the reply (a battle is started by one request and
    read by two others).

    A hidden reply (a blind battle before its vote) reaches the page as its text, word count and
    on-topic flag only (hidden_reply): its stop token, token count or cut could tell which model wrote it.
    """

    def __init__(self, hidden: bool = False, model: str | None = None):
        self._lock = threading.Lock()
        self._model = model  # the side's model: a hidden reply's error must not name it
        self._events: list[tuple[str, object]] = []
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._reading = False
        self.reply: dict | None = None  # set once a reader was sent the whole reply
        self.ended = False  # the engine sent "done" or "error"
        self.failed: str | None = None  # the "error" message
        self.hidden = hidden
        self.handle = None  # the engine's, for cancel

    def on_event(self, kind: str, payload) -> None:  # called from the engine thread
        if kind == "error":
            payload = self._unnamed(str(payload))
        with self._lock:
            self._events.append((kind, payload))
            if kind != "text":
                self.ended = True
                self.failed = str(payload) if kind == "error" else None
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, wake = waiter
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that loop has closed, and its reader with it
                pass

    def _unnamed(self, message: str) -> str:
        """An error as a hidden side may show it: its model's name (which errors such as "longer than MODEL
        can read" hold) replaced, so a failed reply does not unblind the battle."""
        return message.replace(self._model, "this side's model") if self.hidden and self._model else message

    def claim(self) -> bool:
        """Become the one reader; False while another request reads this reply."""
        with self._lock:
            if self._reading:
                return False
            self._reading = True
            return True

    def release(self) -> None:
        with self._lock:
            self._reading = False
            self._waiter = None

    def shown(self) -> dict:
        """What the page may see of the finished reply now."""
        if self.hidden:
            return hidden_reply(self.reply)
        return self.reply

    async def events(self):
        if self.reply is not None:  # read again: the finished reply at once
            yield _sse("text", {"text": self.reply["text"]})
            yield _sse("done", self.shown())
            return
        sent = 0
        while True:
            with self._lock:
                pending = self._events[sent:]
                if not pending:
                    wake = asyncio.Event()
                    self._waiter = (asyncio.get_running_loop(), wake)
            if not pending:
                await wake.wait()
                continue
            sent += len(pending)
            for kind, payload in pending:
                if kind == "text":
                    yield _sse("text", {"text": payload})
                elif kind == "done":
                    if self.reply is None:
                        self.reply = reply_json(payload)
                    yield _sse("done", self.shown())
                    return
                else:
                    yield _sse("error", {"message": payload})
                    return


class OneReader:
    """The response that streams a reply to its one reader; a second one at the same time gets 409."""

    def __init__(self, stream: ReplyStream):
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse, StreamingResponse

        if not self.stream.claim():
            message = ("This reply is being read already (the page is open in another tab or window). Read it "
                       "there, or close that one first.")
            await JSONResponse({"error": message}, status_code=409)(scope, receive, send)
            return
        try:  # the claim ends with the response, however it ends (done, the page closed, the server stopping)
            await StreamingResponse(self.stream.events(), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-store"})(scope, receive, send)
        finally:
            self.stream.release()
