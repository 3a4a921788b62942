import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from diffreg.config import TrainConfig, get_config
from diffreg.models import VoxelMorph
from diffreg.train import StepSampler, fit, load_checkpoint, load_run
from tests.helpers import ShiftedBlobs

ROOT = Path(__file__).resolve().parents[1]


def _cfg(steps=12):
    cfg = get_config("voxelmorph", "quick", 2)
    cfg.train = TrainConfig(steps=steps, lr=1e-3, batch_size=2, scheduler="cosine", log_every=3, checkpoint_every=4,
                            seed=3)
    return cfg


def _model():
    torch.manual_seed(0)
    return VoxelMorph(dims=2)


def test_step_sampler_is_a_function_of_seed_and_step():
    full = list(StepSampler(10, 3, seed=5, start_step=0, total_steps=9))
    resumed = list(StepSampler(10, 3, seed=5, start_step=4, total_steps=9))
    assert full[4:] == resumed
    # every epoch is a permutation of the dataset
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # two processes of a DDP run read disjoint indices
    r0 = [i for b in StepSampler(8, 2, 0, 0, 2, rank=0, world=2) for i in b]
    r1 = [i for b in StepSampler(8, 2, 0, 0, 2, rank=1, world=2) for i in b]
    assert sorted(r0 + r1) == list(range(8))


def test_resume_continues_identically(tmp_path, device):
    data = ShiftedBlobs(6)
    straight = _model()
    rows_a = fit(straight, data, _cfg(), out=tmp_path / "a", device=device, progress=False)

    interrupted = _model()
    fit(interrupted, data, _cfg(), out=tmp_path / "b", device=device, progress=False, max_steps=8)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 8
    resumed = _model()  # a fresh process would rebuild the model; weights come from the checkpoint
    rows_b = fit(resumed, data, _cfg(), out=tmp_path / "b", device=device, progress=False)

    assert next(resumed.parameters()).device.type == device.type
    # bit-identical on the CPU; CUDA's grid_sample backward accumulates with atomics, so only close there
    exact = device.type == "cpu"
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-3, atol=1e-5), k
    assert rows_a[-1]["step"] == rows_b[-1]["step"] == 12
    assert rows_a[-1]["total"] == pytest.approx(rows_b[-1]["total"], rel=0 if exact else 1e-3, abs=0)
    if not exact:
        return
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 1 + 4  # header + steps 3, 6, 9, 12
    # the log of the resumed run is the log of the straight run (the row at step 9 spans the interruption at 8)
    import csv

    def rows(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / run / "log.csv"))]

    assert rows("a") == rows("b")


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    fit(_model(), ShiftedBlobs(4), _cfg(4), out=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "config"} <= set(ckpt)
    model, cfg = load_run(tmp_path)
    assert cfg.method == "voxelmorph" and isinstance(model, VoxelMorph)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path / "nowhere")


def test_bad_train_settings_are_rejected():
    for field, value in (("amp_dtype", "fp8"), ("log_every", 0), ("scheduler", "step")):
        cfg = _cfg()
        setattr(cfg.train, field, value)
        with pytest.raises(ValueError, match=field):
            fit(_model(), ShiftedBlobs(2), cfg, progress=False)


def test_loss_decreases_with_cosine_schedule(tmp_path, device):
    cfg = _cfg(60)
    cfg.train.log_every = 20
    model = _model()
    rows = fit(model, ShiftedBlobs(8), cfg, out=None, device=device, progress=False)
    assert next(model.parameters()).device.type == device.type
    assert rows[-1]["total"] < rows[0]["total"]
    assert rows[-1]["lr"] < 1e-4  # cosine decayed to ~0 at the end


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from diffreg.config import TrainConfig, get_config
    from diffreg.models import VoxelMorph
    from diffreg.train import fit
    from tests.helpers import ShiftedBlobs
    cfg = get_config("voxelmorph", "quick", 2)
    cfg.train = TrainConfig(steps=6, lr=1e-3, batch_size=1, log_every=2, checkpoint_every=3, seed=0)
    torch.manual_seed(0)
    model = VoxelMorph(dims=2)
    fit(model, ShiftedBlobs(8), cfg, out={out!r}, device="cpu", progress=False)  # gloo: two CPU processes
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert dist.get_world_size() == 2
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    if dist.get_rank() == 0:
        print("DDP-OK", float(flat.abs().sum()))
    dist.destroy_process_group()
    """
)


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP-OK" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 6 and isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2


class _TwoStage(torch.nn.Module):
    """A model with a first stage: ``prepare`` fits ``offset`` to the data mean and freezes it."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(()))
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.prepared = []

    def prepare(self, data, out=None, device=None, progress=False):
        self.prepared.append(out)
        with torch.no_grad():
            self.offset.fill_(float(torch.stack([data[i]["fixed"].mean() for i in range(len(data))]).mean()))
        self.offset.requires_grad_(False)

    def loss(self, batch):
        return {"total": ((self.scale * batch["moving"] + self.offset - batch["fixed"]) ** 2).mean()}


