"""The arena's web app: the page, its JSON API and the run's reports (Starlette, served by uvicorn).

Handlers stay thin: they check the request, then call the conversation (serving/chats.py), the
engine (serving/engine.py) or the votes (serving/ratings.py). Every POST must be JSON, which a
browser will not send from another site without a preflight this server never grants; the Guard
(serving/guard.py) refuses foreign hosts and other pages before any route runs.
"""

from __future__ import annotations

import functools
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path

from ..config import GenerationSettings, apply_text_overrides
from ..errors import ConfigError, GemmaMlxError, VoteNotSavedError
from ..manifest import write_failure
from .chats import Conflict, Conversations, from_record, listing, new_conversation, read_conversations
from .guard import Guard
from .streams import OneReader, ReplyStream

PAGE_DIR = Path(__file__).resolve().parent
SETTING_KEYS = ("temperature", "top_p", "max_tokens", "repetition_penalty", "seed")
MAX_PROMPT_CHARS = 4000
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"  # reports: no script at all
REPORT_SUFFIXES = (".html", ".svg", ".json", ".jsonl", ".txt", ".md")


def parse_settings(values: dict, defaults: GenerationSettings | None = None) -> GenerationSettings:
    """The page's settings (strings from a form or query) over `defaults`, checked by the one settings table."""
    texts = {key: values[key] for key in SETTING_KEYS if values.get(key) not in (None, "")}
    return apply_text_overrides(defaults or GenerationSettings(), texts, where="arena settings")


def _text(values: dict, key: str = "prompt", what: str = "The prompt", required: bool = True) -> str:
    value = values.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{what} ({key!r}) must be a string, not {type(value).__name__}.")
    text = (value or "").strip()
    if required and not text:
        raise ConfigError(f"{what} is empty. Type something, or pick a prompt from a prompt set.")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(f"{what} has {len(text)} characters; the arena takes at most {MAX_PROMPT_CHARS}.")
    return text


class BadRequest(GemmaMlxError):
    """A request the API cannot read (not JSON, the wrong shape)."""


def _answering(handler):
    """Errors become JSON with the status that says what kind they are."""
    from starlette.responses import JSONResponse

    from .engine import EngineBusy

    @functools.wraps(handler)
    async def answer(request):
        try:
            return await handler(request)
        except Conflict as problem:
            return JSONResponse({"error": str(problem)}, status_code=409)
        except EngineBusy as problem:
            return JSONResponse({"error": str(problem)}, status_code=503)
        except VoteNotSavedError as problem:  # the battle stays open: the same vote can be sent again
            return JSONResponse({"error": str(problem)}, status_code=507)
        except LookupError as problem:
            return JSONResponse({"error": problem.args[0]}, status_code=404)
        except GemmaMlxError as problem:
            return JSONResponse({"error": str(problem)}, status_code=400)

    return answer


