"""The README's commands stay true: every `gemma-mlx ...` line in its bash blocks parses against the CLI."""

import re
import shlex
from pathlib import Path

import click
import pytest

from gemma_mlx.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """`gemma-mlx` command lines from ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("gemma-mlx "):
                    commands.append(part)
    return commands


def parse(command_line: str) -> click.Context:
    """Find the (sub)command and parse its options as click would, without running anything."""
    args = shlex.split(command_line)[1:]
    command, names = cli, ["gemma-mlx"]
    while isinstance(command, click.Group):
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"README names an unknown command: {' '.join(names)} {name}"
        command, names = sub, [*names, name]
    return command.make_context(" ".join(names), args)


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    first_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert "gemma-mlx run --demo" in first_blocks[0]
    assert "pytest" in first_blocks[1]


@pytest.mark.parametrize("command_line", readme_commands())
def test_readme_command_parses(command_line):
    ctx = parse(command_line)
    # every option given in the README is one the command has, with a value it accepts
    given = [a for a in shlex.split(command_line) if a.startswith("--")]
    known = {opt for param in ctx.command.params for opt in (*param.opts, *param.secondary_opts)}
    assert all(option.split("=")[0] in known for option in given), (given, sorted(known))
    assert isinstance(ctx.params, dict) and ctx.params  # click filled in the command's parameters


def _all_commands(group=cli, names=("gemma-mlx",)):
    for name in group.list_commands(click.Context(group)):
        command = group.get_command(click.Context(group), name)
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*names, name))
        else:
            yield " ".join((*names, name)), command


@pytest.mark.parametrize("name, command", list(_all_commands()))
def test_every_command_help_shows_an_example(name, command):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [*name.split()[1:], "--help"])
    assert result.exit_code == 0 and "Example" in result.output, name
    example = result.output[result.output.index("Example"):].splitlines()[1].strip()
    assert example.startswith(name), (name, example)


def test_readme_config_reference_names_every_key():
    import dataclasses

    from gemma_mlx.config import NOT_SETTINGS, ExperimentConfig

    text = README.read_text()
    table = text[text.index("## The config file"):text.index("## The other commands")]
    missing = []
    for field in dataclasses.fields(ExperimentConfig):
        if field.name in NOT_SETTINGS:
            continue
        if dataclasses.is_dataclass(field.type) or field.name in ("lora", "train", "generation"):
            for sub in dataclasses.fields(getattr(ExperimentConfig(), field.name)):
                if f"`{field.name}.{sub.name}`" not in table and f"`{sub.name}`" not in table:
                    missing.append(f"{field.name}.{sub.name}")
        elif f"`{field.name}`" not in table:
            missing.append(field.name)
    assert missing == []


def test_ci_runs_the_readmes_two_commands():
    """CI proves the install path: the first command's install and the whole test command, verbatim."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[:2]
    main_job, tests = (block.strip() for block in blocks)
    install = main_job[: main_job.index("&& gemma-mlx")].strip()
    assert install.endswith('pip install -e ".[real]"')  # the main job's extra, without the test extra
    ci_lines = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines
    assert tests in ci_lines
    assert ci_lines.index(install) < ci_lines.index(tests)
    # the real-only venv then runs the main job itself, made short
    after_install = ci_lines[ci_lines.index(install) + 1: ci_lines.index(tests)]
    assert any(line.startswith("gemma-mlx run --demo") for line in after_install)


def test_readme_pandas_block_runs_in_a_report_directory(tmp_path, monkeypatch):
    """The README's pandas lines read a real report directory as they are written."""
    pytest.importorskip("pandas")
    from gemma_mlx.scoring.report import write_reports
    from tests.test_report import make_results

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "scorecard.csv" in b)
    write_reports(tmp_path, make_results())
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(block, names)  # noqa: S102  (our own README)
    assert list(names["cards"].model) == ["tuned", "base"] and len(names["models"]) == 2
    assert len(names["replies"]) == len(names["per_reply"]) == 8 and "name" in names["per_reply"].columns


def test_readme_config_defaults_are_the_real_ones():
    """Every number in the config table's default column is the dataclass default (1.0 vs 1.1 drifted once)."""
    from gemma_mlx.config import ExperimentConfig

    text = README.read_text()
    table = text[text.index("## The config file"):text.index("## The other commands")]
    config, checked = ExperimentConfig(), 0
    for key, default in re.findall(r"^\| `([\w.]+)` \| `([-\d.e]+)` \|", table, flags=re.M):
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert float(default) == float(value), (key, default, value)
        checked += 1
    assert checked >= 20 and "`generation.repetition_penalty` | `1.1`" in table


def test_readme_progress_lines_show_the_real_eta_format():
    from gemma_mlx.training.loop import clock

    etas = re.findall(r" ETA (\S+)$", README.read_text(), flags=re.M)
    assert etas and all(re.fullmatch(r"\d+:\d\d:\d\d", eta) for eta in etas), etas
    assert clock(1000) == "0:16:40"


def test_readme_output_layout_names_every_file():
    from gemma_mlx.scoring.report import REPORT_FILES

    text = README.read_text()
    layout = text[text.index("## Where outputs go"):text.index("## The config file")]
    compare_lines = layout[layout.index("    compare/"):layout.index("votes.jsonl")]
    for name in (*REPORT_FILES, "manifest.json"):
        assert name in compare_lines, name
    for name in ("votes.jsonl", "conversations.jsonl", "checkpoints/", "fused/"):
        assert name in layout, name