def test_prepare_runs_before_training_and_frozen_parameters_stay(tmp_path):
    data = ShiftedBlobs(n=4)
    model = _TwoStage()
    expected = float(torch.stack([data[i]["fixed"].mean() for i in range(len(data))]).mean())
    fit(model, data, _cfg(steps=5), out=tmp_path / "run", progress=False)
    assert model.prepared == [tmp_path / "run"]
    assert model.offset.item() == pytest.approx(expected)     # frozen by prepare: not moved by the optimizer
    assert model.scale.item() != 1.0                           # the rest trains


def test_validation_curve_is_logged_and_does_not_change_training(tmp_path, device):
    """fit(validation=...) logs val_dice / val_folding_percent every val_every steps (NaN in between) and trains
    exactly as without it (the validation leaves the random streams alone)."""
    from diffreg.evaluate import read_csv

    data, held_out = ShiftedBlobs(6), ShiftedBlobs(3, seed=7)
    plain = _model()
    fit(plain, data, _cfg(), out=tmp_path / "plain", device=device, progress=False)
    curved = _model()
    rows = fit(curved, data, _cfg(), out=tmp_path / "curve", device=device, progress=False, validation=held_out,
               val_every=6, val_pairs=2)
    for a, b in zip(plain.state_dict().values(), curved.state_dict().values()):
        assert torch.equal(a, b) if device.type == "cpu" else torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    measured = [r["step"] for r in rows if r["val_dice"] == r["val_dice"]]
    assert measured == [6, 12]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in rows if r["step"] in measured)
    assert [r["step"] for r in rows if r["val_dice"] != r["val_dice"]] == [3, 9]  # NaN: not validated
    logged = read_csv(tmp_path / "curve" / "log.csv")
    assert [r["step"] for r in logged] == [3, 6, 9, 12] and "val_folding_percent" in logged[0]
    with pytest.raises(ValueError, match="multiple of log_every"):
        fit(_model(), data, _cfg(), validation=held_out, val_every=4, progress=False)


def test_time_budget_stops_and_checkpoints(tmp_path):
    """max_seconds stops the run at the step where the training time is spent, logs and checkpoints that step."""
    data = ShiftedBlobs(6)
    cfg = _cfg(steps=100_000)
    rows = fit(_model(), data, cfg, out=tmp_path / "t", device="cpu", progress=False, max_seconds=0.5)
    last = rows[-1]
    assert 0.5 <= last["seconds"] < 30 and last["step"] < 100_000
    assert load_checkpoint(tmp_path / "t" / "checkpoint.pt")["step"] == last["step"]
    with pytest.raises(ValueError, match="max_seconds"):
        fit(_model(), data, cfg, progress=False, max_seconds=0)


def test_check_run_dir_compares_method_profile_model_and_data(tmp_path):
    from diffreg.train import check_run_dir

    cfg = _cfg(2)
    fit(_model(), ShiftedBlobs(2), cfg, out=tmp_path, progress=False)
    same = cfg.to_dict()
    same["train"]["steps"] = 50                       # a longer budget resumes the same run
    same["model"]["added_by_a_newer_version"] = 1     # a setting the stored run does not know is not a difference
    check_run_dir(tmp_path, same)
    other = cfg.to_dict()
    other["data"]["size"] = [32, 32]
    with pytest.raises(ValueError, match=r"holds a voxelmorph \(quick profile, 2D \(64, 64\)\) run at step 2.*"
                                         r"data.size: \[64, 64\] -> \[32, 32\].*--no-resume"):
        check_run_dir(tmp_path, other)
    with pytest.raises(ValueError, match="is an existing file"):
        check_run_dir(tmp_path / "checkpoint.pt")


