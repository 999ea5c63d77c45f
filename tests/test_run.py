"""`gemma-mlx run`: the whole pipeline on tiny checkpoints (`--tiny`), re-runs, resume, bad configs.

One finished `run --tiny` is made once per module and kept as a copy; every test that needs it
starts from a fresh restore of that copy, so each passes alone and in any order.
"""

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma_mlx import run as experiment
from gemma_mlx.cli import cli

REPORT_FILES = ("comparison.txt", "comparison.md", "comparison.json", "replies.jsonl", "report.html")


def run_cli(*args):
    result = CliRunner().invoke(cli, ["run", *args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    """(outputs dir, its pristine copy, the CLI result): `run --tiny` done once, at the default settings."""
    outputs = tmp_path_factory.mktemp("tiny-outputs") / "outputs"
    previous = os.environ.get("GEMMA_MLX_OUTPUTS")
    os.environ["GEMMA_MLX_OUTPUTS"] = str(outputs)
    try:
        result = run_cli("--tiny")
    finally:
        os.environ.pop("GEMMA_MLX_OUTPUTS") if previous is None else os.environ.update(GEMMA_MLX_OUTPUTS=previous)
    assert result.exit_code == 0, result.output
    pristine = tmp_path_factory.mktemp("tiny-pristine") / "outputs"
    shutil.copytree(outputs, pristine, symlinks=True)  # copy2 keeps times: the copy is the same run
    return outputs, pristine, result


@pytest.fixture
def in_demo_outputs(finished_tiny_run, monkeypatch):
    """The outputs dir holding the finished default run, as it was right after it finished."""
    outputs, pristine, _ = finished_tiny_run
    shutil.rmtree(outputs)
    shutil.copytree(pristine, outputs, symlinks=True)
    monkeypatch.setenv("GEMMA_MLX_OUTPUTS", str(outputs))
    return outputs


def stage_statuses(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {record["stage"]: record["status"] for record in manifest["stages"]}


@pytest.mark.pipeline
def test_demo_runs_every_stage_and_writes_everything(in_demo_outputs, finished_tiny_run):
    result = finished_tiny_run[2]
    run_dir = in_demo_outputs / "runs" / "tiny"
    # every stage but export, which runs only when the config asks for it (tests/test_export.py)
    assert stage_statuses(run_dir) == {s: "ran" for s in experiment.STAGES if s not in ("export", "preferences")}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for record in manifest["stages"]:
        assert record["seconds"] >= 0 and record["peak_memory_gb"] >= 0
    assert manifest["config"]["train"]["epochs"] == 2 and manifest["versions"]["mlx"]
    for name in ("tiny-gemma-3-pt", "tiny-gemma-3-it"):
        adapters = run_dir / name
        assert (adapters / "adapters.safetensors").is_file() and (adapters / "adapter_config.json").is_file()
        assert (adapters / "fused" / "model.safetensors").is_file()
        assert json.loads((adapters / "fused" / "config.json").read_text())["eos_token_id"] == [1, 106]
    # only the base model learns the turn-token rows; the instruction-tuned one has at most its calibrated
    # <end_of_turn> row (length calibration, when it shifted it)
    assert (run_dir / "tiny-gemma-3-pt" / "turn_tokens.safetensors").is_file()
    assert_only_the_calibrated_end_row(run_dir / "tiny-gemma-3-it", 106)
    for name in REPORT_FILES:
        assert (run_dir / "compare" / name).is_file()
    results = json.loads((run_dir / "compare" / "comparison.json").read_text())
    assert len(results["models"]) == 4  # two fused models and their two bases
    # the summary table and the report path end the output
    assert "tiny-gemma-3-pt + LoRA" in result.stdout and "tiny-gemma-3-it (base)" in result.stdout
    assert f"Report: {run_dir / 'compare' / 'report.html'}" in result.stdout


@pytest.mark.pipeline
def test_second_run_skips_every_stage(in_demo_outputs):
    run_dir = in_demo_outputs / "runs" / "tiny"
    weights = run_dir / "tiny-gemma-3-pt" / "adapters.safetensors"
    before = weights.stat().st_mtime_ns
    result = run_cli("--tiny")
    assert result.exit_code == 0, result.output
    assert stage_statuses(run_dir) == {s: "up-to-date" for s in experiment.STAGES if s not in ("export", "preferences")}
    assert weights.stat().st_mtime_ns == before


@pytest.mark.pipeline
def test_changed_training_setting_reruns_only_what_it_affects(in_demo_outputs):
    run_dir = in_demo_outputs / "runs" / "tiny"
    result = run_cli("--tiny", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert stage_statuses(run_dir) == {"convert": "up-to-date", "data": "up-to-date", "train": "ran", "fuse": "ran", "compare": "ran"}
    summary = json.loads((run_dir / "tiny-gemma-3-it" / "summary.json").read_text())
    assert summary["epochs"] == 1


@pytest.mark.pipeline
def test_only_compare_reuses_earlier_stages(in_demo_outputs):
    run_dir = in_demo_outputs / "runs" / "tiny"
    result = run_cli("--tiny", "--epochs", "1", "--only", "compare", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    statuses = stage_statuses(run_dir)
    assert statuses["compare"] == "ran" and statuses["train"] == "skipped"
    results = json.loads((run_dir / "compare" / "comparison.json").read_text())
    assert results["settings"]["max_tokens"] == 8


@pytest.mark.pipeline
def test_interrupted_training_resumes(in_demo_outputs, monkeypatch):
    from gemma_mlx.training.loop import TrainingCallback

    class StopAtStep5(TrainingCallback):
        def on_step(self, report):
            if report.step == 5:
                raise KeyboardInterrupt

    real_train = experiment.train.train_model
    monkeypatch.setattr(experiment.train, "train_model", functools.partial(real_train, callback=StopAtStep5()))
    result = run_cli("--tiny", "--name", "resumed", "--epochs", "1")
    assert result.exit_code == 130
    assert "Run the same command again to resume" in result.output and "plus --resume" not in result.output
    run_dir = in_demo_outputs / "runs" / "resumed"
    assert stage_statuses(run_dir)["train"] == "interrupted"
    assert not (run_dir / "compare").exists()

    monkeypatch.setattr(experiment.train, "train_model", real_train)
    resumed = run_cli("--tiny", "--name", "resumed", "--epochs", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "resum" in resumed.output.lower()
    assert stage_statuses(run_dir)["train"] == "ran"
    summary = json.loads((run_dir / "tiny-gemma-3-pt" / "summary.json").read_text())
    assert summary["examples_seen"] == summary["train_examples"]  # one full epoch, no example lost or repeated
    for name in REPORT_FILES:
        assert (run_dir / "compare" / name).is_file()


def test_bad_config_names_the_key_and_line(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("name: x\ntrain:\n  epochs: 2\n  learning_rat: 0.1\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert f"{config}:4" in result.output and "learning_rat" in result.output and "learning_rate" in result.output

    config.write_text("name: x\ntrain:\n  epochs: lots\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert f"{config}:3" in result.output and "'train.epochs' must be int" in result.output


def test_unreachable_checkpoint_fails_before_any_work(tmp_path, isolated_outputs):
    config = tmp_path / "exp.yaml"
    config.write_text("name: offline\ncheckpoints: [not-a-model]\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert "Unknown checkpoint 'not-a-model'" in result.output
    assert not (isolated_outputs / "runs" / "offline").exists()


def test_invalid_data_fails_before_any_work(tmp_path, isolated_outputs):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: baddata\ndata: {data}\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert f"{data}:1" in result.output
    assert not (isolated_outputs / "runs" / "baddata").exists()


def test_shipped_config_is_the_default_and_loads():
    config = experiment.load_experiment(None)
    assert config.checkpoints == ["gemma-3-1b-pt", "gemma-3-1b-it"]
    assert Path(config.data).is_dir() and Path(config.persona).is_file()
    assert all(Path(p).is_file() for p in config.prompts)


def test_offline_checkpoint_fails_before_any_work(tmp_path, isolated_outputs, monkeypatch):
    """The second checkpoint is not cached: nothing is converted for the first one either."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from gemma_mlx.tiny import write_tiny_checkpoint

    local = write_tiny_checkpoint(tmp_path / "local-pt", "pt")
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: unreachable\ncheckpoints: [{local}, gemma-3-1b-it]\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert "no directory google/gemma-3-1b-it here" in result.output and "not in the local Hugging Face cache" in result.output
    assert not (isolated_outputs / "runs" / "unreachable").exists()


def test_not_enough_disk_is_said_before_any_work(tmp_path, isolated_outputs, monkeypatch):
    import shutil

    from gemma_mlx.tiny import write_tiny_checkpoint

    local = write_tiny_checkpoint(tmp_path / "local-pt", "pt")
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: nodisk\ncheckpoints: [{local}]\nlora:\n  num_layers: -1\n")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert "Not enough disk space" in result.output and "GB is free" in result.output
    assert not (isolated_outputs / "runs" / "nodisk").exists()


@pytest.mark.pipeline
def test_deleted_adapters_are_trained_again_not_trusted(in_demo_outputs):
    run_dir = in_demo_outputs / "runs" / "tiny"
    (run_dir / "tiny-gemma-3-pt" / "adapters.safetensors").unlink()
    result = run_cli("--tiny")
    assert result.exit_code == 0, result.output
    assert "missing or cut short (adapters.safetensors" in result.output
    assert (run_dir / "tiny-gemma-3-pt" / "adapters.safetensors").is_file()
    assert stage_statuses(run_dir)["train"] == "ran"


@pytest.mark.pipeline
def test_redo_makes_an_up_to_date_stage_again(in_demo_outputs):
    run_dir = in_demo_outputs / "runs" / "tiny"
    fused = run_dir / "tiny-gemma-3-it" / "fused" / "model.safetensors"
    before = fused.stat().st_mtime_ns
    result = run_cli("--tiny", "--redo", "fuse")
    assert result.exit_code == 0, result.output
    statuses = stage_statuses(run_dir)
    assert statuses["fuse"] == "ran" and statuses["train"] == "up-to-date"
    assert fused.stat().st_mtime_ns != before


def test_only_convert_on_a_new_experiment_stops_there(isolated_outputs):
    result = run_cli("--tiny", "--name", "convert-only", "--only", "convert")
    assert result.exit_code == 0, result.output
    run_dir = isolated_outputs / "runs" / "convert-only"
    assert (run_dir / "models" / "tiny-gemma-3-pt" / "model.safetensors").is_file()
    assert not (run_dir / "data").exists() and "Report:" not in result.output


@pytest.mark.pipeline
def test_the_arena_serves_a_finished_run_its_models_and_only_its_files(in_demo_outputs):
    from starlette.testclient import TestClient

    from gemma_mlx.arena import allowed_hosts_for, arena_setup, make_app

    run_dir = in_demo_outputs / "runs" / "tiny"
    setup = arena_setup([], run=run_dir)
    assert sorted(setup.models) == ["tiny-gemma-3-it (base)", "tiny-gemma-3-it + LoRA",
                                    "tiny-gemma-3-pt (base)", "tiny-gemma-3-pt + LoRA"]
    assert all(Path(path).is_dir() for path in setup.models.values())
    assert setup.votes == run_dir.resolve() / "votes.jsonl" and setup.prompt_sets
    recorded = json.loads((run_dir / "manifest.json").read_text())["config"]["generation"]
    assert setup.settings.max_tokens == recorded["max_tokens"]  # the run's settings, as compare used them
    assert any(path.endswith("report.html") for path in setup.reports)
    (in_demo_outputs / "runs" / "secret.txt").write_text("not the run's")

    class NoEngine:  # the file routes never generate
        def submit(self, *args):
            raise AssertionError("no generation expected")

    client = TestClient(make_app(setup, NoEngine(), allowed_hosts_for("127.0.0.1")), base_url="http://127.0.0.1:8765")
    assert client.get("/api/models").json()["settings"]["max_tokens"] == recorded["max_tokens"]
    report = client.get(f"/reports/{setup.reports[0]}")
    assert report.status_code == 200 and "<html" in report.text.lower()
    assert "script-src" not in report.headers["content-security-policy"]  # a report runs no script ...
    assert "style-src 'unsafe-inline'" in report.headers["content-security-policy"]  # ... but keeps its styles
    for outside in ("../secret.txt", "..%2Fsecret.txt", "%2e%2e/secret.txt", "/etc/passwd"):
        assert client.get(f"/reports/{outside}").status_code == 404, outside
    folder = Path(setup.reports[0]).parent
    assert client.get(f"/reports/{folder / 'comparison.md'}").status_code == 200  # beside a report: fine
    (setup.run_dir / "conversations.jsonl").write_text('{"sides": {"A": {"model": "hidden"}}}\n')
    for private in ("manifest.json", "votes.jsonl", "conversations.jsonl", "data/train.jsonl", "a%00b.html"):
        assert client.get(f"/reports/{private}").status_code == 404, private  # a blind battle's models stay hidden


@pytest.mark.pipeline
def test_the_arena_refuses_a_directory_that_is_not_a_run(in_demo_outputs):
    result = CliRunner().invoke(cli, ["arena", "--run", str(in_demo_outputs / "runs")])
    assert result.exit_code == 1 and "is not an experiment run" in result.output
    assert "Traceback" not in result.output


def assert_only_the_calibrated_end_row(adapters, end_id: int) -> None:
    """An instruction-tuned run trains no turn rows: its turn_tokens file exists only when length calibration
    shifted the turn-end row, and then holds that row alone."""
    import mlx.core as mx

    shift = (json.loads((adapters / "summary.json").read_text()).get("length_calibration") or {}).get("shift", 0)
    rows = adapters / "turn_tokens.safetensors"
    if shift == 0:
        assert not rows.exists()
    else:
        assert mx.load(str(rows))["ids"].tolist() == [end_id]


def test_a_users_own_data_is_scored_with_its_own_persona_not_bluey(tmp_path):
    """A config that names no persona takes the persona.yaml beside its data, or none; never the shipped Bluey one."""
    shipped = experiment.load_experiment(None)
    data = tmp_path / "morag"
    data.mkdir()
    (data / "chats.jsonl").write_text(shipped_first_record())
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: morag\ndata: {data}\n")
    assert experiment.load_experiment(config).persona == ""
    (data / "persona.yaml").write_text("name: Morag\ndescription: a Scots ship's cook\nmarkers: [Och, lass]\n")
    assert experiment.load_experiment(config).persona == str(data / "persona.yaml")
    config.write_text(f"name: morag\ndata: {data}\npersona: {shipped.persona}\n")  # named in the file: kept
    assert experiment.load_experiment(config).persona == shipped.persona
    assert Path(shipped.persona).parent == Path(shipped.data)  # the default data keeps Bluey's spec


def test_an_empty_data_key_is_an_error_not_the_config_folder(tmp_path, isolated_outputs):
    (tmp_path / "notes.jsonl").write_text(shipped_first_record())  # would have become the training set
    config = tmp_path / "exp.yaml"
    config.write_text("name: empty\ndata:\n")
    result = run_cli(str(config))
    assert result.exit_code == 1
    assert f"{config}:2" in result.output and "data is empty" in result.output
    assert "Traceback" not in result.output
    assert not (isolated_outputs / "runs" / "empty").exists()


def shipped_first_record() -> str:
    shipped = Path(experiment.load_experiment(None).data)
    return next(p for p in sorted(shipped.glob("*.jsonl"))).read_text().splitlines()[0] + "\n"


def test_a_folder_or_a_dataset_given_as_the_config_says_so(tmp_path, isolated_outputs):
    result = run_cli(str(tmp_path))
    assert result.exit_code == 1 and f"{tmp_path} is a folder; give the experiment's YAML file" in result.output
    data = tmp_path / "morag.jsonl"
    data.write_text(shipped_first_record())
    result = run_cli(str(data))
    assert result.exit_code == 1 and "looks like a dataset, not an experiment config" in result.output
    assert f"gemma-mlx train --data {data}" in result.output


def test_a_run_that_fails_midway_keeps_the_earlier_stages_usable(tmp_path):
    """A failed train leaves the finished adapters where they were; the run's manifest must not turn them into
    "not run", or `run --only compare` refuses what is there."""
    from gemma_mlx.run import StageRecord, _previous_details, _write_run_manifest

    config = experiment.load_experiment(None)
    earlier = {"convert": {"models": {"m": "/m"}}, "data": {"data_dir": "/d"}, "train": {"adapters": {"m": "/a"}},
               "fuse": {"fused": {"m": "/f"}}}
    _write_run_manifest(tmp_path, config, [StageRecord(k, "ran", 1.0, 0.1, v) for k, v in earlier.items()], {}, "t0")
    # this time convert and data were up to date, then train failed: no record for train or later stages
    now = [StageRecord("convert", "up-to-date", 0.1, 0.0, earlier["convert"]),
           StageRecord("data", "up-to-date", 0.1, 0.0, earlier["data"])]
    _write_run_manifest(tmp_path, config, now, _previous_details(tmp_path), "t1")
    assert _previous_details(tmp_path) == earlier


def test_the_arena_given_a_file_as_its_run_says_so(tmp_path):
    from gemma_mlx.arena import arena_setup
    from gemma_mlx.errors import GemmaMlxError

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    with pytest.raises(GemmaMlxError, match="is a file, not a directory"):
        arena_setup([], manifest, tmp_path / "votes.jsonl")


def test_a_skipped_stage_whose_settings_changed_is_named_with_the_change():
    from gemma_mlx.run import changed_settings

    before = {"train": {"epochs": 5, "learning_rate": 1e-4}, "lora": {"rank": 8}, "data": "/d", "checkpoints": ["a"]}
    now = {"train": {"epochs": 3, "learning_rate": 1e-4}, "lora": {"rank": 8}, "data": "/d", "checkpoints": ["a"]}
    assert changed_settings("train", before, now) == ["train.epochs: 5 -> 3"]
    assert changed_settings("data", before, now) == [] and changed_settings("convert", before, now) == []
    assert changed_settings("compare", before, now) == []  # compare always runs when asked; nothing to warn of
    assert changed_settings("train", {}, now) == []  # no earlier run: nothing to compare with
