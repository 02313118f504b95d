"""The pieces the demo is built from: world vocabularies and evaluation prompts, sample prediction
and early-stopped sampling, pipelines from checkpoints, and generate-and-score with shared noise."""
import json

import numpy as np
import pytest
import torch

from miro_scale.config import config_from_dict
from miro_scale.evaluation.generation import generate_and_score
from miro_scale.evaluation.rewards import RewardEvaluator
from miro_scale.flow import MiroFlowModel, flow_matching_loss
from miro_scale.sampling import MiroPipeline, gamma_grid, sample
from miro_scale.synthetic import world
from miro_scale.synthetic.rewards import alignment_score, detect_objects
from tests.conftest import tiny_config_dict


def test_the_simple_vocabulary_draws_only_its_shapes_colours_and_categories(tmp_path):
    vocab = world.VOCABULARIES["simple"]
    metas = [world.make_sample(i, seed=2, resolution=32, vocab="simple")[1]["json"] for i in range(60)]
    assert {m["tag"] for m in metas} <= set(vocab.tags)
    for m in metas:
        assert m["scene"]["background"]["kind"] == "flat"
        for o in m["scene"]["objects"]:
            assert o["shape"] in vocab.shapes and o["color"] in vocab.colours
    # the full vocabulary is the default and draws what it drew before vocabularies existed
    assert world.make_sample(5, seed=1) == world.make_sample(5, seed=1, vocab="full")
    world.generate(str(tmp_path / "w"), 8, 4, resolution=32, seed=0, progress=False, vocab="simple")
    man = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert man["synthetic_world"]["vocabulary"]["shapes"] == list(vocab.shapes)
    with pytest.raises(ValueError, match="unknown"):
        world.Vocabulary(shapes=("circle", "square", "blob"))


def test_evaluation_prompts_take_the_categories_in_turn_and_describe_their_scene():
    prompts = world.evaluation_prompts(10, seed=3, vocab="simple", resolution=32)
    tags = world.VOCABULARIES["simple"].tags
    assert [p.metadata["tag"] for p in prompts] == [tags[i % len(tags)] for i in range(10)]
    train_captions = {world.make_sample(i, seed=3, resolution=32, vocab="simple")[1]["txt"] for i in range(10)}
    assert [p.text for p in prompts] != sorted(train_captions)
    # the caption is true of its scene: rendered, the detector finds it
    scores = []
    for p in prompts:
        image = world.render_scene(p.metadata["scene"], np.random.default_rng(0))
        scores.append(alignment_score(p.text, detect_objects(np.asarray(image))))
    assert np.mean(scores) > 0.8


def test_gamma_grid_stops_at_the_final_gamma_and_is_unchanged_at_one():
    full = gamma_grid(10)
    assert full[-1] == 1.0 and torch.equal(full, gamma_grid(10, final_gamma=1.0))
    part = gamma_grid(10, final_gamma=0.6)
    assert part[-1] == pytest.approx(0.6) and torch.allclose(part[1:], full[1:] * 0.6)


def _tiny(prediction="velocity", **sections):
    return config_from_dict(tiny_config_dict(flow={"prediction": prediction}, **sections))


