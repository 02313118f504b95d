"""Engines on the CPU with gloo: 2-process FSDP2 and DeepSpeed ZeRO-0/2/3 and a 2-node torchrun
rendezvous on 127.0.0.1 each train 3 steps; the logged (global mean) losses must match one-process
training with the same global batch to 1e-5 relative (observed: ~1e-7, float reduction order), and
resuming under an engine, or on another world size and engine, must continue the same sequence.
Ranks never outlive their launcher; SIGUSR1 to launcher and ranks (SLURM's preemption notice)
ends with a complete checkpoint."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miro_scale.bundle import load as load_bundle
from miro_scale.convert import consolidate
from miro_scale.train.checkpoint import latest_checkpoint
from tests.conftest import ROOT, tiny_config_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = str(ROOT / "tests/dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path, name, steps=5, **sections):
    sections.setdefault("train", {})
    # a text encoder without weights to fetch: an export computes the empty-prompt embedding with it
    sections.setdefault("text_encoder", {"kind": "small", "name_or_path": "", "max_length": 8})
    sections["train"] = {"output_dir": str(tmp_path / name), "steps": steps, "checkpoint_every": 2,
                         **sections["train"]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_config_dict(**sections)))
    return path


def run(args, timeout=600):
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    # 12k: a rank's own last words (a C++ abort, a traceback) come before torchrun's ~3k summary
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]


def torchrun(config, nproc=2, max_steps=None):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), WORKER, "--config", str(config)] + (
        ["--max-steps", str(max_steps)] if max_steps else [])


def losses(tmp_path, name):
    by_step = {}
    for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


def test_workers_switch_deepspeeds_shared_memory_op_off():
    """The stub the workers import reaches DeepSpeed (not torch, which ``import deepspeed.comm.torch
    as m`` binds): with the op on, every DeepSpeed test compiled it and mapped shared memory."""
    pytest.importorskip("deepspeed")
    proc = subprocess.run([sys.executable, "-c", "import tests.deepspeed_cpu, sys; "
                           "print(sys.modules['deepspeed.comm.torch'].build_shm_op())"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "None"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs, LAMB and AdamW, 5 steps each."""
    tmp = tmp_path_factory.mktemp("reference")
    for name, optim in [("lamb", {}), ("adamw", {"name": "adamw"})]:
        run([sys.executable, WORKER, "--config", str(write_config(tmp, name, optim=optim))])
    return {name: losses(tmp, name) for name in ("lamb", "adamw")} | {
        f"{name}_{weights}": consolidate(latest_checkpoint(tmp / name / "checkpoints"), weights)
        for name in ("lamb", "adamw") for weights in ("ema", "raw")}


def assert_close(ours, reference):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, reference)