async def _json(request, what: str, shape: str = "{}") -> dict:
    """The request's JSON object; anything else is one clear error naming the shape expected."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest(f"Send {what} as JSON (Content-Type: application/json): {shape}.")
    try:
        values = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting thousands deep
        values = None
    if not isinstance(values, dict):
        raise BadRequest(f"{what[0].upper()}{what[1:]} is JSON: {shape}.")
    return values


def on_topic_scorer(setup, engine, progress: Callable[[str], None]):
    """The scorer of the on-topic badge (serving/best_of.TopicScorer) when the arena was given an on-topic
    model, else None. A served model given by the same spec is the scorer as it is (not loaded twice)."""
    spec = getattr(setup, "on_topic_model", None)
    if not spec:
        return None
    from .best_of import TopicScorer

    served = next((name for name, given in setup.models.items() if given == spec), None)
    load = (lambda _spec: engine.models[served]) if served is not None else None
    return TopicScorer(spec, progress, load)


def make_app(setup, engine, allowed_hosts: set[str] | None = None, on_signal: Callable[[], None] | None = None,
             progress: Callable[[str], None] = lambda _: None):
    """The Starlette app for an arena.ArenaSetup and a serving.engine.Engine (or anything with its submit
    and cancel).

    allowed_hosts: the Host names it answers to (guard.allowed_hosts_for); None skips that check (tests).
    on_signal: called at once on Ctrl-C or SIGTERM while the app is served by uvicorn.run in the main
    thread (the engine's stop, which ends every open reply so the server can close their streams).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from .ratings import CHOICES, append_vote, leaderboard, preference_rows, read_votes

    best_of = getattr(setup, "best_of", 1)
    scorer = on_topic_scorer(setup, engine, progress)
    if best_of > 1 or scorer is not None:  # best of n and the on-topic badge (serving/best_of.py); the engine's interface is unchanged
        from .best_of import BestOfEngine

        engine = BestOfEngine(engine, best_of, scorer, progress)
    live = Conversations()
    names = list(setup.models)
    saved_file = setup.conversations

    def conversation(request):
        found = live.get(request.path_params["conversation_id"])
        if found is None:
            raise LookupError("That conversation is unknown to this arena (it was started before a restart, or long "
                              "ago); reopen it from the Conversations tab, or start a new one.")
        return found

    def servable(talk):
        """A reopened conversation may name a model this arena was not started with."""
        missing = sorted({side.model for side in talk.sides.values() if side.model not in setup.models})
        if missing:
            which = "a model" if talk.hidden else ", ".join(missing)  # a blind battle's models stay hidden
            raise Conflict(f"This conversation's {which} is not served by this arena (it serves {', '.join(names)}); "
                           "it can be read here, but not continued.")
        return talk

    async def page(_request):
        return FileResponse(PAGE_DIR / "page.html", media_type="text/html")

    async def asset(request):
        name = request.path_params["name"]
        if name not in ("arena.js", "messages.js", "arena.css"):
            return PlainTextResponse("Not found", status_code=404)
        return FileResponse(PAGE_DIR / name, media_type="text/javascript" if name.endswith(".js") else "text/css")

    async def models(_request):
        defaults = setup.settings
        return JSONResponse({"models": names, "prompt_sets": setup.prompt_sets, "reports": setup.reports,
                             "settings": {k: getattr(defaults, k) for k in SETTING_KEYS},
                             "blind": len(names) >= 2, "best_of": best_of, "on_topic": scorer is not None,
                             "votes_file": str(setup.votes),
                             "conversations_file": str(saved_file)})

    @_answering
    async def stream(request):
        """One prompt to one model, outside any conversation (scripts, benchmarks)."""
        values = dict(request.query_params)
        model = values.get("model")
        if model not in setup.models:
            raise LookupError(f"Unknown model {model!r}. This arena serves: {', '.join(names)}.")
        settings, prompt = parse_settings(values, setup.settings), _text(values)
        reply = ReplyStream()
        reply.handle = engine.submit(model, [{"role": "user", "content": prompt}], settings, reply.on_event)
        return OneReader(reply)

    @_answering
    async def battle(request):
        if len(names) < 2:
            raise ConfigError("A blind battle needs at least two models.")
        values = await _json(request, "a battle", '{"prompt": ..., "system": ..., and settings}')
        return start(values, random.sample(names, 2), blind=True)

    @_answering
    async def chat(request):
        values = await _json(request, "a chat", '{"models": [...], "prompt": ..., "system": ..., and settings}')
        picked = values.get("models") or names
        if (not isinstance(picked, list) or not picked or not all(isinstance(m, str) for m in picked)
                or any(m not in setup.models for m in picked)):
            raise LookupError(f"Unknown models {picked!r}. This arena serves: {', '.join(names)}.")
        return start(values, list(dict.fromkeys(picked)), blind=False)

    def start(values: dict, models: list[str], blind: bool):
        settings, prompt = parse_settings(values, setup.settings), _text(values)
        system = _text(values, "system", "The system prompt", required=False)
        started = new_conversation(models, blind, system)
        started.ask(engine, prompt, settings)
        live.add(started)
        return JSONResponse({"id": started.id, "sides": list(started.sides)})

    @_answering
    async def turn(request):
        talk = servable(conversation(request))
        values = await _json(request, "a message", '{"prompt": ..., and settings}')
        talk.ask(engine, _text(values), parse_settings(values, setup.settings))
        return JSONResponse({"id": talk.id, "turns": talk.turns(), "sides": list(talk.sides)})

    @_answering
    async def regenerate(request):
        talk = servable(conversation(request))
        values = await _json(request, "a regenerate request", '{"side": one side or none for all, and settings}')
        side = values.get("side")
        if side is not None and not isinstance(side, str):
            raise BadRequest(f"side must be one side's name (a string) or left out for all, not {type(side).__name__}.")
        keys = talk.regenerate(engine, parse_settings(values, setup.settings), side)
        return JSONResponse({"id": talk.id, "sides": keys})

    @_answering
    async def stop(request):
        talk = conversation(request)
        await _json(request, "this request")
        return JSONResponse({"stopped": talk.stop(engine)})

    @_answering
    async def show(request):
        return JSONResponse(conversation(request).view())

    @_answering
    async def side_stream(request):
        talk = conversation(request)
        side = talk.sides.get(request.query_params.get("side", ""))
        if side is None or side.stream is None:
            raise LookupError("Unknown side, or no reply is on its way there.")
        return OneReader(side.stream)

    @_answering
    async def save(request):
        talk = conversation(request)
        await _json(request, "this request")
        if talk.busy():
            raise Conflict("Wait until every reply is finished (or press Stop), then save.")
        from .journal import append_record

        try:
            append_record(saved_file, talk.record())
        except OSError as error:
            raise VoteNotSavedError(f"The conversation could not be saved to {saved_file} "
                                    f"({write_failure(error)}). Nothing was added to the file; fix that and save "
                                    "again.") from None
        return JSONResponse({"saved": str(saved_file)})

    @_answering
    async def saved(_request):
        return JSONResponse({"conversations": listing(read_conversations(saved_file)), "file": str(saved_file)})

    @_answering
    async def reopen(request):
        await _json(request, "this request")
        wanted = request.path_params["conversation_id"]
        talk = live.get(wanted)
        if talk is None or not talk.busy():
            record = read_conversations(saved_file).get(wanted)
            if record is None:
                raise LookupError(f"No saved conversation {wanted!r} in {saved_file}.")
            earlier, talk = talk, live.add(from_record(record))
            if talk.blind and talk.choice is None:  # saved before its vote: the vote still stands, once
                choice = earlier.choice if earlier is not None else None
                choice = choice or next((v.get("choice") for v in read_votes(setup.votes)
                                         if v.get("conversation") == wanted), None)
                if choice:
                    talk.voted(choice)
        return JSONResponse(talk.view())

    @_answering
    async def vote(request):
        values = await _json(request, "a vote", '{"id": the battle\'s id, "choice": "A", "B", "tie" or "bad"}')
        if "id" not in values or "choice" not in values:
            raise BadRequest("A vote is JSON: {\"id\": the battle's id, \"choice\": \"A\", \"B\", \"tie\" or \"bad\"}.")
        talk, choice = live.get(values["id"]), values["choice"]
        if talk is None or not talk.blind:
            raise LookupError("That battle is unknown to this arena (its models were not shown here); vote on a "
                              "battle from this page.")
        if choice not in CHOICES:
            raise ConfigError(f"choice is {choice!r}; use one of {', '.join(CHOICES)}.")
        if talk.choice is not None:
            raise Conflict("This battle has a vote already.")
        # no await from here until the vote is kept: two clicks cannot both get past the check above
        append_vote(setup.votes, talk.vote_record(choice))
        talk.voted(choice)
        return JSONResponse({"model_a": talk.sides["A"].model, "model_b": talk.sides["B"].model, "choice": choice})

    @_answering
    async def board(_request):
        return JSONResponse(leaderboard(read_votes(setup.votes), names))

    async def preferences(_request):
        rows = preference_rows(read_votes(setup.votes))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="preferences.jsonl"'})

    async def report(request):
        if setup.run_dir is None:
            return PlainTextResponse("Not found", status_code=404)
        try:
            target = (setup.run_dir / request.path_params["path"]).resolve()
        except (ValueError, OSError):  # a NUL byte in the path, or a path the OS cannot take
            return PlainTextResponse("Not found", status_code=404)
        # a report and the files beside it only: not the votes, the saved conversations (whose blind battles
        # name their models) or the data, and nothing outside the run, whatever the path says
        if (not target.is_relative_to(setup.run_dir) or not target.is_file() or target.suffix not in REPORT_SUFFIXES
                or not (target.parent / "report.html").is_file()):
            return PlainTextResponse("Not found", status_code=404)
        return FileResponse(target, headers={"Content-Security-Policy": REPORT_POLICY})

    post = ["POST"]
    routes = [
        Route("/", page), Route("/static/{name}", asset), Route("/api/models", models),
        Route("/api/stream", stream), Route("/api/battle", battle, methods=post), Route("/api/chat", chat, methods=post),
        Route("/api/chat/{conversation_id}", show),
        Route("/api/chat/{conversation_id}/turn", turn, methods=post),
        Route("/api/chat/{conversation_id}/regenerate", regenerate, methods=post),
        Route("/api/chat/{conversation_id}/stop", stop, methods=post),
        Route("/api/chat/{conversation_id}/save", save, methods=post),
        Route("/api/chat/{conversation_id}/stream", side_stream),
        Route("/api/battle/{conversation_id}/stream", side_stream),
        Route("/api/conversations", saved), Route("/api/conversations/{conversation_id}/open", reopen, methods=post),
        Route("/api/vote", vote, methods=post), Route("/api/leaderboard", board),
        Route("/api/preferences", preferences), Route("/reports/{path:path}", report),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, allowed_hosts=allowed_hosts)],
                     lifespan=_signals_calling(on_signal))


def _signals_calling(on_signal: Callable[[], None] | None):
    """A lifespan that, while uvicorn serves in the main thread, has Ctrl-C and SIGTERM call on_signal
    first and then uvicorn's own handler (installed by then; uvicorn puts the old ones back itself).

    Why: uvicorn waits for open responses before it stops, and a streamed reply may have minutes to
    go. on_signal ends them at once, so the server stops within a second or two."""
    import contextlib
    import signal

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if on_signal is not None and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                server_handler = signal.getsignal(signum)
                if callable(server_handler):
                    signal.signal(signum, _chained(on_signal, server_handler))
        yield

    return lifespan


def _chained(first: Callable[[], None], handler):
    def handle(signum, frame):
        first()
        handler(signum, frame)

    return handle
