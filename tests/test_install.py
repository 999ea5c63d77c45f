"""Install without a checkout: the shipped experiment is package data, `gemma-mlx init` writes an
editable copy, a copied YAML's paths resolve (or say how to mend them), and a wheel installed in a
fresh venv runs `run --tiny` from an empty directory."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.config import SHIPPED_DATA
from gemma_mlx.errors import ConfigError
from gemma_mlx.run import load_experiment

REPO = Path(__file__).resolve().parent.parent


def test_shipped_data_is_inside_the_package_and_is_the_checkouts_data():
    assert SHIPPED_DATA.is_relative_to(REPO) and (SHIPPED_DATA / "experiment.yaml").is_file()
    package = REPO / "gemma_mlx" / "shipped"
    assert package.resolve() == (REPO / "data").resolve()  # one copy: data/ in a checkout is the package's
    for name in ("experiment.yaml", "experiment-270m.yaml", "bluey/conversations.jsonl", "bluey/persona.yaml",
                 "prompts/comparison.txt"):
        assert (package / name).is_file(), name


def test_init_writes_an_experiment_that_loads_from_its_own_folder(tmp_path):
    target = tmp_path / "mine"
    result = CliRunner().invoke(cli, ["init", str(target)])
    assert result.exit_code == 0, result.output
    assert f"gemma-mlx run {target / 'experiment.yaml'}" in result.output
    for name in ("experiment.yaml", "bluey/conversations.jsonl", "bluey/persona.yaml", "prompts/everyday.txt"):
        assert (target / name).is_file(), name
    # the copy's own files are used, not the shipped ones
    (target / "prompts" / "everyday.txt").write_text("What is your favourite colour?\n")
    config = load_experiment(target / "experiment.yaml")
    assert Path(config.data) == (target / "bluey").resolve()
    assert Path(config.persona) == (target / "bluey" / "persona.yaml").resolve()
    assert str((target / "prompts" / "everyday.txt").resolve()) in config.prompts
    assert config.checkpoints == ["gemma-3-1b-pt", "gemma-3-1b-it"]


def test_init_demo_names_the_packaged_base(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "d"), "--pair", "demo"])
    assert result.exit_code == 0, result.output
    config = load_experiment(tmp_path / "d" / "experiment.yaml")
    assert config.checkpoints == ["gemma-3-270m-q4_k_m"] and config.name == "demo"
    assert "# train on the reply only" not in (tmp_path / "d" / "experiment.yaml").read_text()  # comments kept as shipped
    assert "lr_schedule: cosine            # constant | cosine | linear" in (tmp_path / "d" / "experiment.yaml").read_text()


def test_init_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / "mine"
    (target / "bluey").mkdir(parents=True)
    (target / "bluey" / "persona.yaml").write_text("name: Mine\n")
    (target / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["init", str(target)])
    assert result.exit_code == 1
    assert "bluey/persona.yaml" in result.output and "--force" in result.output and "Traceback" not in result.output
    assert (target / "bluey" / "persona.yaml").read_text() == "name: Mine\n"
    assert not (target / "experiment.yaml").exists()  # nothing written at all
    result = CliRunner().invoke(cli, ["init", str(target), "--force"])
    assert result.exit_code == 0, result.output
    assert (target / "bluey" / "persona.yaml").read_text() == (SHIPPED_DATA / "bluey" / "persona.yaml").read_text()
    assert (target / "notes.txt").read_text() == "keep me"


def test_a_copied_yaml_falls_back_to_the_shipped_files(tmp_path):
    copy = tmp_path / "elsewhere" / "my.yaml"
    copy.parent.mkdir()
    shutil.copy(SHIPPED_DATA / "experiment.yaml", copy)
    config = load_experiment(copy)
    assert Path(config.data) == SHIPPED_DATA / "bluey"
    assert Path(config.persona) == SHIPPED_DATA / "bluey" / "persona.yaml"
    assert all(Path(p).is_file() for p in config.prompts)


def test_a_path_found_nowhere_says_how_to_mend_it(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("name: x\npersona: my-persona/persona.yaml\n")
    with pytest.raises(ConfigError) as error:
        load_experiment(config)
    message = str(error.value)
    assert f"{config}:2" in message and "my-persona/persona.yaml" in message
    assert "relative to the file" in message and f"gemma-mlx init {tmp_path}" in message
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "gemma-mlx init" in result.output


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied, so the build writes nothing into the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "data", dest / "data")
    shutil.copytree(REPO / "gemma_mlx", dest / "gemma_mlx", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "vendor"))
    return dest


@pytest.mark.pipeline
def test_the_wheel_runs_tiny_from_an_empty_directory(tmp_path):
    """Build the wheel, install it alone into a fresh venv (the dependencies are this venv's, read
    through a .pth file, so nothing is downloaded), and run the pipeline where there is no checkout."""
    source = _source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("gemma_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("experiment.yaml", "bluey/conversations.jsonl", "bluey/persona.yaml", "prompts/everyday.txt"):
        assert f"gemma_mlx/shipped/{name}" in names, name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: this venv's packages are importable, its .pth files (the editable checkout) are not run
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "--ignore-installed", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GEMMA_MLX_OUTPUTS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", MLX_DISABLE_COMPILE="1")
    where = subprocess.run([str(python), "-c", "import gemma_mlx; print(gemma_mlx.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed wheel, not the checkout
    run = subprocess.run([str(venv / "bin" / "gemma-mlx"), "run", "--tiny", "--epochs", "1", "--max-tokens", "16"], cwd=empty, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = empty / "outputs" / "runs" / "tiny" / "compare" / "report.html"
    assert report.is_file() and (report.parent / "scorecard.csv").is_file()
    assert "Verdict: " in run.stdout  # the installed package is this checkout's code, reports and all
    assert str(report.relative_to(empty)) in run.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written where it ran
