"""`gemma-mlx arena`: a local web page to chat with models side by side and to rate them blind.

Side by side: one prompt, every selected model answers in its own column, streamed as it is
written. Blind A/B: two models picked at random answer as "A" and "B"; the person votes (A, B, tie,
both bad; keys 1-4) and only then sees the names. Votes go to votes.jsonl (the run's, or --votes)
and become Bradley-Terry ratings with bootstrap intervals (serving/ratings.py); the decided ones
export as a preference dataset. Every reply comes from the one generation engine with compare's
turn format, stop rules and flags, and requests to the same model share one continuously batched
generator (serving/engine.py).

Safety: the server binds to 127.0.0.1 unless told otherwise; requests whose Host header is not one
of this machine's names (or an --allow-host) are refused (DNS rebinding), on 0.0.0.0 too; requests
from other web pages (an Origin not this page's, Sec-Fetch-Site cross-site) are refused before they
start a reply; model text reaches the page only as text, never as HTML; files are served only from
the run's directory; a vote must name a battle this server ran. A reply has one reader at a time
(a second gets 409), and no thread waits on a reply, so Ctrl-C always stops the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .config import SHIPPED_DATA, GenerationSettings, apply_overrides, apply_text_overrides, to_dict
from .errors import ConfigError, GemmaMlxError, OutputExistsError, VoteNotSavedError
from .manifest import Progress, now_iso, outputs_root, quiet, read_manifest, write_error, write_text_atomic

PAGE_DIR = Path(__file__).resolve().parent / "serving"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
SETTING_KEYS = ("temperature", "top_p", "max_tokens", "repetition_penalty", "seed")
MAX_PROMPT_CHARS = 4000
MAX_BATTLES = 1000  # battles kept in memory for their vote
PAGE_POLICY = "default-src 'self'; img-src 'self' data:"  # our own script and styles only: no inline code
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"  # reports: no script at all
STOP_SECONDS = 2  # after Ctrl-C, how long responses still open may take before they are cut
REPORT_SUFFIXES = (".html", ".svg", ".json", ".jsonl", ".txt", ".md")


@dataclass
class ArenaSetup:
    """What an arena serves: the models (display name -> spec), prompts, the votes file and the reports."""

    models: dict[str, str]
    votes: Path
    run_dir: Path | None = None
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)  # paths under run_dir
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # the run's, else compare's defaults


def _run_models(run_dir: Path, manifest: dict | None) -> dict[str, str]:
    """The fused models and their bases that `gemma-mlx run` recorded in its manifest."""
    if not manifest or manifest.get("stage") != "run":
        raise GemmaMlxError(
            f"{run_dir} is not an experiment run (no manifest.json written by `gemma-mlx run`). Give the directory "
            "`gemma-mlx run` made (outputs/runs/<name>), or name the models themselves."
        )
    details = {s["stage"]: s.get("details", {}) for s in manifest.get("stages", [])}
    models = {}
    for name, path in (details.get("fuse", {}).get("fused") or {}).items():
        models[f"{name} + LoRA"] = _found(path, run_dir)
    for name, path in (details.get("convert", {}).get("models") or {}).items():
        models[f"{name} (base)"] = _found(path, run_dir)
    if not models:
        raise GemmaMlxError(f"The run in {run_dir} has no converted or fused models yet. Run `gemma-mlx run` to the end first.")
    return models


def _found(path: str, run_dir: Path) -> str:
    """A path from the run's manifest, which may be relative to where `run` was started: try here,
    then the directories above the run (outputs/runs/NAME -> the project), so any cwd works."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    for base in run_dir.parents[:3]:
        if (base / path).exists():
            return str(base / path)
    return path  # check_model_specs says it is missing


def _prompt_sets(files: list[Path]) -> dict[str, list[str]]:
    from .prompts import read_prompts

    return {path.stem: read_prompts(path) for path in files if path.is_file()}


