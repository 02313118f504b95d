"""Convert, sample and evaluate stages: an exported bundle drives MiroPipeline with reward dials."""
import json
import subprocess
import sys

import torch

from miro_scale.config import config_from_dict
from miro_scale.sampling import MiroPipeline
from miro_scale.train.trainer import Trainer
from tests.conftest import ROOT, tiny_config_dict


def test_exported_model_samples_with_reward_dials(tmp_path):
    cfg = config_from_dict(tiny_config_dict(
        model={"latent_channels": 3, "text_dim": 16},
        flow={"latent_shift": [0.0] * 3, "latent_scale": [1.0] * 3},
        text_encoder={"kind": "small", "name_or_path": "", "max_length": 8},
        autoencoder={"kind": "identity", "name_or_path": "", "image_size": 8},
        sampling={"num_steps": 3, "guidance_scale": 2.0, "max_text_len": 8},
        train={"output_dir": str(tmp_path / "run")}))
    trainer = Trainer(cfg)
    trainer.train_step()
    with torch.no_grad():  # make the reward pathway matter in a model trained for one step
        trainer.engine.module.net.ln_previous_2.weight.fill_(1.0)
    ckpt = trainer.save()
    model_file = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "checkpoints_tools/export.py", "--checkpoint", str(ckpt), "--out",
                           str(model_file)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in model_file.iterdir()) == ["config.json", "model.safetensors", "uncond_embedding.npy"]
    pipe = MiroPipeline.from_pretrained(str(model_file))
    prompts = ["two red circles", "a blue square"]
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = pipe(prompts, generator=g(), output_type="pt")
    assert a.shape == (2, 3, 8, 8) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, pipe(prompts, generator=g(), output_type="pt"))
    low = pipe(prompts, reward_targets={"aesthetic_score": 0.0}, generator=g(), output_type="pt")
    assert not torch.allclose(a, low, atol=1e-5)
    # the empty-prompt embedding of the config's text encoder is in the bundle
    empty, mask = pipe.text_encoder.encode([""])
    torch.testing.assert_close(pipe.uncond_embedding, empty[0, mask[0]])
    info = subprocess.run([sys.executable, "-m", "checkpoints_tools.inspect", str(model_file)], cwd=ROOT,
                          capture_output=True, text=True)
    assert info.returncode == 0 and json.loads(info.stdout)["written_by"] == "miro-scale", info.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "checkpoints_tools.inspect", str(tmp_path / "run")],
                                     cwd=ROOT, capture_output=True, text=True).stdout)
    assert info["kind"] == "run" and info["last"]["step"] == 1

    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "launchers/sample.py", "--model", str(model_file), "--prompt", "a red star",
                           "--sweep", "clip_score", "--sweep-points", "3", "--steps", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "grid.png").exists() and len(list(out.glob("0000_*.png"))) == 3

    # Evaluate stage: generate for a prompt file and score with reward models (pixel rewards here).
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "a photo of a red circle", "tag": "single_object"}\n'
                            '{"prompt": "two blue squares", "tag": "counting"}\n'
                            '{"prompt": "a green triangle", "tag": "single_object"}\n')
    report_dir = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "launchers/evaluate.py", "--model", str(model_file), "--prompts",
                           str(prompts_file), "--rewards", "sharpness,contrast,colourfulness", "--steps", "2",
                           "--batch-size", "2", "--out", str(report_dir)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["rows"]) == 3 and len(list((report_dir / "images").glob("*.png"))) == 3
    overall = report["summary"]["overall"]
    assert set(overall) == {"sharpness_score", "contrast_score", "colourfulness_score"}
    assert overall["contrast_score"]["count"] == 3 and overall["contrast_score"]["mean"] > 0
    assert report["summary"]["by_category"]["single_object"]["contrast_score"]["count"] == 2
