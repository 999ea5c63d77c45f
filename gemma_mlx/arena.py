"""`gemma-mlx arena`: a local web page to chat with models side by side and to rate them blind.

Side by side: a conversation with every selected model at once, each in its own column with its
own history, streamed as it is written. Blind A/B: two models picked at random answer as "A" and
"B", for as many turns as the person likes; they vote (A, B, tie, both bad; keys 1-4) and only
then see the names and the replies' badges. Votes go to votes.jsonl (the run's, or --votes) and
become Bradley-Terry ratings with bootstrap intervals (serving/ratings.py); the decided ones export
as a preference dataset. Conversations are saved to conversations.jsonl beside the votes and reopen
from the page. Every reply comes from the one generation engine with compare's turn format, stop
rules and flags, and requests to the same model share one continuously batched generator
(serving/engine.py).

This module checks what the arena will serve and runs the server; the web app is serving/app.py
(routes), serving/chats.py (conversations), serving/streams.py (replies to the page) and
serving/guard.py (which requests are answered).

Safety: the server binds to 127.0.0.1 unless told otherwise; requests whose Host header is not one
of this machine's names (or an --allow-host) are refused (DNS rebinding), on 0.0.0.0 too; requests
from other web pages (an Origin not this page's, Sec-Fetch-Site cross-site) are refused before they
start a reply; model text reaches the page only as text, never as HTML; files are served only from
the run's directory; a vote must name a battle this server ran. A reply has one reader at a time
(a second gets 409), and no thread waits on a reply, so Ctrl-C always stops the server.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import SHIPPED_DATA, GenerationSettings, apply_overrides
from .errors import GemmaMlxError, OutputExistsError
from .text import plural
from .manifest import Progress, outputs_root, quiet, read_manifest, write_error, write_text_atomic
from .serving.app import PAGE_DIR, make_app, parse_settings  # noqa: F401  (the arena's public API)
from .serving.guard import allowed_hosts_for, check_port_free, host_name, listens_on_network  # noqa: F401

STOP_SECONDS = 2  # after Ctrl-C, how long responses still open may take before they are cut
CONVERSATIONS = "conversations.jsonl"  # saved beside the votes file


@dataclass
class ArenaSetup:
    """What an arena serves: the models (display name -> spec), prompts, the votes and conversations files
    and the reports."""

    models: dict[str, str]
    votes: Path
    run_dir: Path | None = None
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)  # paths under run_dir
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # the run's, else compare's defaults
    conversations: Path | None = None  # default: conversations.jsonl beside the votes
    best_of: int = 1  # every reply the best of this many samples (serving/best_of.py)
    on_topic_model: str | None = None  # a base model that scores each reply's on-topic badge (check_on_topic_model)

    def __post_init__(self):
        if self.conversations is None:
            self.conversations = Path(self.votes).with_name(CONVERSATIONS)


def _run_models(run_dir: Path, manifest: dict | None) -> dict[str, str]:
    """The fused models and their bases that `gemma-mlx run` recorded in its manifest."""
    if not manifest or manifest.get("stage") != "run":
        raise GemmaMlxError(
            f"{run_dir} is not an experiment run (no manifest.json written by `gemma-mlx run`). Give the directory "
            "`gemma-mlx run` made (outputs/runs/<name>), or name the models themselves."
        )
    from .models import display_name  # "<checkpoint> + LoRA", "<checkpoint> (base)": the names compare uses

    details = {s["stage"]: s.get("details", {}) for s in manifest.get("stages", [])}
    models = {}
    for name, path in (details.get("fuse", {}).get("fused") or {}).items():
        models[display_name(Path(_found(path, run_dir)))] = _found(path, run_dir)
    for name, path in (details.get("convert", {}).get("models") or {}).items():
        models[display_name(Path(_found(path, run_dir)))] = _found(path, run_dir)
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

    A votes or conversations file whose last line a crash cut off is repaired here (the line moved
    aside, reported through `progress`), so one interrupted write never stops the arena from starting.
    """
    from .models import display_name, model_dir_path, split_spec
    from .scoring.inputs import check_model_specs

    run_dir = Path(run).expanduser().resolve() if run else None
    models: dict[str, str] = {}
    manifest: dict = {}
    if run_dir is not None:
        if not run_dir.is_dir():
            what = "is a file, not a directory" if run_dir.exists() else "does not exist"
            raise GemmaMlxError(f"Run directory {run} {what}. Give the directory `gemma-mlx run` made "
                                "(outputs/runs/<name>).")
        manifest = read_manifest(run_dir) or {}
        models.update(_run_models(run_dir, manifest))
    for spec in specs:
        base, adapters = split_spec(spec)
        name = display_name(model_dir_path(base), Path(adapters) if adapters else None)
        models[name if name not in models else str(spec)] = str(spec)
    if not models:
        raise GemmaMlxError("No models for the arena. Name model directories, or pass --run outputs/runs/NAME.")
    check_model_specs(list(models.values()))
    config = manifest.get("config") or {}
    files = [Path(_found(p, run_dir)) for p in config.get("prompts") or []] or sorted((SHIPPED_DATA / "prompts").glob("*.txt"))
    reports = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("report.html")) if run_dir else []
    votes_file = Path(votes) if votes else (run_dir / "votes.jsonl" if run_dir else outputs_root() / "arena" / "votes.jsonl")
    check_votes_file(votes_file, progress)
    check_conversations_file(votes_file.with_name(CONVERSATIONS), progress)
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    recorded = {k: v for k, v in (config.get("generation") or {}).items() if k in known}
    settings = apply_overrides(GenerationSettings(), {**recorded, "samples": 1}, where=f"{run_dir}/manifest.json")
    return ArenaSetup(models, votes_file, run_dir, _prompt_sets(files), reports, settings)


