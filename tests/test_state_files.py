"""Files gemma-mlx writes and reads back, damaged every way (issue 20): one paragraph naming file and field.

Every kind the tool reads back (manifests, resume state, metrics, votes, adapter configs, model
configs) goes through its reader with bad bytes, bad JSON, the wrong JSON shape and a field of the
wrong type; then the cases the issue names go through the commands a user would run.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.errors import GemmaMlxError
from gemma_mlx.manifest import read_manifest, write_manifest

from .test_fuse import make_adapters

POSITION = {"epoch": 0, "step_in_epoch": 3, "step": 3, "trained_tokens": 90, "examples_seen": 12, "train_seconds": 1.5,
            "first_loss": 7.0, "last_loss": 6.0, "best_val_loss": None, "best_score": None, "best_epoch": None,
            "best_step": None, "last_val_loss": None, "last_val_end_p": None, "bad_validations": 0,
            "stopped_early": False, "validated_step": 0}


def _read_manifest(directory):
    return read_manifest(directory)


def _read_resume_state(directory):
    from gemma_mlx.train import read_resume_state

    return read_resume_state(SimpleNamespace(work=directory))


def _read_metrics(directory):
    from gemma_mlx.training.setup import read_metrics

    return read_metrics(directory)


def _read_votes(directory):
    from gemma_mlx.serving.ratings import read_votes

    return read_votes(directory / "votes.jsonl")


def _read_adapter_config(directory):
    from gemma_mlx.adapters import read_adapter_config

    (directory / "adapters.safetensors").write_bytes(b"")
    return read_adapter_config(directory)


def _read_model_config(directory):
    from gemma_mlx.models import resolve_model_dir

    (directory / "model.safetensors").write_bytes(b"")
    (directory / "tokenizer.json").write_text("{}")
    return resolve_model_dir(directory)


# name -> (file name, whole good content, its reader, a field set to the wrong type, JSONL?)
KINDS = {
    "manifest": ("manifest.json", {"stage": "fuse", "key_sha256": "ab", "files": {"model.safetensors": 10}},
                 _read_manifest, ("files", "x"), False),
    "resume state": ("resume_state.json", {"identity": {"model": "m"}, "position": POSITION},
                     _read_resume_state, ("position", {**POSITION, "step": "three"}), False),
    "metrics": ("metrics.jsonl", {"epoch": 0.5, "step": 2, "split": "train", "loss": 6.5},
                _read_metrics, ("step", "two"), True),
    "votes": ("votes.jsonl", {"prompt": "p", "model_a": "x", "model_b": "y", "choice": "A",
                              "reply_a": {"text": "yes"}, "reply_b": {"text": "no"}},
              _read_votes, ("choice", 1), True),
    "adapter config": ("adapter_config.json", {"fine_tune_type": "lora", "num_layers": 2,
                                               "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}},
                       _read_adapter_config, ("lora_parameters", {"rank": "eight", "scale": 2.0}), False),
    "model config": ("config.json", {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2,
                                     "intermediate_size": 128, "vocab_size": 262144},
                     _read_model_config, ("hidden_size", "sixty-four"), False),
}


def _write(directory: Path, kind: str, records: list) -> Path:
    """The file of `kind` in `directory`: JSONL kinds get a good first line, so damage sits on line 2."""
    name, good, _, _, jsonl = KINDS[kind]
    path = directory / name
    if jsonl:
        path.write_bytes(json.dumps(good).encode() + b"\n" + b"\n".join(records) + b"\n")
    else:
        path.write_bytes(records[0])
    return path


def _damage(kind: str, how: str) -> bytes:
    _, good, _, (field, wrong), jsonl = KINDS[kind]
    text = json.dumps(good, indent=None if jsonl else 2)
    if how == "bad bytes":
        return text.replace('"', '"\xff', 1).encode("latin-1")
    if how == "bad JSON":
        return text[: len(text) // 2].encode()
    if how == "wrong shape":
        return b'["a", "list"]'
    return json.dumps({**good, field: wrong}).encode()  # "wrong type"


@pytest.mark.parametrize("how", ["bad bytes", "bad JSON", "wrong shape", "wrong type"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_state_file_kind_damaged_every_way_is_one_paragraph_naming_it(kind, how, tmp_path):
    name, good, read, (field, _), jsonl = KINDS[kind]
    path = _write(tmp_path, kind, [json.dumps(good).encode()])
    assert read(tmp_path) is not None  # the good file reads
    path = _write(tmp_path, kind, [_damage(kind, how)])
    with pytest.raises(GemmaMlxError) as raised:
        read(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    where = f"{path}:2" if jsonl else str(path)
    assert message.startswith(where), message
    assert "damaged" in message
    expected = {"bad bytes": "not UTF-8", "bad JSON": "not valid JSON", "wrong shape": "JSON list, not an object",
                "wrong type": f"field {field}"}[how]
    assert expected in message, message


def test_the_saved_position_schema_matches_the_loops_position():
    """resume_state.json's schema and the dataclass the loop rebuilds from it cannot drift apart."""
    from dataclasses import fields

    from gemma_mlx.state import SavedPosition

    try:
        from gemma_mlx.training.checkpoint import Position
    except ImportError:
        from gemma_mlx.training.loop import Position
    assert set(SavedPosition.model_fields) == {f.name for f in fields(Position)} == set(POSITION)


