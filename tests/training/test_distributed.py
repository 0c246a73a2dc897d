"""Data-parallel training: the shards, the agreement rules, and two real gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmk3d.errors import LandmarkError
from lmk3d.training import distributed
from lmk3d.training.distributed import World, shard, weights_digest, world_from_env
from lmk3d.training.loop import Trainer, TrainOptions
from tests.conftest import DATA

HIPPO = DATA / "hippocampus"
#: torchrun's own variables: a test run from inside a launch must not inherit them.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# --- shards and agreement, in one process -----------------------------------------------------------
@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 12])
def test_shards_are_disjoint_cover_the_items_and_have_equal_lengths(n: int, size: int) -> None:
    items = [f"case{i:02d}" for i in range(n)]
    shards = [shard(items, World(size, r)) for r in range(size)]
    assert {x for s in shards for x in s} == set(items)
    if n == 0:
        assert all(s == [] for s in shards)
        return
    assert len({len(s) for s in shards}) == 1, "every rank must take the same number of steps"
    assert len(shards[0]) == max(1, -(-n // size))
    if n >= size:  # padding repeats a rank's own items only, so as sets the shards do not overlap
        for a in range(size):
            for b in range(a + 1, size):
                assert not set(shards[a]) & set(shards[b])


def test_one_process_keeps_every_item_in_order() -> None:
    items = list(range(9))
    assert shard(items, World()) == items
    trainer = Trainer(TrainOptions(progress=False))
    picked = trainer.shard([f"c{i}" for i in items], names=[f"c{i}" for i in items])
    assert picked == [f"c{i}" for i in items] and trainer.shard_cases == picked
    assert trainer.forward(lambda x, k: x + k, 2, k=3) == 5
    assert trainer.agree("rank 0's") == "rank 0's"
    assert distributed.all_gather(7) == [7]
    trainer.close()


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "two"}, "must be integers"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
])
def test_bad_launch_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(LandmarkError, match=message):
        world_from_env(env)


def test_launch_variables_are_read() -> None:
    assert world_from_env({}) == World(1, 0, 0)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(4, 3, 1)
    assert not World().distributed and World(2, 1).distributed


def test_a_run_is_resumed_only_with_its_number_of_processes() -> None:
    with pytest.raises(LandmarkError, match="ran as 2 process"):
        Trainer(TrainOptions(progress=False), {"world_size": 2, "completed": {}, "current": None, "meta": {}})


def test_weights_digest_follows_the_weights() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    b.load_state_dict(a.state_dict())
    assert weights_digest([("net", a)]) == weights_digest([("net", b)])
    with torch.no_grad():
        b[0].bias[1] += 1e-6
    assert weights_digest([("net", a)]) != weights_digest([("net", b)])
    assert weights_digest([("net", a)]) != weights_digest([("other", a)])


# --- two gloo processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sixteen_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmk3d.io import read_table, write_table

    table = read_table(HIPPO / "landmarks.csv")
    path = tmp_path_factory.mktemp("ddp") / "landmarks.csv"
    write_table(path, {c: table[c] for c in sorted(table)[:16]}, with_scores=False)
    return path


@pytest.mark.parametrize("detector", ["cascade", "prior_guided", "pin"])
def test_two_gloo_processes_train_one_model(tmp_path: Path, sixteen_cases: Path, detector: str) -> None:
    from lmk3d.data import read_split
    from lmk3d.detectors import load_detector
    from lmk3d.io import read_image

    out = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    # 16 cases, 2 for validation: 14 training cases, 7 per rank (no batch of one for BatchNorm).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lmk3d.cli", "train", "--detector", detector, "--profile", "tiny",
           "--data", str(sixteen_cases), "--images", str(HIPPO / "images"), "--test-fraction", "0",
           "--max-epochs", "2", "--seed", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    # Rank 0 alone printed and wrote: one model, no resume state left, no temporary files.
    assert r.stdout.count(f"trained {detector}") == 1, r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "split.json", "train_report.json"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["world_size"] == 2 and report["distributed"]["backend"] == "gloo"
    ranks = report["distributed"]["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]

    # Each rank took its own half of the training cases, and together they took all of them.
    train_cases = set(read_split(out).subset("train"))
    assert len(train_cases) == 14
    first, second = (set(x["cases"]) for x in ranks)
    assert first and second and not first & second
    assert first | second == train_cases

    # Different data on each rank, yet the same weights: the gradients were averaged. The saved
    # checkpoint holds exactly those weights.
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    model = load_detector(out, "cpu")
    saved = weights_digest((f"{s.name}.{k}", m) for s in model.stages() for k, m in s.networks().items())
    assert saved == ranks[0]["weights_sha256"]

    def losses(o: object) -> list[float]:
        if isinstance(o, dict):
            own = [row["loss"] for row in o.get("history", [])]
            return own + [x for v in o.values() for x in losses(v)]
        if isinstance(o, list):
            return [x for v in o for x in losses(v)]
        return []

    trained = losses(report["fit"])
    assert trained and np.isfinite(trained).all()

    # The model predicts.
    case = read_split(out).subset("val")[0]
    image = read_image(HIPPO / "images" / f"{case}.nii.gz")
    pred = model.predict(image)
    assert list(pred.names) == report["landmark_names"]
    assert pred.found.any() and np.isfinite(pred.xyz_mm_ras[pred.found]).all()
