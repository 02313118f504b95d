"""Reward-setting grids (Fig. 9, 12, pairwise interpolation), batched per-image reward targets, best-of-N
search and launchers/sample.py, on a tiny random-weight bundle and the synthetic world's pixel rewards."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from miro_scale import bundle
from miro_scale.config import config_from_dict
from miro_scale.convert import empty_prompt_embedding
from miro_scale.evaluation import grids
from miro_scale.evaluation.rewards import RewardEvaluator
from miro_scale.evaluation.search import best_of_n_search
from miro_scale.flow import MiroFlowModel
from miro_scale.sampling import MiroPipeline
from tests.conftest import ROOT, tiny_config_dict

KEYS = ["sharpness_score", "contrast_score", "colourfulness_score"]


def tiny_bundle(path, seed: int = 0):
    """A random-weight bundle (8 px identity autoencoder) whose reward inputs matter: every weight
    jittered, so no zero-initialised layer hides the rewards."""
    cfg = config_from_dict(tiny_config_dict(
        model={"latent_channels": 3, "text_dim": 16, "reward_keys": KEYS},
        flow={"latent_shift": [0.0] * 3, "latent_scale": [0.5] * 3},
        text_encoder={"kind": "small", "name_or_path": "", "max_length": 8},
        autoencoder={"kind": "identity", "name_or_path": "", "image_size": 8},
        sampling={"num_steps": 2, "guidance_scale": 2.0, "max_text_len": 8}))
    torch.manual_seed(seed)
    model = MiroFlowModel(cfg.model, cfg.flow)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bundle.save(path, cfg, model.state_dict(), empty_prompt_embedding(cfg))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("inference") / "bundle")


def test_setting_builders_give_the_papers_s_plus_and_s_minus():
    iso = grids.isolation_columns(KEYS, seed=3)
    assert [c.label for c in iso] == ["sharpness", "contrast", "colourfulness", "all"]
    for j, column in enumerate(iso[:-1]):
        assert column.positive == {k: 1.0 for k in KEYS}
        assert column.negative == {k: 0.0 if i == j else 1.0 for i, k in enumerate(KEYS)}
    assert iso[-1].positive == {k: 1.0 for k in KEYS} and iso[-1].negative == {k: 0.0 for k in KEYS}
    assert {c.seed for c in iso} == {3}
    inter = grids.interpolation_columns(KEYS, "contrast_score", "sharpness_score", 5)
    for i, column in enumerate(inter):
        t = i / 4
        assert column.positive == {k: 1.0 for k in KEYS}
        assert column.negative == {"contrast_score": t, "sharpness_score": 1 - t, "colourfulness_score": 1.0}
    sweep = grids.sweep_columns("contrast_score", 3, {"sharpness_score": 0.5}, {"colourfulness_score": 0.25})
    assert [c.positive for c in sweep] == [{"sharpness_score": 0.5, "contrast_score": v} for v in (0.0, 0.5, 1.0)]
    assert all(c.negative == {"colourfulness_score": 0.25} for c in sweep)
    with pytest.raises(KeyError, match="vqa_score"):
        grids.interpolation_columns(KEYS, "vqa_score", "contrast_score", 3)
    with pytest.raises(ValueError):
        grids.interpolation_columns(KEYS, "contrast_score", "contrast_score", 3)


def test_batched_grid_equals_one_call_per_column_and_each_image_gets_its_own_targets(model_dir):
    pipe = MiroPipeline.from_pretrained(str(model_dir))
    prompts = ["a red circle", "two blue squares", "a green star"]
    columns = grids.isolation_columns(KEYS) + grids.seed_columns([5])
    images = grids.generate_grid(pipe, prompts, columns, batch_size=4)  # chunks mix prompts and columns
    assert images.shape == (3, len(columns), 3, 8, 8)
    for c, column in enumerate(columns):
        alone = pipe(prompts, reward_targets=column.positive, negative_reward_targets=column.negative,
                     generator=torch.Generator().manual_seed(column.seed), output_type="pt")
        torch.testing.assert_close(images[:, c], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(images[:, 0], images[:, 1], atol=1e-3)  # the rewards matter
    with pytest.raises(ValueError, match="2 per-image reward targets for a batch of 3"):
        pipe(prompts, reward_targets=[{}, {}], output_type="pt")


def test_labelled_grid_places_every_tile_at_full_resolution(tmp_path):
    images = torch.rand(2, 3, 3, 10, 10)
    path = grids.labelled_grid(images, tmp_path / "g.png", ["row a", "row b"], ["x", "a long column label", "z"],
                               padding=2, label_width=50)
    png = np.asarray(Image.open(path).convert("RGB"))
    tiles_h, tiles_w = 2 * 12 + 2, 3 * 12 + 2
    header = png.shape[0] - tiles_h
    assert png.shape[1] == 50 + tiles_w and header > 0
    expected = (images * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    for i in range(2):
        for j in range(3):
            top, left = header + 2 + i * 12, 50 + 2 + j * 12
            assert np.array_equal(png[top:top + 10, left:left + 10], expected[i, j])
    assert (png[:header, 50:] < 128).any()  # column labels drawn
    with pytest.raises(ValueError, match="row and"):
        grids.labelled_grid(images, tmp_path / "bad.png", ["one"], ["x", "y", "z"])


def test_best_of_n_keeps_the_top_scored_candidate_and_n1_is_plain_sampling(model_dir):
    pipe = MiroPipeline.from_pretrained(str(model_dir))
    prompts = ["a red circle", "a blue square"]
    evaluator = RewardEvaluator(["contrast_score", "sharpness_score"])
    result = best_of_n_search(pipe, prompts, evaluator, 6, "contrast_score", seed=7, batch_size=5)
    contrast = result.scores["contrast_score"]
    assert contrast.shape == (2, 6) and torch.isfinite(contrast).all()
    assert torch.equal(result.chosen, contrast.argmax(1))
    assert result.chosen_scores()["contrast_score"] == contrast.max(1).values.tolist()
    # the kept image is candidate k: sampled from seed 7 + k, and it scores what was recorded
    for i, k in enumerate(result.chosen.tolist()):
        again = pipe(prompts, generator=torch.Generator().manual_seed(7 + k), output_type="pt")[i]
        torch.testing.assert_close(result.images[i], again, atol=1e-5, rtol=1e-5)
        rescored = evaluator.score_images(result.images[i:i + 1] * 2 - 1, [prompts[i]])["contrast_score"]
        assert float(rescored) == pytest.approx(float(contrast[i, k]), abs=1e-4)
    one = best_of_n_search(pipe, prompts, evaluator, 1, "contrast_score", seed=7, batch_size=8)
    plain = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="pt")
    assert torch.equal(one.images, plain) and one.chosen.tolist() == [0, 0]
    # more candidates only add to the first ones
    torch.testing.assert_close(one.scores["contrast_score"], contrast[:, :1])
    with pytest.raises(KeyError, match="vqa_score"):
        best_of_n_search(pipe, prompts, evaluator, 2, "vqa_score")


def launcher(name: str):
    """A command's module, loaded from launchers/ (run in-process: no interpreter start per call)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sample(*args):
    return launcher("sample").main([str(x) for x in args])