def test_sample_prediction_gives_the_velocity_of_its_clean_estimate():
    cfg = _tiny("sample")
    torch.manual_seed(0)
    model = MiroFlowModel(cfg.model, cfg.flow).eval()
    m = cfg.model
    y = torch.randn(2, m.latent_channels, m.latent_size, m.latent_size)
    gamma = torch.tensor([0.3, 0.8])
    text, mask = torch.randn(2, 5, m.text_dim), torch.ones(2, 5, dtype=torch.bool)
    rewards = torch.rand(2, len(m.reward_keys))
    with torch.no_grad():
        out = model(y, gamma, text, mask, rewards)
        g = gamma.view(-1, 1, 1, 1)
        c_in = torch.rsqrt((g * cfg.flow.sigma_data) ** 2 + (1 - g) ** 2)
        x0 = cfg.flow.sigma_data * model.net(y * c_in, gamma, text, mask, rewards, None)[0]
    torch.testing.assert_close(out.velocity, (y - x0) / (1 - g))
    batch = {"latents": torch.randn(4, m.latent_channels, m.latent_size, m.latent_size),
             "text_embeddings": torch.randn(4, 5, m.text_dim), "text_mask": torch.ones(4, 5, dtype=torch.bool),
             "rewards": torch.rand(4, len(m.reward_keys))}
    loss, _ = flow_matching_loss(model.train(), batch, cfg.flow, m.self_conditioning, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_early_stopped_sampling_returns_the_clean_estimate_at_the_final_gamma():
    cfg = _tiny()
    torch.manual_seed(0)
    model = MiroFlowModel(cfg.model, cfg.flow).eval()
    m = cfg.model
    noise = torch.randn(2, m.latent_channels, m.latent_size, m.latent_size)
    text, mask = torch.randn(2, 5, m.text_dim), torch.ones(2, 5, dtype=torch.bool)
    rewards = torch.rand(len(m.reward_keys))
    x = sample(model, noise, text, mask, rewards, num_steps=4, final_gamma=0.5)
    # by hand: 4 Euler steps to gamma 0.5, then x - (1 - gamma) v
    y, latents = noise.clone(), None
    grid = gamma_grid(4, final_gamma=0.5)
    with torch.no_grad():
        for a, b in zip(grid[:-1], grid[1:]):
            out = model(y, a.expand(2), text, mask, rewards.expand(2, -1), latents)
            latents = out.latents
            y = y - out.velocity * (b - a)
        out = model(y, grid[-1].expand(2), text, mask, rewards.expand(2, -1), latents)
    torch.testing.assert_close(x, y - (1 - grid[-1]) * out.velocity)
    with pytest.raises(ValueError, match="final_gamma"):
        sample(model, noise, text, mask, rewards, num_steps=2, final_gamma=0.0)


def test_pipeline_from_a_checkpoint_is_the_exported_bundle_and_shares_noise_across_models(tmp_path):
    from miro_scale.convert import export_bundle
    from miro_scale.train.trainer import Trainer

    cfg = config_from_dict(tiny_config_dict(
        model={"latent_channels": 3, "text_dim": 16, "latent_size": 16, "patch_size": 4,
               "reward_keys": ["sharpness_score", "contrast_score"]},
        flow={"latent_shift": [0.0] * 3, "latent_scale": [0.5] * 3},
        text_encoder={"kind": "small", "name_or_path": "", "max_length": 8},
        autoencoder={"kind": "identity", "name_or_path": "", "image_size": 16},
        sampling={"num_steps": 3, "guidance_scale": 1.0, "max_text_len": 8},
        train={"output_dir": str(tmp_path / "run")}))
    trainer = Trainer(cfg)
    trainer.train_step()
    ckpt = trainer.save()
    from_ckpt = MiroPipeline.from_checkpoint(ckpt)
    from_bundle = MiroPipeline.from_pretrained(str(export_bundle(ckpt, tmp_path / "bundle")))
    evaluator = RewardEvaluator(["sharpness_score", "contrast_score", "caption_alignment_score"])
    prompts = world.evaluation_prompts(3, vocab="simple", resolution=16)
    a = generate_and_score(from_ckpt, prompts, evaluator, images_per_prompt=2, batch_size=4, progress=False)
    b = generate_and_score(from_bundle, prompts, evaluator, images_per_prompt=2, batch_size=4, progress=False)
    assert a.images.shape == (3, 2, 3, 16, 16) and a.scores["sharpness_score"].shape == (3, 2)
    torch.testing.assert_close(a.images, b.images)
    assert a.categories == [p.metadata["tag"] for p in prompts]
    low = generate_and_score(from_ckpt, prompts, evaluator, images_per_prompt=2, batch_size=4, progress=False,
                             reward_targets={"sharpness_score": 0.0})
    assert not torch.allclose(low.images, a.images)
    assert set(a.means()) == {"sharpness_score", "contrast_score", "caption_alignment_score"}


def test_denoise_is_the_one_step_clean_estimate_of_the_noised_images():
    cfg = config_from_dict(tiny_config_dict(
        model={"latent_channels": 3, "latent_size": 16, "patch_size": 4, "reward_keys": ["sharpness_score", "contrast_score"]},
        flow={"latent_shift": [0.0] * 3, "latent_scale": [0.5] * 3, "prediction": "sample"},
        text_encoder={"kind": "small", "name_or_path": "", "max_length": 8},
        autoencoder={"kind": "identity", "name_or_path": "", "image_size": 16}))
    torch.manual_seed(0)
    model = MiroFlowModel(cfg.model, cfg.flow)
    pipe = MiroPipeline(cfg, model, torch.zeros(1, cfg.model.text_dim))
    prompts = ["a photo of a red circle", "a photo of a blue star"]
    images = torch.rand(2, 3, 16, 16)
    out = pipe.denoise(prompts, images, 0.4, reward_targets={"sharpness_score": 0.2},
                       generator=torch.Generator().manual_seed(5))
    # by hand: normalised pixels, the same noise, x - (1 - g) v with the dials as given (others at 1)
    x0 = (images * 2 - 1) * (cfg.flow.sigma_data / 0.5)
    x = 0.4 * x0 + 0.6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    text, mask = pipe.text_encoder.encode(prompts)
    with torch.no_grad():
        v = model(x, torch.full((2,), 0.4), text, mask, torch.tensor([[0.2, 1.0]] * 2)).velocity
    expected = ((x - 0.6 * v) * (0.5 / cfg.flow.sigma_data) * 0.5 + 0.5).clamp(0, 1)
    assert out.shape == images.shape
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="gamma"):
        pipe.denoise(prompts, images, 1.0)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        pipe.denoise(prompts, torch.rand(3, 3, 16, 16), 0.5)
