"""The trainer: recipes run, resume exactly, and shard across processes without changing the result."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tether.train import RECIPES, Trainer
from tether.train.config import load_config

TINY = ["model.source=tiny", "data.frames=6", "data.height=4", "data.width=4", "batch_size=2", "ema=0.9"]


def tiny_config(recipe, *extra):
    return load_config(recipe, overrides=TINY + list(extra))


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_runs_two_steps_with_finite_loss(tmp_path, recipe):
    trainer = Trainer(tiny_config(recipe, "steps=2"), tmp_path / recipe, progress=False)
    last = trainer.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert len(losses(tmp_path / recipe)) == 2


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    whole = Trainer(tiny_config("teacher", "steps=4", "save_every=2"), tmp_path / "whole", progress=False)
    whole.run()
    first = Trainer(tiny_config("teacher", "steps=2", "save_every=2"), tmp_path / "split", progress=False)
    first.run()
    second = Trainer(tiny_config("teacher", "steps=4", "save_every=2"), tmp_path / "split", resume=True, progress=False)
    second.run()
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    a, b = whole.weights("model"), second.weights("model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(whole.weights("model", ema=True).values(), second.weights("model", ema=True).values()))


def test_a_run_folder_is_not_overwritten_without_resume(tmp_path):
    Trainer(tiny_config("teacher", "steps=1"), tmp_path / "r", progress=False).run()
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="--resume"):
        Trainer(tiny_config("teacher", "steps=1"), tmp_path / "r", progress=False).run()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# teacher: one trainable model; self-forcing: a trainable generator and critic beside a frozen
# real score, which is sharded as well (generator_every=2 so the generator's update is in the 3 steps).
@pytest.mark.parametrize("recipe, extra", [("teacher", []), ("self-forcing", ["generator_every=2"])])
def test_two_process_fsdp2_matches_one_process(tmp_path, recipe, extra):
    one = subprocess.run([sys.executable, "-m", "tether", "train", recipe, *TINY, *extra, "steps=3", "batch_size=4",
                          "--out", str(tmp_path / "one"), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "tether", "train", recipe, *TINY, *extra, "steps=3", "batch_size=2",
                          "--out", str(tmp_path / "two"), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