@pytest.mark.parametrize("position, field", [({**POSITION, "step": -7}, "position.step"),
                                             ({**POSITION, "epoch": 1.5}, "position.epoch"),
                                             ({**POSITION, "surprise": 1}, "position.surprise"),
                                             ({k: v for k, v in POSITION.items() if k != "step"}, "position.step")])
def test_a_resume_state_out_of_range_or_of_another_shape_is_refused(position, field, tmp_path):
    (tmp_path / "resume_state.json").write_text(json.dumps({"identity": {}, "position": position}))
    with pytest.raises(GemmaMlxError, match=rf"field {field}.*--force"):
        _read_resume_state(tmp_path)


def test_a_manifest_of_the_wrong_shape_is_named_not_taken_for_no_record(tmp_path):
    for content, field in (([], "JSON list"), ({"stage": "fuse", "files": "x"}, "field files"),
                           ({"stage": "run", "stages": "x"}, "field stages"),
                           ({"stage": "run", "stages": [{"status": "ran"}]}, "field stages.0.stage"),
                           ({"files": {}}, "field stage is missing")):
        (tmp_path / "manifest.json").write_text(json.dumps(content))
        with pytest.raises(GemmaMlxError, match=field):
            read_manifest(tmp_path)


def test_what_the_tool_writes_reads_back_unchanged(tmp_path):
    manifest = {"stage": "train", "key": {"a": 1}, "files": {"x": 3}, "extra": [1, 2], "base_manifest": {"stage": "convert"}}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


