"""Bytes each engine moves per training step, counted on 2 gloo processes (the table in README.md).

The tiny fp32 model has N parameters; per step and rank the engines should move:
- DeepSpeed ZeRO-0: one all-reduce of the fp32 gradients (4N bytes), after the backward;
- DeepSpeed ZeRO-2 with overlapped buckets: the gradients reduced from the backward's hooks while
  it runs (all but the last bucket), then the updated weights all-gathered (4N);
- FSDP2: gradients reduce-scattered (4N); weights all-gathered before each forward (MIRO's step
  has two: the self-conditioning pass, then the trained one) and again before the backward when
  resharding after forward (12N); without resharding, once (4N).
"""
import json
import sys

import pytest
import torch

from miro_scale.config import config_from_dict
from miro_scale.flow import MiroFlowModel
from tests.conftest import ROOT, tiny_config_dict
from tests.test_distributed import ENV, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {
    "zero0": {"kind": "deepspeed", "zero_stage": 0},
    "zero2": {"kind": "deepspeed", "zero_stage": 2, "zero_bucket_elements": 20_000},
    "fsdp": {"kind": "fsdp", "fsdp_param_dtype": "fp32"},
    "fsdp_no_reshard": {"kind": "fsdp", "fsdp_param_dtype": "fp32", "fsdp_reshard_after_forward": False},
}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    import subprocess

    tmp = tmp_path_factory.mktemp("comm")
    out = {}
    for name, engine in LAYOUTS.items():
        cfg = tiny_config_dict(engine=engine, optim={"name": "adamw"},
                               train={"output_dir": str(tmp / name), "steps": 10, "checkpoint_every": 1000})
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), str(ROOT / "tests/comm_worker.py"), "--config", str(path), "--out",
             str(tmp / f"{name}.out.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = json.loads((tmp / f"{name}.out.json").read_text())
    with torch.device("meta"):
        model = MiroFlowModel(config_from_dict(cfg).model, config_from_dict(cfg).flow)
    n = sum(p.numel() for p in model.parameters())
    print(f"\nN = {n} parameters; payload bytes per parameter per step and rank (in the backward's hooks; "
          f"sent on a ring):")
    for name, v in out.items():
        print(f"  {name:22s} {v['total_bytes'] / n:5.2f} ({v['bytes_in_backward'] / n:4.2f}; "
              f"{v['wire_bytes'] / n:4.2f})  {v['calls']}")
    return out, n


def gathered(v):
    return sum(b for op, b in v["bytes"].items() if "all_gather" in op)


def test_zero0_all_reduces_the_gradients_once_after_the_backward(volumes):
    out, n = volumes
    v = out["zero0"]
    assert 4 * n <= v["bytes"]["all_reduce"] <= 4 * n + 4096
    assert v["bytes_in_backward"] == 0


def test_zero2_reduces_in_buckets_during_the_backward(volumes):
    out, n = volumes
    v = out["zero2"]
    assert v["bytes_in_backward"] >= 2 * n  # most buckets go while the backward runs
    assert gathered(v) >= 4 * n  # the updated weights
    assert v["total_bytes"] <= 8 * n * 1.1 + 4096
    # each bucket slice reduced to its owner: on a ring, no more than ZeRO-0's one all-reduce
    assert v["wire_bytes"] <= out["zero0"]["wire_bytes"] * 1.02


def test_fsdp_without_resharding_gathers_the_weights_once(volumes):
    out, n = volumes
    reshard, keep = out["fsdp"], out["fsdp_no_reshard"]
    assert gathered(reshard) == 3 * gathered(keep)
    assert 4 * n <= gathered(keep) <= 4 * n * 1.1
    for v in (reshard, keep):
        scattered = sum(b for op, b in v["bytes"].items() if "reduce_scatter" in op)
        assert 4 * n <= scattered <= 4 * n * 1.1
        assert v["bytes_in_backward"] >= scattered  # reduce-scatters from the post-backward hooks
