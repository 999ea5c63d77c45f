"""Data-parallel training under MLX's launcher: two local ranks give the losses of one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .test_train import write_chat_data

LAUNCHER = str(Path(sys.executable).parent / "mlx.launch")  # installed with mlx, next to this python
COMMON = ["--epochs", "2", "--num-layers", "2", "--rank", "4", "--lr", "1e-3", "--batch-size", "3",
          "--val-every-steps", "4", "--val-generation-tokens", "6"]


def free_port_pair() -> int:
    """A starting port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free ports in a row")


def env(outputs: Path) -> dict:
    return {**os.environ, "MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1", "GEMMA_MLX_OUTPUTS": str(outputs)}


def launch(ranks: int, args: list[str], outputs: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gemma_mlx.cli", *args]
    if ranks > 1:
        command = [LAUNCHER, "-n", str(ranks), "--backend", "ring",
                   "--starting-port", str(free_port_pair()), "--", *command]
    return subprocess.run(command, env=env(outputs), capture_output=True, text=True, timeout=timeout)


def losses(run: Path) -> list[tuple]:
    return [(m["split"], m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("dist-data") / "chat.jsonl", count=22)  # 18 train: batches of 3


@pytest.mark.pipeline
def test_two_ranks_train_like_one_process(converted_models, chat_data, tmp_path):
    model = converted_models["pt"]  # a base model: turn-token rows train too
    one = launch(1, ["train", "--model", str(model), "--data", str(chat_data), "--out", str(tmp_path / "one"), *COMMON],
                 tmp_path / "out1")
    assert one.returncode == 0, one.stderr
    two = launch(2, ["train", "--model", str(model), "--data", str(chat_data), "--out", str(tmp_path / "two"), *COMMON],
                 tmp_path / "out2")
    assert two.returncode == 0, two.stderr + two.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [(s, n) for s, n, _ in a] == [(s, n) for s, n, _ in b]  # the same steps and validations
    for (_, _, x), (_, _, y) in zip(a, b):
        assert y == pytest.approx(x, rel=2e-4)  # the same losses, up to the order of float sums
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["ranks"] == 2 and s1["ranks"] == 1
    assert s2["examples_seen"] == s1["examples_seen"] == 2 * 18  # every example once per epoch, none twice
    assert s2["best_step"] == s1["best_step"]
    # rank 0 wrote the outputs and talked; rank 1 wrote only its log
    assert "steps of 3 examples" in two.stdout + two.stderr
    log = tmp_path / "out2" / "logs" / "rank-1.log"
    assert log.is_file() and "steps of 3 examples" not in log.read_text()


_FAILING_RANK = """
import sys
import gemma_mlx
from gemma_mlx.config import LoraSettings, TrainSettings
from gemma_mlx.distributed import world
from gemma_mlx.train import train_model
from gemma_mlx.training.loop import TrainingCallback

class Fail(TrainingCallback):
    def on_step(self, report):
        if world().rank == 1 and report.step == 3:
            raise SystemExit("rank 1 fails")

result = train_model(sys.argv[1], sys.argv[2], out=sys.argv[3], lora=LoraSettings(num_layers=2, rank=4),
                     train=TrainSettings(epochs=3, batch_size=3, val_every_steps=2, val_generation_tokens=0),
                     callback=Fail())
print("status", world().rank, result.status, flush=True)
"""


@pytest.mark.pipeline
def test_a_rank_that_fails_stops_the_others_and_the_run_resumes(converted_models, tmp_path):
    chat_data = write_chat_data(tmp_path / "chat.jsonl", count=12)  # 10 train: 4 steps of up to 3 an epoch
    script = tmp_path / "fail.py"
    script.write_text(_FAILING_RANK)
    out = tmp_path / "run"
    command = [LAUNCHER, "-n", "2", "--backend", "ring",
               "--starting-port", str(free_port_pair()), "--", sys.executable, str(script),
               str(converted_models["it"]), str(chat_data), str(out)]
    done = subprocess.run(command, env=env(tmp_path / "outputs"), capture_output=True, text=True, timeout=300)
    assert "rank 1 fails" in done.stdout + done.stderr  # over, not hanging (mlx.launch itself exits with 0)
    state = json.loads((out.with_name("run.partial") / "resume_state.json").read_text())
    # rank 0 saved either its last validation (step 2: the launcher killed it first) or, when it saw the
    # lost peer before the kill, its last complete step (3, the step both ranks finished together)
    saved_step = state["position"]["step"]
    assert saved_step in (2, 3)
    resumed = launch(2, ["train", "--model", str(converted_models["it"]), "--data", str(chat_data), "--out", str(out),
                         "--epochs", "3", "--num-layers", "2", "--rank", "4", "--batch-size", "3", "--val-every-steps",
                         "2", "--val-generation-tokens", "0", "--resume"], tmp_path / "outputs")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at epoch 1, step {saved_step}" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_shards_cover_each_batch_once():
    from gemma_mlx.distributed import World, shard

    for size in (1, 2, 3, 5):
        for batch in ([], [7], [1, 2], list(range(10))):
            pieces = [shard(batch, World(rank, size)) for rank in range(size)]
            assert [i for piece in pieces for i in piece] == batch
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