def test_sample_command_grids_best_of_and_aliases(model_dir, tmp_path):
    out = tmp_path / "iso"
    assert run_sample("--model", model_dir, "--prompt", "a red star", "--prompt", "a blue circle", "--isolation",
                      "--batch-size", "3", "--out", out) == 0
    meta = json.loads((out / "grid.json").read_text())
    assert [c["label"] for c in meta["columns"]] == ["sharpness", "contrast", "colourfulness", "all"]
    assert meta["columns"][1]["negative_reward_targets"] == {"sharpness_score": 1.0, "contrast_score": 0.0,
                                                             "colourfulness_score": 1.0}
    assert len(list(out.glob("000[01]_0[0-3].png"))) == 8 and (out / "grid.png").exists()

    out = tmp_path / "interp"
    assert run_sample("--model", model_dir, "--prompt", "a red star", "--interpolate", "contrast,sharpness",
                      "--sweep-points", "3", "--reward", "colourfulness=0.5", "--out", out) == 0
    meta = json.loads((out / "grid.json").read_text())
    assert [c["negative_reward_targets"]["contrast_score"] for c in meta["columns"]] == [0.0, 0.5, 1.0]

    out = tmp_path / "best"
    assert run_sample("--model", model_dir, "--prompt", "a red star", "--best-of", "4", "--select", "contrast",
                      "--rewards", "contrast,colorfulness", "--out", out) == 0
    best = json.loads((out / "best_of_n.json").read_text())
    row = best["prompts"][0]
    assert best["select"] == "contrast_score" and len(row["scores"]["contrast_score"]) == 4
    assert row["chosen_scores"]["contrast_score"] == max(row["scores"]["contrast_score"])
    assert set(row["chosen_scores"]) == {"contrast_score", "colourfulness_score"} and (out / "0000_best.png").exists()

    for bad, message in [(["--reward", "nonsense=1"], "--reward"), (["--sweep", "vqa"], "vqa_score"),
                         (["--best-of", "2"], "--select")]:
        with pytest.raises(SystemExit, match=message):
            run_sample("--model", model_dir, "--prompt", "x", *bad, "--out", tmp_path / "bad")
