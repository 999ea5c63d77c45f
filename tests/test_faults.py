"""Faults that used to lose data (issue 20): each case fails without its fix.

1. --export-preferences never replaces the votes file, nor any file without --force.
2. A vote that cannot be written leaves its battle open, the file whole, and a cut-off last line
   is moved aside at the next start.
3. One writer per output: a second process is refused with the holder's pid.
4. Damaged safetensors are never resumed from or published.
5. An output that a kill left renamed aside is recovered, not deleted.
"""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli

from .test_train import write_chat_data

VOTE = {"prompt": "p", "model_a": "x", "model_b": "y", "choice": "A",
        "reply_a": {"text": "yes"}, "reply_b": {"text": "no"}}


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def vote_lines(count: int) -> str:
    return "".join(json.dumps({**VOTE, "n": n}) + "\n" for n in range(count))


def dead_pid() -> int:
    """The pid of a process that has exited (what a kill leaves in temp-dir names)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("faults-data") / "chat.jsonl", count=24)


# --- 1. exporting preferences -------------------------------------------------------------------


def test_export_never_replaces_the_votes_file_and_needs_force_for_any_other(converted_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes.write_text(vote_lines(3))
    arena = ["arena", converted_models["pt"], "--votes", votes, "--export-preferences"]
    for extra in ([], ["--force"]):
        result = run_cli(*arena, votes, *extra)
        assert result.exit_code == 1 and "is the votes file" in result.output, result.output
        assert votes.read_text() == vote_lines(3)
    relative = Path(os.path.relpath(votes))  # the same file by another name
    assert run_cli(*arena, relative, "--force").exit_code == 1 and votes.read_text() == vote_lines(3)

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = run_cli(*arena, notes)
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert notes.read_text() == "mine"
    result = run_cli(*arena, notes, "--force")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["chosen"] for line in notes.read_text().splitlines()] == ["yes"] * 3
    assert not list(tmp_path.glob(".notes.txt.tmp-*"))  # written through a temp file, none left over

    result = run_cli(*arena, tmp_path)
    assert result.exit_code == 1 and "is a directory" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error: ")]) == 1


# --- 2. votes that cannot be written --------------------------------------------------------------


class InstantEngine:
    """Answers every request at once with one short reply: enough to hold battles without a model."""

    def submit(self, model, messages, settings, on_event):
        on_event("text", "Hello there.")
        on_event("done", SimpleNamespace(text="Hello there.", tokens=3, finish_reason="stop", stop_token=106,
                                         seconds=0.01))


def arena_client(votes: Path):
    from starlette.testclient import TestClient

    from gemma_mlx.arena import ArenaSetup, make_app

    setup = ArenaSetup(models={"x": "x", "y": "y"}, votes=votes)
    return TestClient(make_app(setup, InstantEngine(), {"testserver"}))


def finished_battle(client) -> str:
    battle = client.post("/api/battle", json={"prompt": "Hi"}).json()["id"]
    for side in "AB":
        with client.stream("GET", f"/api/battle/{battle}/stream", params={"side": side}) as response:
            assert "event: done" in response.read().decode()
    return battle


def test_a_full_disk_keeps_the_battle_votable_and_the_file_whole(tmp_path, monkeypatch):
    from gemma_mlx.serving import ratings

    votes = tmp_path / "votes.jsonl"
    votes.write_text(vote_lines(1))
    client = arena_client(votes)
    battle = finished_battle(client)
    real_write, calls = os.write, []

    def half_then_full(descriptor, data):
        if descriptor != votes_descriptor(descriptor):
            return real_write(descriptor, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(descriptor, data[:len(data) // 2])  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    def votes_descriptor(descriptor):
        return descriptor if os.fstat(descriptor).st_ino == votes.stat().st_ino else None

    monkeypatch.setattr(ratings.os, "write", half_then_full)
    failed = client.post("/api/vote", json={"id": battle, "choice": "B"})
    assert failed.status_code == 507 and failed.json()["error"].startswith("Disk full")
    assert "still open" in failed.json()["error"]
    assert votes.read_text() == vote_lines(1)  # the half line was cut back off
    monkeypatch.setattr(ratings.os, "write", real_write)
    again = client.post("/api/vote", json={"id": battle, "choice": "B"})
    assert again.status_code == 200, again.text
    assert [v["choice"] for v in ratings.read_votes(votes)] == ["A", "B"]
    assert client.post("/api/vote", json={"id": battle, "choice": "A"}).status_code == 409  # still one vote a battle


def test_a_votes_directory_is_refused_at_start_and_keeps_a_battle_open_when_served(converted_models, tmp_path,
                                                                                    monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)  # never serve for real here
    monkeypatch.setattr("gemma_mlx.arena.check_port_free", lambda host, port: None)
    folder = tmp_path / "votes"
    folder.mkdir()
    result = run_cli("arena", converted_models["pt"], "--votes", folder)
    assert result.exit_code == 1 and "is a directory" in result.output and "--votes" in result.output

    client = arena_client(folder)  # a directory that appeared while serving
    battle = finished_battle(client)
    failed = client.post("/api/vote", json={"id": battle, "choice": "A"})
    assert failed.status_code == 507 and "is a directory" in failed.json()["error"]
    folder.rmdir()
    assert client.post("/api/vote", json={"id": battle, "choice": "A"}).status_code == 200


def test_the_page_clears_a_failed_vote_message_when_the_retry_works():
    from gemma_mlx.arena import PAGE_DIR

    script = (PAGE_DIR / "arena.js").read_text()
    vote = script[script.index("async function vote"):script.index("function cell")]
    assert "showError(\"\")" in vote and "setVoting(true)" in vote  # the error shown, the buttons back


def test_a_cut_off_last_vote_is_moved_aside_at_start(converted_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    cut = json.dumps({**VOTE, "n": 9})[:30].encode() + "é".encode()[:1]  # cut mid-line, mid-character
    votes.write_bytes(vote_lines(2).encode() + cut)
    out = tmp_path / "prefs.jsonl"
    result = run_cli("arena", converted_models["pt"], "--votes", votes, "--export-preferences", out)
    assert result.exit_code == 0, result.output
    assert "last line was cut off" in result.output and "kept the 2 whole vote(s)" in result.output
    aside = list(tmp_path.glob("votes.jsonl.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == cut and str(aside[0]) in result.output
    assert votes.read_text() == vote_lines(2) and len(out.read_text().splitlines()) == 2

    # a whole vote missing only its line end is kept, and the next vote does not glue onto it
    from gemma_mlx.serving.ratings import append_vote, read_votes, recover_votes

    votes.write_text(vote_lines(2).rstrip("\n"))
    assert recover_votes(votes) is None
    append_vote(votes, VOTE)
    assert len(read_votes(votes)) == 3

    # damage that is not a cut-off write is left for read_votes to report, the file untouched
    votes.write_text("not json\n" + vote_lines(1) + "{half")
    assert recover_votes(votes) is None and votes.read_text().endswith("{half")

    # a file that is not votes at all (a binary, a text) is not "recovered" into an empty one
    for other in (Path("/bin/ls").read_bytes()[:100], b"my shopping list"):
        votes.write_bytes(other)
        assert recover_votes(votes) is None and votes.read_bytes() == other
        result = run_cli("arena", converted_models["pt"], "--votes", votes, "--export-preferences", out, "--force")
        assert result.exit_code == 1 and votes.read_bytes() == other, result.output


def test_export_never_replaces_the_saved_conversations_and_a_votes_file_under_a_file_is_refused(converted_models,
                                                                                               tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes.write_text(vote_lines(2))
    saved = tmp_path / "conversations.jsonl"
    record = '{"id": "a1", "sides": {"m": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}}\n'
    saved.write_text(record)
    result = run_cli("arena", converted_models["pt"], "--votes", votes, "--export-preferences", saved, "--force")
    assert result.exit_code == 1 and "saved conversations" in result.output
    assert saved.read_text() == record
    from gemma_mlx.arena import check_votes_file
    from gemma_mlx.errors import GemmaMlxError

    with pytest.raises(GemmaMlxError, match="which is a file"):
        check_votes_file(votes / "inside" / "v.jsonl")


# --- 3. one writer per output ---------------------------------------------------------------------


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds the lock on `out`, as a running stage does."""
    code = ("import sys, time; from gemma_mlx.manifest import lock_output; lock_output(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_kill_frees_the_output(tiny_checkpoints, chat_data,
                                                                                   tmp_path):
    out = tmp_path / "m"
    holder = hold_lock(out)
    try:
        result = run_cli("convert", tiny_checkpoints["pt"], "--out", out)
        assert result.exit_code == 1, result.output
        assert f"is being written by another gemma-mlx process (pid {holder.pid})" in result.output
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("convert", tiny_checkpoints["pt"], "--out", out).exit_code == 0  # the kill released it
    assert not (tmp_path / ".m.lock").exists()  # and a finished stage leaves no lock file

    split = tmp_path / "split"
    holder = hold_lock(split)
    try:
        result = run_cli("data", "split", chat_data, "--out", split)
        assert result.exit_code == 1 and f"(pid {holder.pid})" in result.output
    finally:
        holder.kill()
        holder.wait()


