"""Best of N and the on-topic badge in the arena: every reply the page asks for is N replies in the
engine, one is kept, and, with an on-topic model, every kept reply is scored for whether it answers.

`BestOfEngine` wraps the engine with the engine's own interface (submit, cancel), so conversations,
battles and streams work unchanged; `submit_turn` starts the replies of one turn together (every
side of a conversation or battle). A submit becomes N submits of the same conversation to the same
model, the first with the settings as they are and the others sampled (scoring/best_of.py's
candidate_settings); the engine batches them with every other reply. With N > 1 nothing of the
candidates is streamed: once all N have ended, the one scoring/best_of.py's pick_best keeps (a clean
ending without a loop, then the persona's length when the model's training run says it, then the
on-topic score when there is a scorer) is sent as one text event and its "done". With N = 1 (only
an on-topic model) the reply streams as it is written and only its "done" waits for the score.

The on-topic score (scoring/ontopic.py) needs a base model, which runs in the thread that delivers
the turn's last "done": the engine thread, the one thread that may touch MLX. So a turn's replies
are scored together, in one call, once every reply of the turn (every side, every candidate) has
ended; each side's "done" then carries `on_topic` (true or false). A side that ends first waits for
the others' "done" (its text has streamed already). The score is about the reply's own text, like
its word count, so a blind battle may show it before the vote.

Cancel ends all N; the kept reply is then the best of what they had written, marked "stopped".
One candidate's error ends the reply with that error once the others have ended too.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable

from ..errors import GemmaMlxError

# (message, reply) pairs -> on-topic scores (None: nothing to score), all pairs in one call
Scorer = Callable[[list[tuple[str, str]]], list[float | None]]


class Picked:
    """The kept candidate, as the engine's Reply, plus how many were sampled and which was kept (None with
    one candidate) and whether it is on topic (None without a scorer)."""

    def __init__(self, reply, n: int, kept: int, seconds: float, on_topic: bool | None = None):
        self._reply, self.seconds, self.on_topic = reply, seconds, on_topic
        self.best_of = {"n": n, "kept": kept} if n > 1 else None

    def __getattr__(self, name):
        return getattr(self._reply, name)


class _Group:
    """The N candidates of one reply: collects their ends (engine thread); its turn sends the kept one."""

    def __init__(self, turn: _Turn, n: int, message: str, target_words: float | None, on_event):
        self.turn, self.n, self.message, self.target_words, self.on_event = turn, n, message, target_words, on_event
        self.handles: list[int] = []
        self.replies: list = [None] * n
        self.errors: list[str | None] = [None] * n
        self.ended = 0

    def listener(self, index: int):
        def on_event(kind: str, payload) -> None:
            if kind == "text":
                if self.n == 1:
                    self.on_event(kind, payload)  # one candidate: streamed as the engine writes it
                return  # several: not streamed
            with self.turn.lock:
                if kind == "done":
                    self.replies[index] = payload
                else:
                    self.errors[index] = str(payload)
                self.ended += 1
                mine = self.ended == self.n
            if mine:
                self.turn.group_ended(self)

        return on_event

    @property
    def error(self) -> str | None:
        return next((e for e in self.errors if e is not None), None)

    def finish(self, scores: list[float | None] | None, scored: bool) -> None:
        """Send the kept candidate (text, then "done"), or the first error."""
        from ..scoring.best_of import pick_reply
        from ..scoring.ontopic import is_on_topic

        if self.error is not None:
            self.on_event("error", self.error)
            return
        kept = pick_reply(self.replies, self.message, self.target_words, scores)
        on_topic = is_on_topic(scores[kept], self.message, self.replies[kept].text) if scored else None
        seconds = max(getattr(r, "seconds", 0.0) or 0.0 for r in self.replies)  # what the reader waited
        reply = Picked(self.replies[kept], self.n, kept, seconds, on_topic)
        if reply.text and self.n > 1:
            self.on_event("text", reply.text)
        self.on_event("done", reply)


class _Turn:
    """The replies of one turn (one group per side). Without a scorer each group is sent as soon as its
    candidates have ended; with one, every group waits for the others, and all their candidates are
    scored in one call."""

    def __init__(self, scorer: Scorer | None, progress: Callable[[str], None], expected: int):
        self.scorer, self.progress = scorer, progress
        self.groups: list[_Group] = []
        self.lock = threading.Lock()
        # known before the first submit, so the last group to end (in the engine thread) is the one that
        # scores, never the request's thread
        self.expected = expected
        self.dropped = False  # a submit failed: no one listens
        self.done = 0

    def group_ended(self, group: _Group) -> None:
        if self.scorer is None:
            if not self.dropped:
                group.finish(None, False)
            return
        with self.lock:
            self.done += 1
            last = self.done == self.expected and not self.dropped
        if last:
            self.finish()

    def finish(self) -> None:
        """Score every candidate of every group in one call, then send each group's kept reply."""
        pairs = [(g.message, r.text) for g in self.groups if g.error is None for r in g.replies]
        scored = True
        try:
            scores = self.scorer(pairs) if pairs else []
        except Exception as error:  # a scoring model that does not load: the replies go out without the badge
            if not isinstance(error, ScoringOff):  # said once, not at every turn
                self.progress(f"arena: on-topic scoring failed ({error}); replies are shown without the badge")
            scores, scored = [None] * len(pairs), False
        start = 0
        for group in self.groups:
            if group.error is not None:
                group.finish(None, False)
                continue
            group.finish(scores[start:start + group.n], scored)
            start += group.n