# --- the cases the issue names, through the commands ---------------------------------------------


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def paragraph(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return " ".join(result.output[result.output.index("Error: "):].split())


@pytest.fixture
def copied_base(converted_models, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(converted_models["pt"], base)
    return base


def test_a_model_config_with_a_word_for_a_number_is_one_paragraph_in_every_command(copied_base, tmp_path):
    adapters = make_adapters(copied_base, tmp_path / "run" / "adapters")
    config = json.loads((copied_base / "config.json").read_text())
    (copied_base / "config.json").write_text(json.dumps({**config, "hidden_size": "sixty-four"}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    for args in (["compare", copied_base, "--prompts", prompts, "--out", tmp_path / "report"],
                 ["fuse", adapters, "--base", copied_base, "--out", tmp_path / "fused"],
                 ["chat", copied_base]):
        text = paragraph(run_cli(*args))
        assert f"{copied_base / 'config.json'}" in text and "field hidden_size is \"sixty-four\"" in text, text
    assert not (tmp_path / "fused").exists() and not (tmp_path / "report").exists()


def test_a_checkpoint_config_with_a_word_for_a_number_is_one_paragraph_in_convert(tiny_checkpoints, tmp_path):
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoints["pt"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    text = paragraph(run_cli("convert", checkpoint, "--out", tmp_path / "model"))
    assert f"{checkpoint / 'config.json'}" in text and 'field num_hidden_layers is "two"' in text, text
    assert not (tmp_path / "model").exists()


def test_an_adapter_config_with_a_word_for_the_rank_is_one_paragraph(converted_models, tmp_path):
    adapters = make_adapters(converted_models["pt"], tmp_path / "run" / "adapters")
    config = json.loads((adapters / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = "eight"
    (adapters / "adapter_config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    for args in (["fuse", adapters, "--out", tmp_path / "fused"],
                 ["compare", f"{converted_models['pt']}::{adapters}", "--prompts", prompts, "--out", tmp_path / "r"]):
        text = paragraph(run_cli(*args))
        assert "adapter_config.json" in text and "field lora_parameters.rank is \"eight\"" in text, text


def test_a_fuse_output_whose_manifest_lost_its_shape_is_named_and_kept(converted_models, tmp_path):
    adapters = make_adapters(converted_models["pt"], tmp_path / "run" / "adapters")
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for content, named in (("[]", "JSON list"), ('{"stage": "fuse", "files": "x"}', "field files")):
        (out / "manifest.json").write_text(content)
        for extra in ([], ["--force"]):
            text = paragraph(run_cli("fuse", adapters, "--out", out, *extra))
            assert f"{out / 'manifest.json'}" in text and named in text, text
            assert (out / "keep.txt").read_text() == "mine"


def test_a_run_manifest_with_stages_of_the_wrong_type_is_one_paragraph(converted_models, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text('{"stage": "run", "stages": "x"}')
    text = paragraph(run_cli("arena", "--run", run_dir, "--export-preferences", tmp_path / "prefs.jsonl"))
    assert "field stages is \"x\"" in text, text


def test_votes_with_bytes_that_are_not_utf8_are_named_by_line(converted_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    good = json.dumps(KINDS["votes"][1])
    content = (good + "\n" + good.replace("yes", "\xff") + "\n" + good + "\n").encode("latin-1")
    votes.write_bytes(content)  # the damaged line is not the last: nothing a crash could have cut off
    text = paragraph(run_cli("arena", converted_models["pt"], "--votes", votes, "--export-preferences",
                             tmp_path / "prefs.jsonl"))
    assert f"{votes}:2" in text and "not UTF-8" in text, text
    assert votes.read_bytes() == content and not (tmp_path / "prefs.jsonl").exists()


# --- one adapter rule for fuse, compare and chat; --export-hf checked before the fuse ----------------


def test_adapters_that_lost_their_turn_token_rows_are_refused_by_fuse_compare_and_chat(converted_models, tmp_path):
    adapters = make_adapters(converted_models["pt"], tmp_path / "run" / "adapters", turn_tokens=False)
    config = json.loads((adapters / "adapter_config.json").read_text())
    (adapters / "adapter_config.json").write_text(json.dumps({**config, "turn_tokens_file": "turn_tokens.safetensors"}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    spec = f"{converted_models['pt']}::{adapters}"
    for args in (["fuse", adapters, "--out", tmp_path / "fused"],
                 ["compare", spec, "--prompts", prompts, "--out", tmp_path / "report"],
                 ["chat", spec]):
        text = paragraph(run_cli(*args))
        assert "turn_tokens.safetensors is missing" in text, (args[0], text)
    assert not (tmp_path / "fused").exists()


def test_export_hf_onto_a_file_or_a_read_only_dir_is_refused_before_the_fuse(converted_models, tmp_path, monkeypatch):
    import os

    adapters = make_adapters(converted_models["pt"], tmp_path / "run" / "adapters")
    in_the_way = tmp_path / "hf.txt"
    in_the_way.write_text("mine")
    text = paragraph(run_cli("fuse", adapters, "--out", tmp_path / "fused", "--export-hf", in_the_way))
    assert f"--export-hf {in_the_way} is a file" in text, text
    assert in_the_way.read_text() == "mine" and not (tmp_path / "fused").exists()

    read_only = tmp_path / "locked"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != read_only and real_access(path, mode, **kw))
    text = paragraph(run_cli("fuse", adapters, "--out", tmp_path / "fused", "--export-hf", read_only / "hf"))
    assert f"--export-hf {read_only / 'hf'} cannot be written" in text, text
    assert not (tmp_path / "fused").exists()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    text = paragraph(run_cli("fuse", adapters, "--out", tmp_path / "fused", "--export-hf", other, "--force"))
    assert "an export did not write" in text and (other / "a.txt").read_text() == "mine"
    assert not (tmp_path / "fused").exists()


def test_a_damaged_comparison_is_made_again_not_trusted(converted_models, tmp_path):
    """comparison.json has its own schema (scoring/report.SCHEMA); damaged at its recorded size, it is redone."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    out = tmp_path / "report"
    compare = ["compare", converted_models["pt"], "--prompts", prompts, "--max-tokens", "4", "--out", out]
    assert run_cli(*compare).exit_code == 0
    good = (out / "comparison.json").read_bytes()
    for damaged in (b"\xff" + good[1:], b'{"models": "x"' + b" " * (len(good) - 15) + b"}"):
        assert len(damaged) == len(good)  # the same size: the manifest's size check alone cannot see it
        (out / "comparison.json").write_bytes(damaged)
        result = run_cli(*compare)
        assert result.exit_code == 0 and "nothing to do" not in result.output, result.output
        assert json.loads((out / "comparison.json").read_text())["models"][0]["replies"]


def test_a_resumed_run_drops_a_metrics_line_a_kill_cut_off_but_names_a_damaged_one(converted_models, tmp_path):
    from .test_faults import StopAfterFirstValidation, _short_training
    from .test_train import write_chat_data

    from gemma_mlx.train import train_model

    data = write_chat_data(tmp_path / "chat.jsonl", count=24)
    out = tmp_path / "run"
    metrics = out.with_name("run.partial") / "metrics.jsonl"
    first = train_model(converted_models["it"], data, out=out, callback=StopAfterFirstValidation(), **_short_training())
    assert first.status == "interrupted"
    whole = metrics.read_text()
    metrics.write_text(whole.replace('"split"', '"split": 7, "x"', 1))  # a damaged line in the middle
    with pytest.raises(GemmaMlxError, match=r"metrics.jsonl:1: .*field split is 7"):
        train_model(converted_models["it"], data, out=out, resume=True, **_short_training())
    metrics.write_text(whole + '{"epoch": 0.9, "step": 99, "spl')  # the line a kill cut off mid-append
    done = train_model(converted_models["it"], data, out=out, resume=True, **_short_training())
    assert done.status == "trained"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] != 99 for r in records) and records[-1]["split"] == "valid"
