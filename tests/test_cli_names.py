"""mlx-lm's option names work as aliases where they mean the same (--model, --adapter-path, --temp,
--max-tokens, --system-prompt, --save-path), and `train --help` says what really happens."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli


@pytest.fixture
def calls(monkeypatch):
    """The library functions the commands call, replaced by recorders (these tests are about parsing)."""
    import gemma_mlx.chat
    import gemma_mlx.compare
    import gemma_mlx.fuse
    import gemma_mlx.train
    from tests.test_report import make_results

    seen = {}

    def record(name, result):
        def fake(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result
        return fake

    monkeypatch.setattr(gemma_mlx.chat, "run_chat", record("chat", None))
    monkeypatch.setattr(gemma_mlx.compare, "compare_models",
                        record("compare", SimpleNamespace(results=make_results(), out_dir=Path("r"))))
    monkeypatch.setattr(gemma_mlx.train, "train_with_config",
                        record("train", SimpleNamespace(status="trained", out_dir=Path("o"))))
    monkeypatch.setattr(gemma_mlx.fuse, "fuse_model",
                        record("fuse", SimpleNamespace(status="fused", out_dir=Path("f"), hf_dir=None)))
    return seen


def invoke(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_chat_takes_mlx_lms_names(calls):
    invoke("chat", "--model", "m", "--adapter-path", "ad", "--temp", "0.7", "--max-tokens", "12",
           "--system-prompt", "Be brief.")
    (model, adapters, settings), options = calls["chat"]
    assert model == "m" and adapters == Path("ad") and options["system"] == "Be brief."
    assert settings.temperature == 0.7 and settings.max_tokens == 12


def test_chat_needs_exactly_one_model(calls):
    for args, message in ((["chat"], "Name a model"), (["chat", "a", "--model", "b"], "One model at a time")):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and message in result.output and "chat" not in calls


def test_compare_takes_repeated_model_options(calls):
    result = invoke("compare", "a", "--model", "b", "--model", "c", "--prompt", "hi", "--temp", "0.5")
    (models, prompts), options = calls["compare"]
    assert models == ["a", "b", "c"] and prompts == ["hi"] and options["settings"].temperature == 0.5
    assert "Verdict: " in result.output
    assert CliRunner().invoke(cli, ["compare", "--prompt", "hi"]).exit_code == 2


def test_train_adapter_path_is_its_output(calls):
    invoke("train", "--model", "m", "--adapter-path", "adapters/here")
    assert calls["train"][1]["out"] == Path("adapters/here")


def test_fuse_model_and_save_path(calls):
    invoke("fuse", "runs/x/m", "--model", "models/base", "--save-path", "fused/here")
    (adapter_dir,), options = calls["fuse"]
    assert adapter_dir == Path("runs/x/m") and options["base"] == Path("models/base") and options["out"] == Path("fused/here")


def test_train_help_tells_the_truth_about_best_and_mlx_lm():
    text = " ".join(invoke("train", "--help").output.split())
    assert "by validation loss go to" not in text and "--adapter-path` works" not in text
    assert "most clean endings" in text and "--best-by loss" in text
    assert "does not load: its replies then do not stop" in text and "gemma-mlx fuse" in text


def test_display_names_from_manifests(tmp_path):
    """One name per model from what its manifest records (models.display_name)."""
    from gemma_mlx.models import display_name

    fused = {"stage": "fuse", "base_model": "/r/models/gemma-3-270m", "adapters": "/r/gemma-3-270m",
             "train_manifest": {"objective": "supervised"}}
    assert display_name(tmp_path / "fused", manifest=fused) == "gemma-3-270m + LoRA"
    dpo = {**fused, "adapters": "/r/gemma-3-270m-dpo", "train_manifest": {"objective": "dpo"}}
    assert display_name(tmp_path / "fused", manifest=dpo) == "gemma-3-270m + LoRA + DPO"
    last = {**fused, "adapters": "/r/gemma-3-270m/last"}
    assert display_name(tmp_path / "fused", manifest=last) == "gemma-3-270m + LoRA (last)"
    assert display_name(tmp_path / "gemma-3-270m", manifest={"stage": "convert"}) == "gemma-3-270m (base)"
    assert display_name(tmp_path / "some-model", manifest={}) == "some-model"