def arena_setup(specs: list[str], run: Path | None = None, votes: Path | None = None,
                progress: Progress = quiet) -> ArenaSetup:
    """Check every model and file before anything loads; errors are one paragraph each.

    A votes file whose last line a crash cut off is repaired here (the line moved aside, reported
    through `progress`), so one interrupted write never stops the arena from starting.
    """
    from .models import model_dir_path
    from .scoring.inputs import check_model_specs

    run_dir = Path(run).expanduser().resolve() if run else None
    models: dict[str, str] = {}
    manifest: dict = {}
    if run_dir is not None:
        if not run_dir.is_dir():
            raise GemmaMlxError(f"Run directory {run} does not exist. Give the directory `gemma-mlx run` made "
                                "(outputs/runs/<name>).")
        manifest = read_manifest(run_dir) or {}
        models.update(_run_models(run_dir, manifest))
    for spec in specs:
        base, _, adapters = str(spec).partition("::")
        name = model_dir_path(base).name + (f"+{Path(adapters).name}" if adapters else "")
        models[name if name not in models else str(spec)] = str(spec)
    if not models:
        raise GemmaMlxError("No models for the arena. Name model directories, or pass --run outputs/runs/NAME.")
    check_model_specs(list(models.values()))
    config = manifest.get("config") or {}
    files = [Path(_found(p, run_dir)) for p in config.get("prompts") or []] or sorted((SHIPPED_DATA / "prompts").glob("*.txt"))
    reports = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("report.html")) if run_dir else []
    votes_file = Path(votes) if votes else (run_dir / "votes.jsonl" if run_dir else outputs_root() / "arena" / "votes.jsonl")
    check_votes_file(votes_file, progress)
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    recorded = {k: v for k, v in (config.get("generation") or {}).items() if k in known}
    settings = apply_overrides(GenerationSettings(), {**recorded, "samples": 1}, where=f"{run_dir}/manifest.json")
    return ArenaSetup(models, votes_file, run_dir, _prompt_sets(files), reports, settings)


def check_votes_file(path: Path, progress: Progress = quiet) -> None:
    """Before serving: the votes file is a file, a cut-off last line is moved aside (and reported),
    and any other damage is an error naming its line, not a failure on the first vote."""
    from .serving.ratings import read_votes, recover_votes

    if path.is_dir():
        raise GemmaMlxError(f"The votes file {path} is a directory, so no vote could be saved. Pass --votes with a "
                            f"file name (e.g. {path / 'votes.jsonl'}).")
    report = recover_votes(path)
    if report:
        progress(report)
    read_votes(path)


# ---------------------------------------------------------------------------- the web app

def reply_json(reply) -> dict:
    """What the page and the votes file keep of a reply: its text and compare's flags for it."""
    from .scoring.scorecard import reply_flags

    flags = reply_flags(reply.text, reply.finish_reason, markers=[], out_of_character=[])
    return {"text": reply.text, "tokens": reply.tokens, "finish_reason": reply.finish_reason,
            "stop_token": reply.stop_token, "seconds": reply.seconds,
            **{key: flags[key] for key in ("words", "cut", "empty", "mid_sentence", "loop")}}


def parse_settings(values: dict, defaults: GenerationSettings | None = None) -> GenerationSettings:
    """The page's settings (strings from a form or query) over `defaults`, checked by the one settings table."""
    texts = {key: values[key] for key in SETTING_KEYS if values.get(key) not in (None, "")}
    return apply_text_overrides(defaults or GenerationSettings(), texts, where="arena settings")


