"""Settings: one table of rules (config.RULES), checked when settings are built, with file:line."""

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.config import GenerationSettings, TrainSettings, apply_overrides, check_settings, load_config
from gemma_mlx.errors import ConfigError


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.mark.parametrize("section, line", [
    ("generation:\n  top_p: 2", "generation.top_p is 2.0; it must be in (0, 1]"),
    ("generation:\n  temperature: -1", "generation.temperature is -1.0"),
    ("train:\n  epochs: -2", "train.epochs is -2; it must be at least 1"),
    ("train:\n  batch_size: 0", "train.batch_size is 0"),
    ("lora:\n  rank: 0", "lora.rank is 0"),
    ("train:\n  lr_schedule: cosin", "train.lr_schedule is 'cosin'; it must be constant, cosine or linear"),
    ("train:\n  max_seq_length: 1", "train.max_seq_length is 1"),
    ("lora:\n  num_layers: 99", "lora.num_layers is 99, but local-pt has 6 layers"),
])
def test_run_checks_every_value_before_any_stage(section, line, tmp_path, isolated_outputs):
    from gemma_mlx.tiny import write_tiny_checkpoint

    local = write_tiny_checkpoint(tmp_path / "local-pt", "pt")
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: early\ncheckpoints: [{local}]\n{section}\n")
    result = run_cli("run", config)
    assert result.exit_code == 1
    assert f"{config}:4" in result.output and line in result.output, result.output
    assert not (isolated_outputs / "runs" / "early").exists()  # nothing converted, nothing written


def test_yaml_reads_floats_like_yaml_1_2_and_refuses_duplicate_keys(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  learning_rate: 1e-4\n  weight_decay: 5E-2\n")
    loaded = load_config(config)
    assert loaded.train.learning_rate == 1e-4 and loaded.train.weight_decay == 0.05
    config.write_text("train:\n  epochs: 3\n  batch_size: 2\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=rf"{config}:4: .*'epochs' appears twice \(first on line 2\)"):
        load_config(config)


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "", "a/b", ".."])
def test_names_that_would_write_outside_the_runs_dir_are_refused(name, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: '{name}'\n")
    with pytest.raises(ConfigError, match="a plain directory name"):
        load_config(config)
    result = run_cli("run", "--tiny", "--name", name)
    assert result.exit_code == 1 and "a plain directory name" in result.output and "command line" in result.output


def test_command_line_values_are_checked_and_can_fix_the_file(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  epochs: 0\n")
    assert load_config(config, {"train.epochs": 2}).train.epochs == 2  # the option wins before the check
    with pytest.raises(ConfigError, match="command line: train.epochs is 0"):
        load_config(None, {"train.epochs": 0})
    with pytest.raises(ConfigError, match=r"/settings: generation.top_p is 0.0"):
        apply_overrides(GenerationSettings(), {"top_p": 0.0}, where="/settings")


def test_python_callers_get_the_same_rules():
    with pytest.raises(ConfigError, match="train.best_by is 'vibes'"):
        check_settings(TrainSettings(best_by="vibes"))
    with pytest.raises(ConfigError, match="2 settings cannot work"):
        check_settings(GenerationSettings(top_k=-1, samples=0))


def test_every_rule_names_a_real_setting():
    import dataclasses

    from gemma_mlx.config import RULES, ExperimentConfig

    config = ExperimentConfig()
    known = {f.name for f in dataclasses.fields(config)}
    for section in ("lora", "train", "generation", "preferences"):
        known |= {f"{section}.{f.name}" for f in dataclasses.fields(getattr(config, section))}
    assert set(RULES) <= known


@pytest.mark.parametrize("option, value, expected", [
    ("--seed", str(2**70), "at most 2,147,483,647"),
    ("--epochs", str(10**20), "at most 2,147,483,647"),
    ("--learning-rate", "inf", "a finite number"),
    ("--end-of-turn-weight", "nan", "a finite number"),
    ("--scale", "inf", "a finite number"),
])
def test_numbers_no_setting_can_use_are_refused_up_front(converted_models, tmp_path, option, value, expected):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 4)
    result = CliRunner().invoke(cli, ["train", "--model", str(converted_models["pt"]), "--data", str(data), option, value])
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.safetensors"))


def test_a_run_name_that_is_a_path_is_refused(converted_models, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 4)
    result = CliRunner().invoke(cli, ["train", "--model", str(converted_models["pt"]), "--data", str(data),
                                      "--run-name", "../../../escaped"])
    assert result.exit_code == 1 and "plain directory name" in result.output
    assert not (tmp_path.parent.parent / "escaped").exists()
