"""The authors' released bundle layout loads as it is, and our pipeline samples what theirs does.

tests/fixtures/miro_release/ was made with the authors' own code (PyPI miro-t2i 0.1.4, in a separate
venv; see its README and make_parity.py): a tiny random network in the released bundle layout, and
the latents their MiroPipeline.__call__ returned for recorded text embeddings, seeds and reward
targets (CPU, fp32)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from miro_scale import bundle
from miro_scale.sampling import MiroPipeline, gamma_grid

FIX = Path(__file__).resolve().parent / "fixtures" / "miro_release"
RUNS = json.loads((FIX / "parity.json").read_text())["runs"]


@pytest.fixture(scope="module")
def parity():
    return load_file(str(FIX / "parity.safetensors"))


@pytest.mark.parametrize("run", RUNS, ids=[r["name"] for r in RUNS])
def test_our_pipeline_samples_the_official_latents(parity, run):
    p = {k.split(".", 1)[1]: v for k, v in parity.items() if k.startswith(run["name"] + ".")}
    pipe = MiroPipeline.from_pretrained(str(FIX / "bundle"))
    n = run["num_images_per_prompt"]
    # the official pipeline repeats each prompt's rows (p0, p0, p1, p1): give the distinct rows
    text, mask = p["text_embeddings"][::n], p["text_mask"][::n]
    noise = torch.randn(p["noise"].shape, generator=torch.Generator().manual_seed(run["seed"]))
    assert torch.equal(noise, p["noise"])  # the same seed draws the same noise
    assert torch.equal(gamma_grid(run["num_inference_steps"]), p["gammas"])
    latents = pipe(prompt_embeds=text, prompt_attention_mask=mask, num_images_per_prompt=n,
                   generator=torch.Generator().manual_seed(run["seed"]), guidance_scale=run["guidance_scale"],
                   num_inference_steps=run["num_inference_steps"], reward_targets=run["reward_targets"],
                   negative_reward_targets=run["negative_reward_targets"], output_type="latent")
    assert latents.shape == p["latents"].shape
    # float32 reordering alone moves the official result by up to 4.8e-6 (README); a real mismatch
    # (a mask, a reward column, the self-conditioning residual) moves it by 2 to 22
    torch.testing.assert_close(latents, p["latents"], atol=2e-5, rtol=0)  # measured: <= 8.2e-6


def test_the_released_layout_loads_strictly_and_round_trips(tmp_path):
    cfg, state, uncond, _ = bundle.load(str(FIX / "bundle"))
    assert cfg.model.reward_keys[0] == "clip_score" and len(cfg.model.reward_keys) == 7
    assert cfg.model.qk_norm == "layer" and cfg.model.cond_heads == 16 and uncond.shape == (1, 16)
    assert cfg.flow.latent_scale == pytest.approx([7.8518, 5.8465, 6.8716, 5.3140], rel=1e-3)  # fp16 buffers
    pipe = MiroPipeline.from_pretrained(str(FIX / "bundle"))
    pipe.save_pretrained(tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    released = load_file(str(FIX / "bundle" / "model.safetensors"))
    assert set(ours) == set(released)  # the same names, masks included: the release's loader takes it
    for k, v in released.items():
        assert ours[k].shape == v.shape and ours[k].dtype in (v.dtype, torch.float32), k
    again = MiroPipeline.from_pretrained(str(tmp_path / "ours"))
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["network"]["coherence_keys"] == \
        json.loads((FIX / "bundle" / "config.json").read_text())["network"]["coherence_keys"]


@pytest.mark.parametrize("damage", ["extra", "missing", "shape", "mask"])
def test_a_bundle_that_does_not_match_is_refused_naming_the_key(tmp_path, damage):
    d = tmp_path / "b"
    shutil.copytree(FIX / "bundle", d)
    t = load_file(str(d / "model.safetensors"))
    if damage == "extra":
        t["network.something_new"] = torch.zeros(3)
        want = "network.something_new: not a parameter"
    elif damage == "missing":
        del t["network.latents"]
        want = "missing tensors: net.latents"
    elif damage == "shape":
        t["network.latents"] = torch.zeros(9, 32)
        want = r"network.latents: shape \(9, 32\), the network has \(8, 32\)"
    else:
        t["network.cond_mask"] = torch.zeros(12, dtype=torch.bool)
        want = "network.cond_mask: expected an all-true bool mask"
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(bundle.BundleError, match=want):
        bundle.load(str(d))
    with pytest.raises(bundle.BundleError, match="missing uncond_embedding.npy"):
        (d / "uncond_embedding.npy").unlink()
        bundle.load(str(d))


def test_outputs_as_diffusers_users_expect(tmp_path):
    """str or list prompts through the config's text encoder, images as PIL / pt / np."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
    from encoders import save_tiny_t5, save_tiny_vae

    cfg, state, uncond, _ = bundle.load(str(FIX / "bundle"))
    cfg.text_encoder.name_or_path = save_tiny_t5(str(tmp_path / "t5"), d_model=16)
    cfg.autoencoder.name_or_path = save_tiny_vae(str(tmp_path / "vae"))
    cfg.autoencoder.image_size = 64
    from miro_scale.flow import MiroFlowModel
    model = MiroFlowModel(cfg.model, cfg.flow)
    model.load_state_dict(state)
    MiroPipeline(cfg, model, torch.from_numpy(uncond)).save_pretrained(tmp_path / "b")
    pipe = MiroPipeline.from_pretrained(str(tmp_path / "b"))  # encoders from the bundle's references
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pil = pipe("a red cat", num_inference_steps=2, generator=g())
    assert len(pil) == 1 and pil[0].size == (64, 64)
    pt = pipe(["a red cat", "a dog"], num_inference_steps=2, generator=g(), num_images_per_prompt=2,
              output_type="pt", reward_targets={"aesthetic_score": 0.3})
    assert pt.shape == (4, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    first = pipe(["a red cat"], num_inference_steps=2, generator=g(), output_type="pt")
    as_pt = torch.from_numpy(np.asarray(pil[0])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(first[0], as_pt, atol=1 / 255 + 1e-6, rtol=0)
    arr = pipe("a red cat", num_inference_steps=2, generator=g(), output_type="np")
    assert arr.shape == (1, 64, 64, 3)
    with pytest.raises(KeyError, match="not among the model's reward keys"):
        pipe("x", reward_targets={"sharpness_score": 1.0}, num_inference_steps=1)


def test_hub_ids_and_variants_resolve_through_huggingface_hub(tmp_path, monkeypatch):
    """A hub id is fetched with huggingface_hub (only the three files); a variant is a subfolder."""
    import huggingface_hub

    shutil.copytree(FIX / "bundle", tmp_path / "no_clip")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = MiroPipeline.from_pretrained("nicolas-dufour/miro-ablations", variant="no_clip")
    assert calls == [("nicolas-dufour/miro-ablations", ["no_clip/config.json", "no_clip/model.safetensors",
                                                         "no_clip/uncond_embedding.npy"])]
    assert pipe.cfg.model.reward_keys[0] == "clip_score"
    with pytest.raises(bundle.BundleError, match="no such bundle directory"):
        MiroPipeline.from_pretrained(str(tmp_path / "missing.safetensors"))
