"""mlx-lm's "[INFO] Loading" lines stay out of our commands' output; anything else it prints still shows."""

import contextlib
import io

from click.testing import CliRunner

from gemma_mlx.backend import quiet_mlx_lm
from gemma_mlx.cli import cli


def test_info_lines_are_dropped_and_other_lines_go_to_stderr():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with quiet_mlx_lm():
            print("[INFO] Loading")
            print("[INFO] Using dtype:", "float32")  # print writes this line in pieces
            print("a warning worth seeing")
            print("no newline at the end", end="")
    assert out.getvalue() == ""
    assert err.getvalue() == "a warning worth seeing\nno newline at the end"


def test_convert_from_the_cli_prints_no_info_lines(tiny_checkpoints, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(tiny_checkpoints["pt"]), "--out", str(tmp_path / "m"),
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file()  # it did load and convert the model
    assert "[INFO]" not in result.output and "[INFO]" not in result.stderr