# Resume under the same engine for FSDP2, ZeRO-0, ZeRO-1 (LAMB) and ZeRO-3 (AdamW); ZeRO-2 and ZeRO-3
# with LAMB save and resume in test_resume_on_another_world_size_and_engine_continues_exactly.
@pytest.mark.parametrize("name,engine,optim,resume", [
    ("fsdp2", {"kind": "fsdp", "fsdp_param_dtype": "fp32"}, "lamb", True),
    ("zero0", {"kind": "deepspeed", "zero_stage": 0}, "lamb", True),
    ("zero2", {"kind": "deepspeed", "zero_stage": 2}, "adamw", False),
    ("zero3", {"kind": "deepspeed", "zero_stage": 3}, "adamw", True),
    ("zero1_lamb", {"kind": "deepspeed", "zero_stage": 1}, "lamb", True),
    ("zero2_lamb", {"kind": "deepspeed", "zero_stage": 2}, "lamb", False),
    ("zero3_lamb", {"kind": "deepspeed", "zero_stage": 3}, "lamb", False),
])
def test_two_process_engines_match_one_process(tmp_path, reference, name, engine, optim, resume):
    cfg = write_config(tmp_path, name, engine=engine, optim={"name": optim})
    if resume:  # 3 steps; the next launch resumes, and its 2 steps continue the one-process sequence
        run(torchrun(cfg, max_steps=3))
        assert_close(losses(tmp_path, name), reference[optim][:3])
        assert latest_checkpoint(tmp_path / name / "checkpoints").name == "step_00000003"
    run(torchrun(cfg))
    assert_close(losses(tmp_path, name), reference[optim])
    # The EMA, consolidated from both ranks' shards, is the one-process EMA.
    ema = consolidate(latest_checkpoint(tmp_path / name / "checkpoints"))
    assert ema.keys() == reference[f"{optim}_ema"].keys()
    for key, value in ema.items():
        torch.testing.assert_close(value, reference[f"{optim}_ema"][key], atol=1e-3, rtol=1e-3)
    # The trained weights after 5 steps: ~1e-4 from one process's under every engine (FSDP2 too), as
    # Adam's normalisation amplifies the float noise of 2-process gradient sums on tiny gradients;
    # the exact LAMB rule on partitions is tested in test_optim.py.
    raw = consolidate(latest_checkpoint(tmp_path / name / "checkpoints"), "raw")
    diff = max((raw[k] - reference[f"{optim}_raw"][k]).abs().max().item() for k in raw)
    print(f"{name}: max |w - w_one_process| = {diff:.2e}")
    assert diff <= 1e-3
    if name == "fsdp2":  # raw weights through DCP's consolidation, as a deployable file
        out = tmp_path / "export"
        run([sys.executable, "checkpoints_tools/export.py", "--checkpoint",
             str(latest_checkpoint(tmp_path / name / "checkpoints")), "--out", str(out), "--weights", "raw"])
        _, raw, _, _ = load_bundle(str(out))
        assert raw.keys() == ema.keys()  # EMA exports are complete models too (buffers included)
        assert all(torch.equal(raw[k], ema[k]) for k, _ in raw.items() if k.endswith(("freqs", "phases")))


@pytest.mark.parametrize("name,first,optim,last", [
    ("fsdp", {"kind": "fsdp", "fsdp_param_dtype": "fp32"}, "lamb", {"kind": "fsdp", "fsdp_param_dtype": "fp32"}),
    ("zero", {"kind": "deepspeed", "zero_stage": 2}, "lamb", {"kind": "deepspeed", "zero_stage": 3}),
])
def test_resume_on_another_world_size_and_engine_continues_exactly(tmp_path, reference, name, first, optim, last):
    """2 processes (steps 1-2) -> 1 process, local engine (3-4) -> 2 processes (5): one checkpoint format."""
    cfg = write_config(tmp_path, name, engine=first, optim={"name": optim})
    run(torchrun(cfg, max_steps=2))
    run([sys.executable, WORKER, "--config", str(cfg), "--engine", "local", "--max-steps", "2"])
    cfg.write_text(cfg.read_text().replace(json.dumps(first)[1:-1], json.dumps(last)[1:-1]))
    run(torchrun(cfg))
    ours = losses(tmp_path, name)
    print(f"{name} 2->1->2: max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(ours, reference[optim])):.1e}")
    assert_close(ours, reference[optim])


