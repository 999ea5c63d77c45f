"""Counts read as a person writes them: "1 word", "1 warning", "0 loops" (issue 22, small things)."""

import json

from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.text import plural


def test_plural():
    assert [plural(n, "word") for n in (0, 1, 2)] == ["0 words", "1 word", "2 words"]
    assert plural(1, "reply", "replies") == "1 reply" and plural(3, "reply", "replies") == "3 replies"


def test_data_check_summary_counts_one_error_and_one_warning(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "Hi there", "completion": "Hello!"},
        {"prompt": "Hi there!", "completion": "Hello again."},  # a duplicate prompt: one warning
        {"prompt": "x"},  # no completion: one error
    )) + "\n")
    result = CliRunner().invoke(cli, ["data", "check", str(data)])
    assert result.exit_code == 1
    assert "2 valid examples, 1 error, 1 warning." in result.output


def test_data_stats_says_one_example(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": "Hello there."}) + "\n")
    result = CliRunner().invoke(cli, ["data", "stats", str(data)])
    assert result.exit_code == 0, result.output
    assert f"{data}: 1 example (" in result.output