def test_a_second_prefs_on_the_same_pairs_file_is_refused(tmp_path):
    """prefs samples for many minutes, then writes two files: a second run on the same --out is refused."""
    out = tmp_path / "pairs" / "prefs.jsonl"
    out.parent.mkdir()
    holder = hold_lock(out)
    try:
        result = run_cli("prefs", tmp_path / "any-model", "--out", out)
        assert result.exit_code == 1 and f"(pid {holder.pid})" in result.output, result.output
        assert list(out.parent.iterdir()) == [out.parent / ".prefs.jsonl.lock"]
    finally:
        holder.kill()
        holder.wait()


def _train_command(model, data, out, *extra):
    return [sys.executable, "-m", "gemma_mlx.cli", "train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--epochs", "50", "--num-layers", "1", "--rank", "2", "--val-generation-tokens", "0", *extra]


def test_two_trainings_on_one_output_do_not_share_the_partial_dir(converted_models, chat_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(_train_command(converted_models["it"], chat_data, out), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out.with_name("run.partial") / "metrics.jsonl").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first training never started"
            time.sleep(0.05)
        for extra in ([], ["--resume"], ["--force"]):
            second = run_cli("train", "--model", converted_models["it"], "--data", chat_data, "--out", out,
                             "--epochs", "50", "--num-layers", "1", "--rank", "2", "--val-generation-tokens", "0", *extra)
            assert second.exit_code == 1, second.output
            assert f"(pid {first.pid})" in second.output and "free some space" not in second.output
        assert first.poll() is None  # the first one trains on, undisturbed
    finally:
        first.kill()
        first.wait()


# --- 4. damaged safetensors -----------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])


def test_safetensors_checks_read_the_header_and_the_size(tmp_path):
    import mlx.core as mx

    from gemma_mlx.adapters import safetensors_problem, save_safetensors

    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": mx.ones((4, 4)), "b": mx.zeros((3,))})
    assert safetensors_problem(path) is None and not list(tmp_path.glob(".unfinished-*"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    assert "ends at byte" in safetensors_problem(path)
    path.write_bytes(whole[:20])
    assert "header says" in safetensors_problem(path)
    path.write_bytes(whole[:5])
    assert "fewer than the 8" in safetensors_problem(path)
    path.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    assert "not a JSON object" in safetensors_problem(path)


class StopAfterFirstValidation:
    """Ctrl-C right after the first validation saved the best adapters."""

    def on_step(self, report):
        pass

    def on_validation(self, record):
        raise KeyboardInterrupt


class CutTheBestAdapters:
    """A damaged best file at the end of training, as a kill mid-save would leave it."""

    def __init__(self, work: Path):
        self.work = work

    def on_step(self, report):
        pass

    def on_validation(self, record):
        truncate(self.work / "adapters.safetensors")


def _short_training(**changes):
    from gemma_mlx.config import LoraSettings, TrainSettings

    return {"lora": LoraSettings(num_layers=1, rank=2),
            "train": TrainSettings(**{"epochs": 2, "val_generation_tokens": 0, **changes})}


def test_resume_refuses_cut_off_best_adapters(converted_models, chat_data, tmp_path):
    from gemma_mlx.train import train_model

    out = tmp_path / "run"
    first = train_model(converted_models["it"], chat_data, out=out, callback=StopAfterFirstValidation(),
                        **_short_training())
    assert first.status == "interrupted"
    best = out.with_name("run.partial") / "adapters.safetensors"
    truncate(best)
    result = run_cli("train", "--model", converted_models["it"], "--data", chat_data, "--out", out, "--epochs", "2",
                     "--num-layers", "1", "--rank", "2", "--val-generation-tokens", "0", "--resume")
    assert result.exit_code == 1, result.output
    assert f"{best} is damaged" in " ".join(result.output.split()) and "--force" in result.output
    assert not out.exists()


def test_a_damaged_best_file_is_never_published(converted_models, chat_data, tmp_path):
    from gemma_mlx.errors import DamagedFileError
    from gemma_mlx.train import train_model

    out = tmp_path / "run"
    work = out.with_name("run.partial")
    with pytest.raises(DamagedFileError, match=r"adapters.safetensors is damaged.*not published"):
        train_model(converted_models["it"], chat_data, out=out, callback=CutTheBestAdapters(work),
                    **_short_training(epochs=1))
    assert not out.exists() and work.is_dir()


# --- 5. an output renamed aside by a kill ---------------------------------------------------------


def test_an_output_a_kill_left_renamed_aside_is_recovered(converted_models, chat_data, tmp_path):
    from gemma_mlx.train import train_model

    out = tmp_path / "run"
    train_model(converted_models["it"], chat_data, out=out, **_short_training(epochs=1))
    adapters = (out / "adapters.safetensors").read_bytes()
    pid = dead_pid()
    # killed between replace_dir's renames: the old output aside, the new one not yet in place
    os.replace(out, tmp_path / f".run.old-{pid}")
    (tmp_path / f".run.partial-{pid}").mkdir()
    lines = []
    again = train_model(converted_models["it"], chat_data, out=out, progress=lines.append, **_short_training(epochs=1))
    assert again.status == "up-to-date", lines
    assert any("recovered the earlier output" in line for line in lines)
    assert (out / "adapters.safetensors").read_bytes() == adapters
    assert not list(tmp_path.glob(".run.*-*"))  # both leftovers are gone

    # when the output is in place, a leftover old copy is only a leftover
    (tmp_path / f".run.old-{pid}").mkdir()
    assert train_model(converted_models["it"], chat_data, out=out, **_short_training(epochs=1)).status == "up-to-date"
    assert not (tmp_path / f".run.old-{pid}").exists()


def test_a_persona_with_bytes_that_are_not_utf8_is_one_paragraph(tmp_path):
    """A persona YAML with non-UTF-8 bytes names its file and line (state files: tests/test_state_files.py)."""
    from gemma_mlx.errors import DataError
    from gemma_mlx.persona import load_persona

    persona = tmp_path / "persona.yaml"
    persona.write_bytes(b"name: Bluey\nmarkers:\n  - Hooray \xff\n")
    with pytest.raises(DataError, match=r"persona.yaml:3: the file is not UTF-8"):
        load_persona(persona)


# --- a full disk while training saves -------------------------------------------------------------


def test_a_full_disk_during_a_validation_save_is_the_disk_full_paragraph(converted_models, chat_data, tmp_path,
                                                                          monkeypatch):
    """mlx raises a bare RuntimeError ("Unable to write 8 bytes") on a full disk; it must read as one."""
    import mlx.core as mx

    import gemma_mlx.adapters
    from gemma_mlx.errors import GemmaMlxError
    from gemma_mlx.train import train_model

    def full_disk(path, arrays, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 8)  # mlx leaves the start of the file behind
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    monkeypatch.setattr(gemma_mlx.adapters, "free_bytes", lambda directory: 4096, raising=False)
    out = tmp_path / "run"
    with pytest.raises(GemmaMlxError) as raised:
        train_model(converted_models["it"], chat_data, out=out, **_short_training(epochs=1))
    message = " ".join(str(raised.value).split())
    assert "No space left on device" in message and "free some space" in message, message
    assert not out.exists()
    assert not list(tmp_path.rglob(".unfinished-*"))  # the cut-off temp file is gone, never a real name


# --- a run that cannot fit stops before its first step ---------------------------------------------


def test_training_that_cannot_fit_stops_before_the_first_step_unless_told_not_to(converted_models, chat_data,
                                                                                 tmp_path, monkeypatch):
    import importlib.util

    from gemma_mlx.errors import TrainingError
    from gemma_mlx.train import train_model

    for name in ("gemma_mlx.backend", "gemma_mlx.training.loop", "gemma_mlx.training.sft"):  # a 1 MB machine
        module = importlib.import_module(name) if importlib.util.find_spec(name) else None
        if module is not None and hasattr(module, "machine_memory"):
            monkeypatch.setattr(module, "machine_memory", lambda: 1 << 20)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"stops before the first step.*--no-memory-check"):
        train_model(converted_models["it"], chat_data, out=out, **_short_training(epochs=1))
    assert not out.exists() and not out.with_name("run.partial").exists()  # no unfinished run left behind

    result = run_cli("train", "--model", converted_models["it"], "--data", chat_data, "--out", out, "--epochs", "1",
                     "--num-layers", "1", "--rank", "2", "--val-generation-tokens", "0", "--no-memory-check")
    assert result.exit_code == 0, result.output
    assert "warning: this run may need more memory" in result.output and (out / "adapters.safetensors").is_file()


def test_run_stops_on_its_memory_estimate_unless_told_not_to(monkeypatch):
    import gemma_mlx.backend

    monkeypatch.setattr(gemma_mlx.backend, "machine_memory", lambda: 1 << 20)
    result = run_cli("run", "--tiny", "--only", "convert")
    assert result.exit_code == 1 and "Not enough memory" in result.output and "--no-memory-check" in result.output
    result = run_cli("run", "--tiny", "--only", "convert", "--no-memory-check")
    assert result.exit_code == 0, result.output


def test_exporting_from_a_votes_file_that_is_not_there_says_so(converted_models, tmp_path):
    result = run_cli("arena", converted_models["pt"], "--votes", tmp_path / "votse.jsonl", "--export-preferences",
                     tmp_path / "p.jsonl")
    assert result.exit_code == 0 and "no votes file at" in result.output and "0 preference pairs" in result.output


def test_a_resumed_run_holds_the_lock_and_a_stale_unfinished_run_does_not_undo_a_finished_one(converted_models,
                                                                                             chat_data, tmp_path):
    """Resuming writes the same .partial as any run, so it takes the output's lock first (`run --redo` and a
    second `run` made one mixed output); and a finished output of the asked settings is not retrained
    because an unfinished run of other settings lies beside it."""
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.errors import OutputLockedError
    from gemma_mlx.train import train_model

    out = tmp_path / "pt"
    lora = LoraSettings(num_layers=2, rank=4)
    asked = TrainSettings(epochs=1, val_generation_tokens=0, calibrate_length=False)
    other = TrainSettings(epochs=1, val_generation_tokens=0, calibrate_length=False, learning_rate=2e-3)
    finished = train_model(converted_models["pt"], chat_data, out=out, lora=lora, train=asked)
    assert finished.status == "trained"
    stopped = train_model(converted_models["pt"], chat_data, out=out, lora=lora, train=other, force=True,
                          callback=StopAfterFirstValidation())
    assert stopped.status == "interrupted" and (tmp_path / "pt.partial" / "resume_state.json").is_file()
    lines = []
    again = train_model(converted_models["pt"], chat_data, out=out, lora=lora, train=asked, resume=True, force=True,
                        progress=lines.append)
    assert again.status == "up-to-date" and (tmp_path / "pt.partial").is_dir()
    assert any("unfinished run" in line and "stays" in line for line in lines)

    holder = hold_lock(out)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            train_model(converted_models["pt"], chat_data, out=out, lora=lora, train=other, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "pt.partial" / "resume_state.json").is_file()  # the other process's work, untouched
