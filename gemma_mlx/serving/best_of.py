"""Best of N in the arena: every reply the page asks for is N replies in the engine, and one is kept.

`BestOfEngine` wraps the engine with the engine's own interface (submit, cancel), so conversations,
battles and streams work unchanged. A submit becomes N submits of the same conversation to the same
model, the first with the settings as they are and the others sampled (scoring/best_of.py's
candidate_settings); the engine batches them with every other reply. Nothing of the candidates is
streamed: once all N have ended, the one scoring/best_of.py's pick_best keeps (a clean ending
without a loop, then the persona's length when the model's training run says it) is sent as one
text event and its "done". The on-topic term is not used here: scoring it would need the base model
in the engine thread beside the served ones.

Cancel ends all N; the kept reply is then the best of what they had written, marked "stopped".
One candidate's error ends the reply with that error once the others have ended too.
"""

from __future__ import annotations

import itertools
import threading

from ..errors import GemmaMlxError


class Picked:
    """The kept candidate, as the engine's Reply, plus how many were sampled and which was kept."""

    def __init__(self, reply, n: int, kept: int, seconds: float):
        self._reply, self.best_of, self.seconds = reply, {"n": n, "kept": kept}, seconds

    def __getattr__(self, name):
        return getattr(self._reply, name)


class _Group:
    """The N candidates of one reply: collects their ends (engine thread), then sends the kept one."""

    def __init__(self, n: int, message: str, target_words: float | None, on_event):
        self.n, self.message, self.target_words, self.on_event = n, message, target_words, on_event
        self.handles: list[int] = []
        self.replies: list = [None] * n
        self.errors: list[str | None] = [None] * n
        self.ended = 0
        self.dropped = False  # the submit failed: no one listens
        self.lock = threading.Lock()

    def listener(self, index: int):
        def on_event(kind: str, payload) -> None:
            if kind == "text":
                return  # candidates are not streamed
            with self.lock:
                if kind == "done":
                    self.replies[index] = payload
                else:
                    self.errors[index] = str(payload)
                self.ended += 1
                last = self.ended == self.n
            if last and not self.dropped:
                self._finish()

        return on_event

    def _finish(self) -> None:
        from ..scoring.best_of import pick_reply

        error = next((e for e in self.errors if e is not None), None)
        if error is not None:
            self.on_event("error", error)
            return
        kept = pick_reply(self.replies, self.message, self.target_words)
        seconds = max(getattr(r, "seconds", 0.0) or 0.0 for r in self.replies)  # what the reader waited
        reply = Picked(self.replies[kept], self.n, kept, seconds)
        if reply.text:
            self.on_event("text", reply.text)
        self.on_event("done", reply)


class BestOfEngine:
    """An engine (submit, cancel) whose every reply is the best of n of the wrapped engine's."""

    def __init__(self, engine, n: int):
        self.engine, self.n = engine, n
        self._groups: dict[int, _Group] = {}
        self._handles = itertools.count(1)
        self._words: dict[str, float | None] = {}

    def __getattr__(self, name):  # models, stop, close, decoding: the wrapped engine's
        return getattr(self.engine, name)

    def target_words(self, model: str) -> float | None:
        """The persona's mean reply words for a served model (its training run's summary), once per model."""
        if model not in self._words:
            from ..scoring.best_of import persona_words

            loaded = (getattr(self.engine, "models", None) or {}).get(model)
            self._words[model] = persona_words(loaded) if loaded is not None else None
        return self._words[model]

    def submit(self, model: str, messages: list[dict], settings, on_event) -> int:
        from ..scoring.best_of import candidate_settings

        group = _Group(self.n, messages[-1]["content"], self.target_words(model), on_event)
        try:
            for index, variant in enumerate(candidate_settings(settings, self.n)):
                group.handles.append(self.engine.submit(model, messages, variant, group.listener(index)))
        except (GemmaMlxError, KeyError):
            group.dropped = True
            for handle in group.handles:
                self.engine.cancel(handle)
            raise
        handle = next(self._handles)
        self._groups[handle] = group
        if len(self._groups) > 4096:  # forget the oldest; their replies ended long ago
            self._groups.pop(next(iter(self._groups)))
        return handle

    def cancel(self, handle: int) -> None:
        group = self._groups.get(handle)
        for inner in group.handles if group is not None else []:
            self.engine.cancel(inner)
