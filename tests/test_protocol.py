"""The one stage-output protocol (manifest.py) and what survives a kill, for every command."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli

from .test_train import write_chat_data


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("protocol-data") / "chat.jsonl", count=24)


# --- outputs never replace inputs, --force or not -----------------------------------------------


def test_convert_never_replaces_its_source(tiny_checkpoints, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["pt"], source)
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.name for p in source.iterdir())
    for out in (source, tmp_path):
        result = run_cli("convert", source, "--out", out, "--force")
        assert result.exit_code == 1 and "refused even with --force" in result.output
    assert sorted(p.name for p in source.iterdir()) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_split_never_replaces_its_dataset(chat_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(chat_data, data / "chat.jsonl")
    for out in (data, tmp_path):
        result = run_cli("data", "split", data, "--out", out, "--force")
        assert result.exit_code == 1 and "the dataset it splits" in result.output
    assert (data / "chat.jsonl").read_bytes() == Path(chat_data).read_bytes()


def test_compare_never_replaces_a_model_or_prompt_file(converted_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(converted_models["pt"], model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    for out in (model, tmp_path):
        result = run_cli("compare", model, "--prompts", prompts, "--out", out, "--force", "--max-tokens", "2")
        assert result.exit_code == 1 and "refused even with --force" in result.output
    assert (model / "model.safetensors").is_file() and prompts.read_text() == "Hi\n"


def test_force_never_replaces_a_directory_the_stage_did_not_write(tiny_checkpoints, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = run_cli("convert", tiny_checkpoints["pt"], "--out", mine, "--force")
    assert result.exit_code == 1 and "did not write" in result.output
    assert (mine / "thesis.tex").read_text() == "years of work"


# --- up to date means the recorded files are still there ---------------------------------------


def test_a_damaged_output_is_made_again(tiny_checkpoints, tmp_path):
    out = tmp_path / "m"
    assert run_cli("convert", tiny_checkpoints["pt"], "--out", out).exit_code == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    again = run_cli("convert", tiny_checkpoints["pt"], "--out", out)
    assert again.exit_code == 0 and "missing or cut short" in again.output and "converted" in again.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"] == weights.stat().st_size > 100


# --- what survives a kill ----------------------------------------------------------------------


def test_temp_dirs_of_a_killed_convert_are_cleaned_up(tiny_checkpoints, tmp_path):
    out = tmp_path / "m"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".m.partial-{dead.pid}"
    (leftover / "mlx").mkdir(parents=True)
    (leftover / "mlx" / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".m.partial-{os.getpid()}-not-a-pid"
    alive.mkdir()
    assert run_cli("convert", tiny_checkpoints["pt"], "--out", out).exit_code == 0
    assert not leftover.exists() and alive.exists()


def _train_command(model, data, out, *extra):
    return [sys.executable, "-m", "gemma_mlx.cli", "train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--epochs", "3", "--num-layers", "2", "--rank", "4", "--lr", "1e-3", "--val-every-steps", "2",
            "--val-generation-tokens", "4", *extra]


def _wait_for(path: Path, process, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _env():
    return {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.pipeline
def test_sigkill_during_training_loses_at_most_one_validation(converted_models, chat_data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_train_command(converted_models["it"], chat_data, out), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out.with_name("run.partial") / "resume_state.json", process)
    process.kill()
    process.wait()
    state = json.loads((out.with_name("run.partial") / "resume_state.json").read_text())
    assert state["position"]["step"] >= 2
    # the same command again keeps the saved adapters and says how to go on
    again = subprocess.run(_train_command(converted_models["it"], chat_data, out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run(_train_command(converted_models["it"], chat_data, out, "--resume"), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 * summary["steps_per_epoch"]


@pytest.mark.pipeline
def test_sigterm_saves_like_ctrl_c(converted_models, chat_data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_train_command(converted_models["it"], chat_data, out), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out.with_name("run.partial") / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert (out.with_name("run.partial") / "resume_state.json").is_file()


def test_damaged_resume_state_is_one_paragraph(converted_models, chat_data, tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "resume_state.json").write_text('{"identity": ')
    result = run_cli("train", "--model", converted_models["it"], "--data", chat_data, "--out", tmp_path / "run", "--resume")
    assert result.exit_code == 1 and "is damaged" in result.output and "--force" in result.output
    assert (work / "resume_state.json").is_file()


# --- damaged weights: one paragraph in every command that loads them ---------------------------


@pytest.fixture(scope="module")
def trained(converted_models, chat_data, tmp_path_factory):
    """A short -pt run (adapters + turn rows) to damage copies of."""
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model

    out = tmp_path_factory.mktemp("protocol-runs") / "pt"
    train_model(converted_models["pt"], chat_data, out=out, lora=LoraSettings(num_layers=2, rank=4),
                train=TrainSettings(epochs=1, val_generation_tokens=0))
    return out


def _truncated_copy(source: Path, target: Path, name: str = "model.safetensors") -> Path:
    shutil.copytree(source, target)
    weights = target / name
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def test_truncated_weights_are_one_paragraph_everywhere(tiny_checkpoints, converted_models, trained, chat_data, tmp_path):
    source = _truncated_copy(tiny_checkpoints["pt"], tmp_path / "hf")
    model = _truncated_copy(converted_models["pt"], tmp_path / "mlx")
    adapters = _truncated_copy(trained, tmp_path / "adapters", "adapters.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    commands = [
        ["convert", source, "--out", tmp_path / "c"],
        ["train", "--model", model, "--data", chat_data, "--out", tmp_path / "t", "--epochs", "1"],
        ["fuse", adapters, "--out", tmp_path / "f"],
        ["fuse", trained, "--base", model, "--out", tmp_path / "f2"],
        ["compare", model, "--prompts", prompts, "--out", tmp_path / "r"],
        ["compare", f"{converted_models['pt']}::{adapters}", "--prompts", prompts, "--out", tmp_path / "r2"],
        ["chat", model],
    ]
    for command in commands:
        result = CliRunner().invoke(cli, [str(a) for a in command], input="Hi\n/quit\n")
        assert result.exit_code == 1, (command, result.output)
        assert "Traceback" not in result.output, (command, result.output)
        error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(error) == 1 and "cut short" in error[0], (command, result.output)  # one paragraph, with the fix


def test_adapters_of_another_checkpoint_are_refused_by_compare_and_chat(converted_models, trained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    other = f"{converted_models['it']}::{trained}"  # same shape, other checkpoint
    for command in (["compare", other, "--prompts", prompts, "--out", tmp_path / "r"], ["chat", other]):
        result = CliRunner().invoke(cli, [str(a) for a in command], input="Hi\n/quit\n")
        assert result.exit_code == 1 and "converted from a different checkpoint" in result.output, result.output


# --- found too late, or not at all --------------------------------------------------------------


def test_quantization_group_size_is_checked(tiny_checkpoints, tmp_path):
    for size in ("7", "0"):
        result = run_cli("convert", tiny_checkpoints["it"], "-q", "4", "--group-size", size, "--out", tmp_path / size)
        assert result.exit_code == 1 and f"--group-size is {size}" in result.output and "32, 64, 128" in result.output
        assert not (tmp_path / size).exists()


def test_max_tokens_beyond_the_context_is_refused_before_generating(converted_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    result = run_cli("compare", converted_models["pt"], "--prompts", prompts, "--max-tokens", "100000", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "can read (32768 tokens)" in result.output and "Lower max_tokens" in result.output


def test_data_mistakes_found_before_writing(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hooray!"}]}\n')
    result = run_cli("data", "split", one, "--out", tmp_path / "split")
    assert result.exit_code == 1 and "too few to give the valid and test set(s)" in result.output
    assert not (tmp_path / "split").exists()
    result = run_cli("data", "check", one, "--max-seq-length", "-5")
    assert result.exit_code == 1 and "--max-seq-length is -5" in result.output
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,completion\nHi,Hooray!\n")
    result = run_cli("data", "check", csv)
    assert result.exit_code == 1 and "CSV file, which is not supported" in result.output
    assert result.output.count("not valid JSON") == 0


def test_a_path_like_name_says_no_such_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("convert", "m/doesnotexist", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "There is no directory m/doesnotexist here" in result.output


def test_train_splits_a_file_like_data_split_does(converted_models, chat_data, tmp_path):
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model

    assert run_cli("data", "split", chat_data, "--out", tmp_path / "split").exit_code == 0
    counts = {name: len((tmp_path / "split" / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "valid")}
    result = train_model(converted_models["it"], chat_data, out=tmp_path / "run", lora=LoraSettings(num_layers=1, rank=2),
                         train=TrainSettings(epochs=1, val_generation_tokens=0))
    assert (result.summary["train_examples"], result.summary["valid_examples"]) == (counts["train"], counts["valid"])


# --- a full disk or a read-only directory: one paragraph, nothing half-written -------------------


def _disk_full(*_args, **_kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_split_compare_and_train(converted_models, chat_data, tmp_path, monkeypatch):
    import gemma_mlx.data as data_checks
    import gemma_mlx.scoring.report as report
    import gemma_mlx.training.loop as train_loop

    monkeypatch.setattr(data_checks, "_write_jsonl", _disk_full)
    result = run_cli("data", "split", chat_data, "--out", tmp_path / "split")
    assert result.exit_code == 1 and "the disk is full" in result.output
    assert not (tmp_path / "split").exists() and not list(tmp_path.glob(".split.partial-*"))

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    monkeypatch.setattr(report, "write_json", _disk_full)
    result = run_cli("compare", converted_models["pt"], "--prompts", prompts, "--out", tmp_path / "r", "--max-tokens", "2")
    assert result.exit_code == 1 and "the disk is full" in result.output and not (tmp_path / "r").exists()

    monkeypatch.setattr(train_loop, "write_adapter_dir", _disk_full)
    result = run_cli("train", "--model", converted_models["it"], "--data", chat_data, "--out", tmp_path / "t",
                     "--epochs", "1", "--num-layers", "1", "--val-generation-tokens", "0")
    assert result.exit_code == 1 and "No space left on device" in result.output and "free some space" in result.output


def test_read_only_outputs_are_one_paragraph(tiny_checkpoints, chat_data, tmp_path, monkeypatch):
    import errno

    config = tmp_path / "exp.yaml"
    config.write_text(f"name: ro\ncheckpoints: [{tiny_checkpoints['pt']}]\n")
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".") or self.name in ("runs", "split"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = run_cli("data", "split", chat_data, "--out", tmp_path / "split")
    assert result.exit_code == 1 and "read-only" in result.output
    monkeypatch.setenv("GEMMA_MLX_OUTPUTS", str(tmp_path / "ro-outputs"))
    result = run_cli("run", config)
    assert result.exit_code == 1 and "read-only" in result.output, result.output


def test_a_long_batch_reports_progress(converted_models, monkeypatch):
    import gemma_mlx.generate as generate
    from gemma_mlx.config import GenerationSettings

    monkeypatch.setattr(generate, "PROGRESS_SECONDS", 0.0)
    lines = []
    loaded = generate.load_model(converted_models["pt"])
    generate.generate_replies(loaded, ["Hi", "Tell me a story"], GenerationSettings(max_tokens=6, min_new_tokens=6),
                              progress=lines.append)
    assert any("tokens in" in line and "tokens/s" in line for line in lines)