def _prompt(values: dict) -> str:
    prompt = str(values.get("prompt") or "").strip()
    if not prompt:
        raise ConfigError("The prompt is empty. Type something, or pick a prompt from a prompt set.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"The prompt has {len(prompt)} characters; the arena takes at most {MAX_PROMPT_CHARS}.")
    return prompt


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Stream:
    """One reply on its way to the page: the engine thread appends its events, one reader sends them.

    The events are kept, so a reader that comes back (a reloaded page) gets the whole reply again,
    and a second reader at the same time is refused (claim), not left waiting for events the first
    one took. No thread waits for events: the engine thread wakes the reader's event loop, which may
    be another loop than the one that asked for the reply (a battle is started by one request and
    read by two others).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple[str, object]] = []
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._reading = False
        self.reply: dict | None = None

    def on_event(self, kind: str, payload) -> None:  # called from the engine thread
        with self._lock:
            self._events.append((kind, payload))
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, wake = waiter
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that loop has closed, and its reader with it
                pass

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

    async def events(self):
        if self.reply is not None:  # read again: the finished reply at once
            yield _sse("text", {"text": self.reply["text"]})
            yield _sse("done", self.reply)
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
                    yield _sse("done", self.reply)
                    return
                else:
                    yield _sse("error", {"message": payload})
                    return


class _OneReader:
    """The response that streams a reply to its one reader; a second one at the same time gets 409."""

    def __init__(self, stream: _Stream):
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


class _Guard:
    """Before any route: refuse foreign Host headers (DNS rebinding) and requests from other web pages,
    then add the page's security headers. Plain ASGI, so streamed replies pass through untouched."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers, MutableHeaders
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = refusal_for(scope["path"], Headers(scope=scope), self.allowed_hosts)
        if refusal is not None:
            await PlainTextResponse(f"Forbidden: {refusal}", status_code=403)(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", PAGE_POLICY)
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def refusal_for(path: str, headers, allowed_hosts: set[str] | None) -> str | None:
    """Why a request is refused (None: it is not).

    - A Host header that is not one of this machine's names: a foreign name pointed at this machine
      (DNS rebinding). allowed_hosts None (tests only) skips this one check.
    - An Origin other than this page's own: another web site's script, which the browser lets send
      (but not read) requests here.
    - Sec-Fetch-Site cross-site or same-site on the API: another page's <img>, <script> or link, which
      carries no Origin; without this a GET of /api/stream from any web site would start a reply.
    """
    host = headers.get("host", "")
    if allowed_hosts is not None and host_name(host).lower() not in allowed_hosts:
        return ("this arena answers only to its own host names. Open it as http://127.0.0.1:PORT/ (or this machine's "
                "name), or start it with --allow-host NAME for the name you use.")
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, host):
        return "requests from other web pages are refused."
    if path.startswith("/api/") and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return "requests from other web pages are refused."
    return None


def _same_origin(origin: str, host: str) -> bool:
    """The Origin header names the page this request's Host serves ("null" and other sites do not)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.lower()


def make_app(setup: ArenaSetup, engine, allowed_hosts: set[str] | None = None,
             on_signal: Callable[[], None] | None = None):
    """The Starlette app: the page, its API and the run's reports.

    allowed_hosts: the Host names it answers to (allowed_hosts_for); None skips that check (tests).
    on_signal: called at once on Ctrl-C or SIGTERM while the app is served by uvicorn.run in the main
    thread (the engine's stop, which ends every open reply so the server can close their streams).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from .serving.engine import EngineBusy
    from .serving.ratings import CHOICES, append_vote, leaderboard, preference_rows, read_votes

    battles: dict[str, dict] = {}
    names = list(setup.models)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def is_json(request) -> bool:
        """A JSON body needs a CORS preflight from another site, which this server never grants."""
        return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"

    async def page(_request):
        return FileResponse(PAGE_DIR / "page.html", media_type="text/html")

    async def asset(request):
        name = request.path_params["name"]
        if name not in ("arena.js", "arena.css"):
            return PlainTextResponse("Not found", status_code=404)
        return FileResponse(PAGE_DIR / name, media_type="text/javascript" if name.endswith(".js") else "text/css")

    async def models(_request):
        defaults = setup.settings
        return JSONResponse({"models": names, "prompt_sets": setup.prompt_sets, "reports": setup.reports,
                             "settings": {k: getattr(defaults, k) for k in SETTING_KEYS},
                             "blind": len(names) >= 2, "votes_file": str(setup.votes)})

    async def stream(request: Request):
        values = dict(request.query_params)
        model = values.get("model")
        if model not in setup.models:
            return error(f"Unknown model {model!r}. This arena serves: {', '.join(names)}.", 404)
        try:
            settings, prompt = parse_settings(values, setup.settings), _prompt(values)
        except GemmaMlxError as problem:
            return error(str(problem))
        reply = _Stream()
        try:
            engine.submit(model, [{"role": "user", "content": prompt}], settings, reply.on_event)
        except EngineBusy as problem:
            return error(str(problem), 503)
        return _OneReader(reply)

    async def battle(request: Request):
        if len(names) < 2:
            return error("A blind battle needs at least two models.")
        if not is_json(request):
            return error("Send the battle as JSON (Content-Type: application/json).")
        try:
            values = await request.json()
            settings, prompt = parse_settings(values, setup.settings), _prompt(values)
        except (json.JSONDecodeError, AttributeError, TypeError):
            return error("Send the battle as JSON: {\"prompt\": ..., and settings}.")
        except GemmaMlxError as problem:
            return error(str(problem))
        while len(battles) >= MAX_BATTLES:  # forget the oldest battles; a late vote on one is refused
            battles.pop(next(iter(battles)))
        pair = random.sample(names, 2)
        battle_id = secrets.token_hex(8)
        sides = {"A": _Stream(), "B": _Stream()}
        try:
            for side, model in zip("AB", pair):
                engine.submit(model, [{"role": "user", "content": prompt}], settings, sides[side].on_event)
        except EngineBusy as problem:  # a side already queued still ends; nobody reads it
            return error(str(problem), 503)
        battles[battle_id] = {"prompt": prompt, "settings": to_dict(settings), "models": dict(zip("AB", pair)),
                              "sides": sides, "voted": False, "started": time.time()}
        return JSONResponse({"id": battle_id})

    async def battle_stream(request: Request):
        record = battles.get(request.path_params["battle_id"])
        side = request.query_params.get("side")
        if record is None or side not in ("A", "B"):
            return error("Unknown battle or side.", 404)
        return _OneReader(record["sides"][side])

    async def vote(request: Request):
        if not is_json(request):
            return error("Send the vote as JSON (Content-Type: application/json).")
        try:
            values = await request.json()
            battle_id, choice = values["id"], values["choice"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return error("A vote is JSON: {\"id\": the battle's id, \"choice\": \"A\", \"B\", \"tie\" or \"bad\"}.")
        record = battles.get(battle_id) if isinstance(battle_id, str) else None
        if record is None:
            return error("That battle is unknown to this arena (its models were not shown here); vote on a battle "
                         "from this page.", 404)
        if choice not in CHOICES:
            return error(f"choice is {choice!r}; use one of {', '.join(CHOICES)}.")
        if record["voted"]:
            return error("This battle has a vote already.", 409)
        replies = {side: record["sides"][side].reply for side in "AB"}
        if None in replies.values():
            return error("Wait until both replies are finished, then vote.", 409)
        try:  # no await before `voted` is set: two clicks cannot both get here
            append_vote(setup.votes, {
                "time": now_iso(), "prompt": record["prompt"], "settings": record["settings"],
                "model_a": record["models"]["A"], "model_b": record["models"]["B"],
                "reply_a": replies["A"], "reply_b": replies["B"], "choice": choice,
            })
        except VoteNotSavedError as problem:  # the battle stays open: the same vote can be sent again
            return error(str(problem), 507)
        record["voted"] = True
        return JSONResponse({"model_a": record["models"]["A"], "model_b": record["models"]["B"], "choice": choice})

    async def board(_request):
        try:
            return JSONResponse(leaderboard(read_votes(setup.votes), names))
        except GemmaMlxError as problem:
            return error(str(problem), 500)

    async def preferences(_request):
        rows = preference_rows(read_votes(setup.votes))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="preferences.jsonl"'})

    async def report(request: Request):
        if setup.run_dir is None:
            return PlainTextResponse("Not found", status_code=404)
        target = (setup.run_dir / request.path_params["path"]).resolve()
        if not target.is_relative_to(setup.run_dir) or not target.is_file() or target.suffix not in REPORT_SUFFIXES:
            return PlainTextResponse("Not found", status_code=404)  # nothing outside the run, whatever the path says
        return FileResponse(target, headers={"Content-Security-Policy": REPORT_POLICY})

    routes = [
        Route("/", page), Route("/static/{name}", asset), Route("/api/models", models),
        Route("/api/stream", stream), Route("/api/battle", battle, methods=["POST"]),
        Route("/api/battle/{battle_id}/stream", battle_stream), Route("/api/vote", vote, methods=["POST"]),
        Route("/api/leaderboard", board), Route("/api/preferences", preferences),
        Route("/reports/{path:path}", report),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Guard, allowed_hosts=allowed_hosts)],
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


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]", "localhost:8765" -> "localhost")."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def allowed_hosts_for(host: str, extra: Iterable[str] = ()) -> set[str]:
    """Host names the server answers to: the loopback names, the address it listens on and `extra`
    (--allow-host); listening beyond loopback (0.0.0.0, ::, a LAN address) adds this machine's own
    names and addresses, the ones another computer on the network would type. Never "any name":
    that would let any web site reach the server through a name it points at this machine."""
    names = LOCAL_HOSTS | {_as_host(host)} | {_as_host(name) for name in extra}
    if listens_on_network(host):
        names |= machine_hosts()
    return names - {"0.0.0.0", "[::]"}


def listens_on_network(host: str) -> bool:
    """Whether a server on `host` is reachable from other machines (it then warns, and knows more names)."""
    return host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def machine_hosts() -> set[str]:
    """This machine's names and the addresses of its interfaces that the standard library can find on
    every OS: its host name, fully qualified name and .local (mDNS) name, what they resolve to, and
    the addresses of the routes to the internet (IPv4 and IPv6; no packet is sent)."""
    import socket

    names = {socket.gethostname(), socket.getfqdn()}
    names |= {name.split(".")[0] + ".local" for name in list(names) if name and not name.startswith("localhost")}
    addresses: set[str] = set()
    for name in names:
        try:
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError):
            continue
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation nets
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # UDP: picks the route, sends nothing
                addresses.add(probe.getsockname()[0])
        except OSError:
            continue
    return {_as_host(name) for name in names | addresses if name}