def test_runs_trained_side_by_side_in_worker_processes_equal_runs_trained_here(tmp_path):
    """train_or_reuse_many: two runs in two spawned worker processes (one thread each) give the weights that the same
    runs trained one after the other in this process give, and come back in the order of the jobs."""
    from diffreg.data import open_configured
    from diffreg.train import train_or_reuse, train_or_reuse_many

    def job(method, out):
        cfg = get_config(method, "quick").set_budget(steps=4, seed=3)
        return {"config": cfg, "data": open_configured("phantom", "train", cfg.data, "quick"), "out": out,
                "spec": "phantom", "device": "cpu"}

    methods = ("voxelmorph", "voxelmorph-diff")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = [train_or_reuse(**job(m, tmp_path / f"here_{m}"))[0] for m in methods]
    finally:
        torch.set_num_threads(threads)
    side = train_or_reuse_many([job(m, tmp_path / f"side_{m}") for m in methods], processes=2)
    assert [status for _, status in side] == ["trained", "trained"]
    for (model, _), reference, method in zip(side, here, methods):
        assert type(model).__name__ == type(reference).__name__, method
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{method} {name}")
    again = train_or_reuse_many([job(m, tmp_path / f"side_{m}") for m in methods], processes=2)
    assert [status for _, status in again] == ["reused", "reused"]



def _sleep_or_fail(seconds: float) -> float:
    """A job for map_in_workers: sleeps ``seconds``, or fails at once for a negative value."""
    import time

    if seconds < 0:
        raise ValueError(f"a failing job ({seconds})")
    time.sleep(seconds)
    return seconds


def test_map_in_workers_keeps_the_order_and_an_error_stops_the_other_jobs_at_once():
    """map_in_workers: results in the order of the jobs; the first failing job is raised without waiting for the
    long job beside it nor starting the queued one."""
    import time

    from diffreg.train import map_in_workers

    assert map_in_workers(_sleep_or_fail, [{"seconds": 0.2}, {"seconds": 0.0}, {"seconds": 0.1}], processes=2) == \
        [0.2, 0.0, 0.1]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="a failing job"):
        map_in_workers(_sleep_or_fail, [{"seconds": 120}, {"seconds": -1}, {"seconds": 120}], processes=2)
    assert time.perf_counter() - t0 < 60   # not the 120 s of the long job, nor the 240 s of both


def _bar_line(together: Any) -> int:
    """A job for map_in_workers: the progress-bar line of the worker that runs it, once every job has started."""
    import diffreg.train

    together.wait(timeout=120)   # so the jobs run side by side, in two workers
    return diffreg.train._BAR_LINE


def test_workers_side_by_side_draw_their_progress_bars_on_lines_of_their_own():
    import multiprocessing

    from diffreg.train import map_in_workers

    with multiprocessing.get_context("spawn").Manager() as manager:
        together = manager.Barrier(2)
        lines = map_in_workers(_bar_line, [{"together": together}, {"together": together}], processes=2)
    assert sorted(lines) == [0, 1]


def test_worker_processes_are_not_used_under_torchrun(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) map_in_workers refuses (its workers would inherit the rank), and
    train_or_reuse_many trains in this process instead of starting workers."""
    import diffreg.train as train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        train.map_in_workers(_sleep_or_fail, [{"seconds": 0.0}, {"seconds": 0.0}], processes=2)
    here = []
    monkeypatch.setattr(train, "train_or_reuse", lambda **job: here.append(job["out"]) or (None, "trained"))
    assert train.train_or_reuse_many([{"out": "a"}, {"out": "b"}], processes=2) == [(None, "trained")] * 2
    assert here == ["a", "b"]