def check_on_topic_model(spec: str) -> str:
    """The on-topic model checked before anything loads (a missing or incomplete model dir fails here, not
    at the first reply); the spec to load it with, in the engine thread, when the first turn is scored."""
    from .model_ref import resolve

    resolve(spec)
    return str(spec)


def check_votes_file(path: Path, progress: Progress = quiet) -> None:
    """Before serving: the votes file is a file, a cut-off last line is moved aside (and reported),
    and any other damage is an error naming its line, not a failure on the first vote."""
    from .serving.ratings import read_votes, recover_votes

    if path.is_dir():
        raise GemmaMlxError(f"The votes file {path} is a directory, so no vote could be saved. Pass --votes with a "
                            f"file name (e.g. {path / 'votes.jsonl'}).")
    above = next((parent for parent in path.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise GemmaMlxError(f"The votes file {path} would sit inside {above}, which is a file, so no vote could be "
                            "saved. Pass --votes with a file in a folder.")
    report = recover_votes(path)
    if report:
        progress(report)
    read_votes(path)


def check_conversations_file(path: Path, progress: Progress = quiet) -> None:
    """The saved conversations, checked like the votes: a cut-off last line moved aside, other damage an error."""
    from .serving.chats import read_conversations
    from .serving.ratings import recover_votes

    if path.is_dir():
        raise GemmaMlxError(f"{path} is a directory, so no conversation could be saved there. Move it away, or "
                            "pass --votes with a file in another directory (conversations are saved beside it).")
    report = recover_votes(path, kind="conversation")
    if report:
        progress(report)
    read_conversations(path)


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
        app = make_app(setup, engine, hosts, on_signal=engine.stop, progress=progress)
        shown = f"[{host}]" if ":" in host else host
        progress(f"arena: {len(setup.models)} models, votes in {setup.votes}; open http://{shown}:{port}/ (Ctrl-C stops)")
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=STOP_SECONDS)
    except KeyboardInterrupt:  # uvicorn passes the signal on once it has stopped
        pass
    finally:
        engine.close()
    from .serving.ratings import read_votes

    progress(f"arena: stopped; {plural(len(read_votes(setup.votes)), 'vote')} in {setup.votes}")


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
    if _same_file(out, votes.with_name(CONVERSATIONS)):
        raise OutputExistsError(f"{out} is the arena's saved conversations; writing the preferences there would replace "
                                "every one of them, so it is refused, even with --force. Name another file.")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists. Add --force to replace it, or name another file.")


def _same_file(one: Path, other: Path) -> bool:
    """The same file, however it is named (a relative path, a symlink or a hard link)."""
    if one.exists() and other.exists():
        return one.samefile(other)
    return one.expanduser().resolve() == other.expanduser().resolve()