class BestOfEngine:
    """An engine (submit, submit_turn, cancel) whose every reply is the best of n of the wrapped engine's,
    and, with a scorer, carries its on-topic flag (n may be 1 then)."""

    def __init__(self, engine, n: int, scorer: Scorer | None = None, progress: Callable[[str], None] = lambda _: None):
        self.engine, self.n, self.scorer, self.progress = engine, n, scorer, progress
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
        return self.submit_turn([(model, messages, settings, on_event)])[0]

    def submit_turn(self, requests: list[tuple]) -> list[int]:
        """Start the replies of one turn, (model, messages, settings, on_event) each; their on-topic scores
        are computed together. When the engine refuses one, every one started is cancelled and the error
        raised, so the caller can put its conversation back as it was."""
        from ..scoring.best_of import candidate_settings

        turn = _Turn(self.scorer, self.progress, len(requests))
        handles = []
        try:
            for model, messages, settings, on_event in requests:
                group = _Group(turn, self.n, messages[-1]["content"], self.target_words(model), on_event)
                turn.groups.append(group)
                for index, variant in enumerate(candidate_settings(settings, self.n)):
                    group.handles.append(self.engine.submit(model, messages, variant, group.listener(index)))
                handle = next(self._handles)
                self._groups[handle] = group
                handles.append(handle)
        except (GemmaMlxError, KeyError):
            turn.dropped = True
            for group in turn.groups:
                for inner in group.handles:
                    self.engine.cancel(inner)
            raise
        while len(self._groups) > 4096:  # forget the oldest; their replies ended long ago
            self._groups.pop(next(iter(self._groups)))
        return handles

    def cancel(self, handle: int) -> None:
        group = self._groups.get(handle)
        for inner in group.handles if group is not None else []:
            self.engine.cancel(inner)


class ScoringOff(GemmaMlxError):
    """The on-topic model failed to load earlier (and that was said): no badge from now on."""


class TopicScorer:
    """The arena's on-topic scorer: the base model `spec`, loaded on first use in the thread that scores
    (the engine thread, which alone may touch MLX), then kept. A model that does not load is said once,
    and every later turn goes without the badge."""

    def __init__(self, spec: str, progress: Callable[[str], None] = lambda _: None, load=None):
        self.spec, self.progress, self._load = spec, progress, load
        self._loaded = None
        self._failed: str | None = None

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        from ..scoring.ontopic import on_topic_scores

        if self._failed is not None:
            raise ScoringOff(self._failed)
        if self._loaded is None:
            from ..models import load_model

            self.progress(f"arena: loading {self.spec} to score whether replies answer the message")
            try:
                self._loaded = (self._load or load_model)(self.spec)
            except Exception as error:
                self._failed = f"{self.spec} did not load: {error}"
                raise
        return on_topic_scores(self._loaded.model, self._loaded.tokenizer, pairs)
