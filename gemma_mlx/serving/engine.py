"""One thread owns MLX and serves every model: requests from any thread are continuously batched.

The web server's handlers run elsewhere (an asyncio loop); they submit a conversation and get its
reply back piece by piece through a callback. The engine thread keeps one mlx-lm BatchGenerator per
model, driven by a decoding.Driver (the one compare and chat use, with its incremental
detokenizer), and steps each in turn, inserting new requests into the running batch, so eight concurrent
requests to one model are decoded together instead of waiting in line. Prompts, stop rules and
sampling are the generation engine's own (generate.py), so a reply here is the reply compare or
chat would give with the same settings. A thought channel (Gemma 4) is never shown: its text goes to
no "text" event and no reply text, and the reply goes on to the answer.

Bounded: the engine is one thread, however many requests come, and it holds at most MAX_REQUESTS
replies (waiting or being written); one more is refused with EngineBusy instead of queueing without
end. stop() is safe to call from a signal handler: it never blocks, and every reply still open ends
with an "error" event, so no listener waits for a reply that will never come.

cancel(handle) ends one reply early (the page's Stop): its row leaves the model's batch, so the
engine stops decoding it, and the reply ends with a "done" event whose finish_reason is "stopped",
carrying the text written so far.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .. import decode_step
from ..chat_format import thought_channel_ids
from ..config import GenerationSettings
from ..decoding import Driver
from ..errors import GemmaMlxError
from ..generate import Reply, finished_reply, insert_rows, new_generator, prompt_rows
from ..models import LoadedModel, load_model

# on_event(kind, payload): ("text", str) for each new piece, then ("done", Reply) or ("error", str)
OnEvent = Callable[[str, object], None]
MAX_REQUESTS = 64  # replies waiting or being written at once; a battle is two
STOPPED = "the arena is stopping; this reply was not finished"
CANCELLED = "stopped"  # the finish_reason of a reply ended by cancel()


class EngineBusy(GemmaMlxError):
    """The engine holds as many replies as it takes; the request is refused, not queued."""


@dataclass
class _Request:
    model: str
    messages: list[dict]
    settings: GenerationSettings
    on_event: OnEvent
    handle: int = 0


@dataclass
class _Cancel:
    handle: int


@dataclass
class _Live:
    """A reply being decoded: its row and who hears it (the driver keeps its tokens and text)."""

    row: object
    on_event: OnEvent
    handle: int = 0


class Engine:
    """Load the models, then answer submitted conversations; close() stops the thread."""

    def __init__(self, specs: dict[str, str], progress: Callable[[str], None] = lambda _: None):
        self._requests: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._open = threading.BoundedSemaphore(MAX_REQUESTS)  # one per reply not yet done
        self._submitting = threading.Lock()  # a request is queued before _end_all drains, or refused
        self._handles = itertools.count(1)
        self._live: dict[str, dict[int, _Live]] = {}
        self.models: dict[str, LoadedModel] = {}
        self._thread = threading.Thread(target=self._main, args=(specs, progress), name="gemma-mlx-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    # ----- the server's side ------------------------------------------------------------------
    def submit(self, model: str, messages: list[dict], settings: GenerationSettings, on_event: OnEvent) -> int:
        """Queue one conversation (ending in a user turn) for `model`; on_event hears the reply.
        Returns the reply's handle, for cancel()."""
        if model not in self.models:
            raise KeyError(model)
        with self._submitting:
            if self._stop:
                raise EngineBusy(STOPPED)
            if not self._open.acquire(blocking=False):
                raise EngineBusy(f"The arena is writing {MAX_REQUESTS} replies already; try again when one has "
                                 "finished.")
            handle = next(self._handles)
            self._requests.put(_Request(model, messages, settings, self._releasing(on_event), handle))
        return handle

    def cancel(self, handle: int) -> None:
        """End the reply `handle` now (a "done" event, finish_reason "stopped"); a reply already ended is left
        alone. Returns at once: the engine thread does it, after any request queued before."""
        self._requests.put(_Cancel(handle))

    def decoding(self) -> int:
        """How many replies are being decoded now (rows in the models' batches)."""
        return sum(len(rows) for rows in list(self._live.values()))

    def _releasing(self, on_event: OnEvent) -> OnEvent:
        """on_event, which gives the request's place back once its reply has ended (done or error)."""
        ended = threading.Event()

        def deliver(kind: str, payload) -> None:
            if kind != "text" and not ended.is_set():
                ended.set()
                self._open.release()
            on_event(kind, payload)

        return deliver

    def stop(self) -> None:
        """Ask the engine thread to end every open reply and exit; returns at once and takes no lock, so a
        signal handler may call it."""
        self._stop = True
        self._requests.put(None)

    def close(self, timeout: float = 5.0) -> None:
        """stop(), then wait (at most `timeout` seconds: the thread is a daemon) for the thread to end."""
        self.stop()
        self._thread.join(timeout=timeout)

    # ----- the engine thread ------------------------------------------------------------------
    def _main(self, specs: dict[str, str], progress) -> None:
        try:
            for name, spec in specs.items():
                progress(f"arena: loading {name} ({spec})")
                self.models[name] = load_model(spec)
                decode_step.warm_up(self.models[name].model)  # its greedy one-row steps, battle after battle
        except BaseException as error:  # a model that does not load: the constructor re-raises it
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        generators: dict[str, Driver] = {}
        live: dict[str, dict[int, _Live]] = {name: {} for name in self.models}
        self._live = live
        while not self._stop:
            busy = any(live.values())
            try:
                request = self._requests.get(timeout=None if not busy else 0)
            except queue.Empty:
                request = None
            while request is not None:
                self._start(request, generators, live)
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    request = None
            for name, rows in live.items():
                if rows:
                    try:
                        self._step(name, generators[name], rows)
                    except Exception as error:  # a failing batch ends its own replies, not the engine
                        for state in rows.values():
                            _tell(state.on_event, "error", f"generation failed: {error}")
                        rows.clear()
                        generators.pop(name).close()
        for generator in generators.values():
            generator.close()
        self._end_all(live)

    def _end_all(self, live: dict[str, dict[int, _Live]]) -> None:
        """Stopping: every reply still open, being written or waiting, hears that it will not finish."""
        for rows in live.values():
            for state in rows.values():
                _tell(state.on_event, "error", STOPPED)
            rows.clear()
        with self._submitting:
            while True:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    return
                if isinstance(request, _Request):
                    _tell(request.on_event, "error", STOPPED)

    def _start(self, request: _Request | _Cancel | None, generators: dict, live: dict) -> None:
        if request is None:
            return
        if isinstance(request, _Cancel):
            self._cancel(request.handle, generators, live)
            return
        loaded = self.models[request.model]
        try:
            (row,) = prompt_rows(loaded.tokenizer, [request.messages], [request.settings])
            if request.model not in generators:
                generators[request.model] = Driver(new_generator(loaded), loaded.tokenizer, text=True,
                                                   channel=thought_channel_ids(loaded.tokenizer))
            driver = generators[request.model]
            (uid,) = insert_rows(driver.generator, loaded, [row])
        except Exception as error:  # a prompt beyond the context, a malformed conversation
            _tell(request.on_event, "error", str(error))
            return
        driver.track([uid], [row])
        live[request.model][uid] = _Live(row, request.on_event, request.handle)

    def _cancel(self, handle: int, generators: dict, live: dict) -> None:
        """Take the reply's row out of its batch and end the reply with what it has. The queue is in order,
        so a reply not found here has ended already."""
        for name, rows in live.items():
            for uid, state in list(rows.items()):
                if state.handle != handle:
                    continue
                stream, piece = generators[name].remove(uid)
                del rows[uid]
                if piece:
                    _tell(state.on_event, "text", piece)
                _tell(state.on_event, "done", finished_reply(self.models[name].tokenizer, state.row, stream.tokens,
                                                             CANCELLED, None, time.perf_counter() - stream.started,
                                                             stream.thought))
                return

    def _step(self, name: str, driver: Driver, rows: dict[int, _Live]) -> None:
        for event in driver.step() or []:
            state = rows.get(event.uid)
            if state is None:
                continue
            if event.piece:
                _tell(state.on_event, "text", event.piece)
            if event.finish_reason is not None:
                reply: Reply = finished_reply(self.models[name].tokenizer, state.row, event.stream.tokens,
                                              event.finish_reason, event.stop_id, event.seconds,
                                              event.stream.thought)
                _tell(state.on_event, "done", reply)
                del rows[event.uid]


def _tell(on_event: OnEvent, kind: str, payload) -> None:
    """Deliver one event; a listener that fails (a page gone away) must not stop the engine."""
    try:
        on_event(kind, payload)
    except Exception:
        pass