def _as_host(name: str) -> str:
    """A name or address as a Host header carries it: lower case, an IPv6 address in brackets, no zone."""
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        return f"[{name.split('%')[0]}]"
    return name


def check_port_free(host: str, port: int) -> None:
    """A port another program holds is one paragraph, with the way out."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise GemmaMlxError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Another program (or another "
                            f"arena) may be using the port; pass --port with a free one, e.g. --port {port % 65535 + 1}.") from None


def serve_arena(setup: ArenaSetup, host: str = "127.0.0.1", port: int = 8765, progress: Progress = quiet,
                allow_hosts: Iterable[str] = ()) -> None:
    """Load every model, then serve the page until Ctrl-C (or SIGTERM), which stops it within seconds
    even while replies stream: the engine ends them, and uvicorn waits at most STOP_SECONDS for the rest."""
    import uvicorn

    from .serving.engine import Engine

    hosts = allowed_hosts_for(host, allow_hosts)
    if listens_on_network(host):
        progress(f"warning: the arena listens on {host}: anyone who can reach this machine on port {port} can use "
                 "the models and add votes. Use it only on a network you trust.")
        progress(f"arena: answers to {', '.join(sorted(hosts))}; add another name with --allow-host NAME")
    check_port_free(host, port)  # before minutes of model loading, not after
    engine = Engine(setup.models, progress)
    try:
        app = make_app(setup, engine, hosts, on_signal=engine.stop)
        shown = f"[{host}]" if ":" in host else host
        progress(f"arena: {len(setup.models)} models, votes in {setup.votes}; open http://{shown}:{port}/ (Ctrl-C stops)")
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=STOP_SECONDS)
    except KeyboardInterrupt:  # uvicorn passes the signal on once it has stopped
        pass
    finally:
        engine.close()
    from .serving.ratings import read_votes

    progress(f"arena: stopped; {len(read_votes(setup.votes))} votes in {setup.votes}")


def export_preferences(votes: Path, out: Path, force: bool = False) -> int:
    """Write the decided votes as {"prompt", "chosen", "rejected"} JSONL; returns how many.

    The file is written whole or not at all (a temp file renamed into place). An existing file is
    replaced only with `force`, and the votes file never, since that would lose every vote.
    """
    from .serving.ratings import preference_rows, read_votes

    out = Path(out)
    check_export_target(Path(votes), out, force)
    rows = preference_rows(read_votes(votes))
    try:
        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    except OSError as error:
        raise write_error(out, error) from None
    return len(rows)


def check_export_target(votes: Path, out: Path, force: bool) -> None:
    """Refuse a preferences file that would replace the votes, a directory, or (without force) any file."""
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; --export-preferences takes the name of the file to write, "
                                f"e.g. {out / 'preferences.jsonl'}.")
    if _same_file(out, votes):
        raise OutputExistsError(f"{out} is the votes file ({votes}); writing the preferences there would replace every "
                                "vote, so it is refused, even with --force. Name another file.")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists. Add --force to replace it, or name another file.")


def _same_file(one: Path, other: Path) -> bool:
    """The same file, however it is named (a relative path, a symlink or a hard link)."""
    if one.exists() and other.exists():
        return one.samefile(other)
    return one.expanduser().resolve() == other.expanduser().resolve()
