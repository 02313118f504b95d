"""A training step between log steps never waits for the device: no .item(), float(), bool(),
.tolist() or data-dependent shape on a device tensor (counted by miro_scale.train.census), and
non-finite steps are still skipped and counted, at the next log step."""
import pytest
import torch

from miro_scale.config import config_from_dict
from miro_scale.train.census import Census
from miro_scale.train.trainer import Trainer
from tests.conftest import tiny_config_dict

LOG_EVERY = 4


def _trainer(tmp_path) -> Trainer:
    trainer = Trainer(config_from_dict(tiny_config_dict(train={"output_dir": str(tmp_path / "run"), "steps": 100,
                                                               "log_every": LOG_EVERY})))
    # Batches made up front: on the CPU the data stream's own host work would count as syncs.
    batches = [next(trainer.data) for _ in range(2 * LOG_EVERY * trainer.accumulation)]
    trainer.data = iter(batches)
    return trainer


def _sites(census: Census):
    """Sync sites as 'file function' (line numbers move)."""
    sites = {}
    for site in census.syncs:
        where, function = site.split(" ", 1)
        key = f"{where.split(':')[0]} {function}"
        sites[key] = sites.get(key, 0) + 1
    return sites


def test_steps_between_log_steps_do_not_sync(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.train_step() is None  # step 1: optimizer state now exists
    with Census(trainer.device) as census:
        assert trainer.train_step() is None and trainer.train_step() is None  # steps 2, 3
    assert _sites(census) == {}, census.syncs
    with Census(trainer.device) as census:
        logged = trainer.train_step()  # step 4: the log step reads the window
    assert logged is not None and logged["loss"] > 0 and logged["skipped"] == 0
    assert {"trainer.py read_metrics", "metrics.py peek"} <= set(_sites(census))


def test_a_device_side_skip_leaves_no_sync_and_is_counted_at_the_log_step(tmp_path):
    trainer = _trainer(tmp_path)
    engine = trainer.engine  # LAMB, skipping on the device through found_inf
    assert trainer.train_step() is None
    batches = list(trainer.data)
    batches[0]["latents"][0, 0, 0, 0] = float("nan")  # step 2's first micro-batch
    trainer.data = iter(batches)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with Census(trainer.device) as census:
        assert trainer.train_step() is None  # step 2: non-finite, skipped on the device
        after_skip = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        assert trainer.train_step() is None  # step 3
    assert census.syncs == []
    assert all(torch.equal(after_skip[n], p) for n, p in before.items())
    assert trainer.nonfinite_steps == 0  # not read yet
    logged = trainer.train_step()  # step 4
    assert logged["skipped"] == 1 and trainer.nonfinite_steps == 1 and logged["loss"] > 0
    assert any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters())


def test_synthetic_batches_are_made_at_once_on_the_device_without_syncs():
    from miro_scale.data.synthetic_tensors import SyntheticLatentDataset, collate

    ds = SyntheticLatentDataset(32, 4, 8, 12, 16, ["a", "b", "c"], [0.5] * 4, [2.0] * 4, seed=1)
    cpu = torch.device("cpu")
    with Census(cpu) as census:
        batch = ds.batch(torch.arange(8, 16), cpu, seed=7)
    assert census.syncs == [] and all(v.device == cpu for v in batch.values())
    per_sample = collate([ds[i] for i in range(8, 16)])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in per_sample.items()}
    again = ds.batch(torch.arange(8, 16), cpu, seed=7)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # a chunk's seed fixes it
    lengths = batch["text_mask"].sum(1)
    assert ((lengths >= 6) & (lengths <= 12)).all() and torch.equal(batch["index"], torch.arange(8, 16))
    assert (batch["text_embeddings"][~batch["text_mask"]] == 0).all()
    assert torch.equal(batch["rewards"] * 63, (batch["rewards"] * 63).round())  # on the 64-bin grid
    # a sample alone is the batch of one with its own seed: dataset[i] is fixed
    assert torch.equal(ds[9]["latents"], ds.batch(torch.tensor([9]), cpu, seed=1 * 1_000_003 + 9)["latents"][0])


FSDP_WORKER = '''
import json, sys
import pytest
import torch
from miro_scale.config import config_from_dict
from miro_scale.train.census import Census
from miro_scale.train.trainer import Trainer
trainer = Trainer(config_from_dict(json.loads(sys.argv[1])))
trainer.data = iter([next(trainer.data) for _ in range(8 * trainer.accumulation)])
trainer.train_step()
with Census(trainer.device) as census:
    trainer.train_step(); trainer.train_step()
logged = trainer.train_step()
json.dump({"syncs": census.syncs, "loss": logged["loss"]},
          open(sys.argv[2] + f"/rank{trainer.rank}.json", "w"))
trainer.close()
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_steps_between_log_steps_do_not_sync(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = tiny_config_dict(engine={"kind": "fsdp", "fsdp_param_dtype": "fp32"},
                           train={"output_dir": str(tmp_path / "run"), "steps": 100, "log_every": LOG_EVERY})
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(worker), json.dumps(cfg), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        sites = [s.split(":")[0] + " " + s.split(" ", 1)[1] for s in result["syncs"]]
        assert sites == [], result["syncs"]
        assert result["loss"] > 0