def test_two_node_rendezvous_on_loopback(tmp_path, reference):
    cfg = write_config(tmp_path, "nodes", engine={"kind": "fsdp", "fsdp_param_dtype": "fp32"})
    port = free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "miro-test"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node_rank", str(rank),
                               WORKER, "--config", str(cfg), "--max-steps", "3"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    assert_close(losses(tmp_path, "nodes"), reference["lamb"][:3])


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path, reference):
    """Killed with SIGKILL after its step-2 checkpoint, rerun: the loss sequence is bit-identical."""
    cfg = write_config(tmp_path, "killed", steps=5)
    proc = subprocess.Popen([sys.executable, WORKER, "--config", str(cfg)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    while not (ckpts / "latest").exists() and proc.poll() is None:  # no deadline: pytest-timeout bounds it
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "latest").exists()
    run([sys.executable, WORKER, "--config", str(cfg)])
    assert losses(tmp_path, "killed") == reference["lamb"]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    cfg = write_config(tmp_path, "preempted", steps=10_000, train={"checkpoint_every": 10_000})
    proc = subprocess.Popen([sys.executable, WORKER, "--config", str(cfg)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = latest_checkpoint(tmp_path / "preempted" / "checkpoints")
    assert saved is not None and 2 <= int(saved.name.split("_")[1]) < 10_000


def children_of(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def deepspeed_runner(config, nproc=2):
    return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), WORKER, "--config", str(config)]


@pytest.mark.parametrize("launcher_kind", ["torchrun", "deepspeed"])
def test_ranks_die_with_a_sigkilled_launcher_and_write_nothing_after(tmp_path, launcher_kind):
    """torchrun starts the ranks; `deepspeed` starts deepspeed.launcher.launch, which starts them."""
    engine = {"kind": "fsdp", "fsdp_param_dtype": "fp32"} if launcher_kind == "torchrun" else \
        {"kind": "deepspeed", "zero_stage": 0}
    cfg = write_config(tmp_path, "orphans", steps=100_000, train={"checkpoint_every": 1}, engine=engine)
    command = torchrun(cfg) if launcher_kind == "torchrun" else deepspeed_runner(cfg)
    launcher = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "orphans" / "checkpoints"
    while not (ckpts / "latest").exists() and launcher.poll() is None:
        time.sleep(0.05)
    ranks = children_of(launcher.pid)
    if launcher_kind == "deepspeed":
        ranks = [r for launch in ranks for r in children_of(launch)] + ranks
    assert len(ranks) == (2 if launcher_kind == "torchrun" else 3)
    launcher.kill()
    launcher.wait()
    killed_at = time.monotonic()
    committed = (ckpts / "latest").read_text(), sorted(p.name for p in ckpts.glob("step_*"))
    while any(alive(r) for r in ranks) and time.monotonic() < killed_at + 30:  # a safety net, not a measure
        time.sleep(0.01)
    orphans = [r for r in ranks if alive(r)]
    for r in orphans:
        os.kill(r, signal.SIGKILL)
    assert not orphans, "ranks outlived their launcher"
    print(f"ranks gone {time.monotonic() - killed_at:.3f} s after the launcher")
    time.sleep(3)  # a surviving rank would checkpoint every step (~0.1 s)
    assert ((ckpts / "latest").read_text(), sorted(p.name for p in ckpts.glob("step_*"))) == committed


def test_sigusr1_to_launcher_and_ranks_ends_with_a_complete_checkpoint(tmp_path):
    """As the sbatch files run it: the launcher ignores SIGUSR1 (SLURM signals every process of the
    step), the ranks checkpoint and stop, the launcher exits 0."""
    cfg = write_config(tmp_path, "usr1", steps=100_000, train={"checkpoint_every": 100_000},
                       engine={"kind": "fsdp", "fsdp_param_dtype": "fp32"})
    command = " ".join(torchrun(cfg))
    launcher = subprocess.Popen(["bash", "-c", f"trap '' USR1; exec {command}"], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "usr1" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and launcher.poll() is None:
        time.sleep(0.05)
    for pid in [launcher.pid, *children_of(launcher.pid)]:
        os.kill(pid, signal.SIGUSR1)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    saved = latest_checkpoint(tmp_path / "usr1" / "checkpoints")
    assert saved is not None and int(saved.name.split("_")[1]) >= 2
    assert not list((tmp_path / "usr1" / "checkpoints").glob(".tmp_*"))
    assert len(consolidate(saved)) > 0  # every tensor of it readable


def test_bad_configs_fail_before_any_process_group(tmp_path):
    cfg = write_config(tmp_path, "bad", engine={"kind": "deepspeed", "zero_stage": 4})
    proc = subprocess.run(torchrun(cfg), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "engine.zero_stage: must be 0-3, got 4" in proc.stderr
    assert "init_process_group" not in proc.stderr
    cfg = write_config(tmp_path, "bad2", train={"global_batch_size": 12, "micro_batch_size": 4})
    proc = subprocess.run(torchrun(cfg), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert "train.global_batch_size: 12 is not a multiple of micro_batch_size x world size (4 x 2)" in proc.stderr
