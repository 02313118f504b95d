import json
import subprocess
import sys

import pytest
import torch

from miro_scale.config import config_from_dict
from miro_scale.train.checkpoint import latest_checkpoint
from miro_scale.train.trainer import NonFiniteLossError, Trainer
from tests.conftest import ROOT, tiny_config_dict


def test_launcher_trains_logs_and_checkpoints(tmp_path):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(tiny_config_dict(train={"output_dir": str(tmp_path / "run")})))
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", str(cfg_path), "--set",
                           "train.steps=3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all(l["loss"] > 0 for l in lines)
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000003"
    assert any((tmp_path / "run/tensorboard").iterdir())
    # One line per log step on stdout, and the run's startup facts.
    logged = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in logged] == ["1/3", "2/3", "3/3"]
    for field in ("loss", "lr", "grad norm", "img/s", "MFU", "mem", "data wait"):
        assert field in logged[-1], logged[-1]
    facts = json.loads((tmp_path / "run/startup.json").read_text())
    assert facts["world_size"] == 1 and facts["accumulation"] == 2 and facts["resumed_step"] == 0
    assert facts["parameters"] > 0 and facts["dataset_samples"] == 64
    assert all(0 <= l["data_wait"] <= 1 and l["memory_gib"] > 0 for l in lines)


def test_the_trainer_does_not_import_evaluation():
    code = ("import sys; import miro_scale.train.trainer; "
            "print(sorted(m for m in sys.modules if m.startswith('miro_scale.evaluation')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_launcher_rejects_bad_config_before_training(tmp_path):
    cfg_path = tmp_path / "bad.json"
    cfg_path.write_text(json.dumps(tiny_config_dict(optim={"lr": -1.0})))
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", str(cfg_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "optim.lr: must be > 0" in proc.stderr


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = Trainer(config_from_dict(tiny_config_dict(train={"output_dir": str(tmp_path / "a")})))
    full = [straight.train_step()["loss"] for _ in range(4)]

    cfg = config_from_dict(tiny_config_dict(train={"output_dir": str(tmp_path / "b")}))
    first = Trainer(cfg)
    part = [first.train_step()["loss"] for _ in range(2)]
    first.save()
    del first
    resumed = Trainer(cfg)  # picks up `latest`
    assert resumed.step == 2
    part += [resumed.train_step()["loss"] for _ in range(2)]
    assert part == full  # bit-exact on the CPU


def test_non_finite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_config_dict(train={"output_dir": str(tmp_path / "c")}))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}

    class PoisonedStream:
        def __init__(self, stream):
            self.stream = stream

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __next__(self):
            batch = next(self.stream)
            batch["latents"][0, 0, 0, 0] = float("nan")
            return batch

    trainer.data = PoisonedStream(trainer.data)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.engine.module.named_parameters())
    monkeypatch.setattr("miro_scale.train.trainer.MAX_CONSECUTIVE_NONFINITE", 3)
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train_step()


def test_post_training_starts_from_an_exported_baseline(tmp_path):
    """Baseline (no rewards) -> export a bundle -> a 3-reward model starts from it; only reward modules are new."""
    import subprocess as sp

    from miro_scale import bundle
    from miro_scale.config import ConfigError

    small = {"kind": "small", "name_or_path": "", "max_length": 8}
    base = Trainer(config_from_dict(tiny_config_dict(model={"reward_keys": []}, text_encoder=small,
                                                     train={"output_dir": str(tmp_path / "base")})))
    base.train_step()
    ckpt = base.save()
    out = tmp_path / "baseline"
    sp.run([sys.executable, "checkpoints_tools/export.py", "--checkpoint", str(ckpt), "--out", str(out)],
           cwd=ROOT, check=True, capture_output=True)
    _, exported, _, _ = bundle.load(str(out))
    post = Trainer(config_from_dict(tiny_config_dict(text_encoder=small, train={"output_dir": str(tmp_path / "post"),
                                                                                "init_from": str(out)})))
    state = post.engine.module.state_dict()
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
    assert any(k.startswith("net.coherence_embedder.") for k in state if k not in exported)
    assert post.train_step()["loss"] > 0
    with pytest.raises(ConfigError, match=r"train.init_from .*other shapes \['net.latents"):
        Trainer(config_from_dict(tiny_config_dict(model={"num_latents": 4},
                                                  train={"output_dir": str(tmp_path / "x"), "init_from": str(out)})))


def test_sample_grid_is_written_during_training(tmp_path):
    from miro_scale.train.callbacks import callbacks_from_config

    trainer = Trainer(config_from_dict(tiny_config_dict(
        train={"output_dir": str(tmp_path / "grid"), "steps": 2, "sample_every": 2, "sample_count": 3,
               "eval_rewards": ["contrast_score", "colourfulness_score"]},
        sampling={"num_steps": 2}, autoencoder={"kind": "identity"})), callbacks=callbacks_from_config)
    trainer.fit()
    from PIL import Image

    image = Image.open(tmp_path / "grid/samples/step_00000002.png")
    assert image.size == (3 * 9 + 1, 2 * 9 + 1)  # 3 prompts x (s+ = 1 guided, s+ = 0) of 8 px, 1 px padding
    record = json.loads((tmp_path / "grid/reward_eval.jsonl").read_text())  # the grid's rows, scored
    assert record["step"] == 2 and set(record["high"]) == set(record["low"]) == {"contrast_score", "colourfulness_score"}
    assert (tmp_path / "grid/reward_curves.png").exists()


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    losses, weights = [], []
    for ac in (False, True):
        trainer = Trainer(config_from_dict(tiny_config_dict(engine={"activation_checkpointing": ac},
                                                            train={"output_dir": str(tmp_path / str(ac))})))
        losses.append(trainer.train_step()["loss"])
        weights.append({n: p.detach().clone() for n, p in trainer.engine.local_parameters().items()})
    assert abs(losses[0] - losses[1]) < 1e-6 * abs(losses[0])
    assert weights[0].keys() == weights[1].keys()  # canonical names: the wrapper prefix is gone
    for name in weights[0]:  # after one LAMB step
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)
