"""`gemma-mlx arena`: a local web page to chat with models side by side and to rate them blind.

Side by side: one prompt, every selected model answers in its own column, streamed as it is
written. Blind A/B: two models picked at random answer as "A" and "B"; the person votes (A, B, tie,
both bad; keys 1-4) and only then sees the names. Votes go to votes.jsonl (the run's, or --votes)
and become Bradley-Terry ratings with bootstrap intervals (serving/ratings.py); the decided ones
export as a preference dataset. Every reply comes from the one generation engine with compare's
turn format, stop rules and flags, and requests to the same model share one continuously batched
generator (serving/engine.py).

Safety: the server binds to 127.0.0.1 unless told otherwise; requests whose Host header is not this
machine are refused (DNS rebinding); model text reaches the page only as text, never as HTML; files
are served only from the run's directory; a vote must name a battle this server ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import random
import secrets
import time
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
    """One reply on its way to the page: the engine thread feeds it, one SSE response drains it.

    A thread-safe queue, not an asyncio one: the reply may be read from another event loop than
    the one that asked for it (a battle is started by one request and read by two others).
    """

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.reply: dict | None = None

    def on_event(self, kind: str, payload) -> None:  # called from the engine thread
        self.queue.put((kind, payload))

    async def events(self):
        if self.reply is not None:  # read again (a reloaded page): the finished reply at once
            yield _sse("text", {"text": self.reply["text"]})
            yield _sse("done", self.reply)
            return
        while True:
            kind, payload = await asyncio.to_thread(self.queue.get)
            if kind == "text":
                yield _sse("text", {"text": payload})
            elif kind == "done":
                self.reply = reply_json(payload)
                yield _sse("done", self.reply)
                return
            else:
                yield _sse("error", {"message": payload})
                return


def make_app(setup: ArenaSetup, engine, allowed_hosts: set[str] | None = None):
    """The Starlette app: the page, its API and the run's reports."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from .serving.ratings import CHOICES, append_vote, leaderboard, preference_rows, read_votes

    battles: dict[str, dict] = {}
    names = list(setup.models)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def is_json(request) -> bool:
        """A JSON body needs a CORS preflight from another site, which this server never grants."""
        return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"

    class HostCheck(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            if allowed_hosts is not None and host_name(request.headers.get("host", "")) not in allowed_hosts:
                return PlainTextResponse("Forbidden: this arena answers only to its own host name.", status_code=403)
            origin = request.headers.get("origin")
            if allowed_hosts is not None and origin is not None and urlsplit(origin).hostname not in allowed_hosts:
                # another web site's script, which the browser lets send (not read) requests here
                return PlainTextResponse("Forbidden: requests from other web pages are refused.", status_code=403)
            response = await call_next(request)
            response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

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
        engine.submit(model, [{"role": "user", "content": prompt}], settings, reply.on_event)
        return StreamingResponse(reply.events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

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
        battles[battle_id] = {"prompt": prompt, "settings": to_dict(settings), "models": dict(zip("AB", pair)),
                              "sides": sides, "voted": False, "started": time.time()}
        for side, model in zip("AB", pair):
            engine.submit(model, [{"role": "user", "content": prompt}], settings, sides[side].on_event)
        return JSONResponse({"id": battle_id})

    async def battle_stream(request: Request):
        record = battles.get(request.path_params["battle_id"])
        side = request.query_params.get("side")
        if record is None or side not in ("A", "B"):
            return error("Unknown battle or side.", 404)
        return StreamingResponse(record["sides"][side].events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

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
    return Starlette(routes=routes, middleware=[Middleware(HostCheck)])


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]", "localhost:8765" -> "localhost")."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def allowed_hosts_for(host: str) -> set[str] | None:
    """Host headers the server accepts: this machine's names, plus the bound address; None = any."""
    if host in ("0.0.0.0", "::"):
        return None
    return LOCAL_HOSTS | {host}


def check_port_free(host: str, port: int) -> None:
    """A port another program holds is one paragraph, with the way out."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise GemmaMlxError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Another program (or another "
                            f"arena) may be using the port; pass --port with a free one, e.g. --port {port + 1}.") from None


def serve_arena(setup: ArenaSetup, host: str = "127.0.0.1", port: int = 8765, progress: Progress = quiet) -> None:
    """Load every model, then serve the page until Ctrl-C."""
    import uvicorn

    from .serving.engine import Engine

    if host not in ("127.0.0.1", "localhost", "::1"):
        progress(f"warning: the arena listens on {host}: anyone who can reach this machine on port {port} can use "
                 "the models and add votes. Use it only on a network you trust.")
    check_port_free(host, port)  # before minutes of model loading, not after
    engine = Engine(setup.models, progress)
    try:
        app = make_app(setup, engine, allowed_hosts_for(host))
        progress(f"arena: {len(setup.models)} models, votes in {setup.votes}; open http://{host}:{port}/ (Ctrl-C stops)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
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
