"""Meta-device build, materialisation and streamed strict checkpoint loading (loading.py), and the
rewards that use them: nothing left on meta, the requested dtype, scores bit-identical to the saved
model, strict errors naming keys, host memory near one copy of the model."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from miro_scale.rewards.loading import (CheckpointError, init_on_meta, load_checkpoint_files, materialize,
                                        weight_files)

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
CAPS = ["a red circle", "two blue squares left of a green star"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("pos", torch.arange(6), persistent=False)
        self.register_buffer("stat", torch.ones(4))


def _tensors(m):
    return list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False))


def test_init_on_meta_and_materialize():
    with init_on_meta():
        m = Net()
    assert all(p.is_meta for p in m.parameters())
    assert torch.equal(m.pos, torch.arange(6)) and torch.equal(m.stat, torch.ones(4))  # buffers computed
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone
    materialize(m, "cpu", torch.bfloat16, keep_fp32=("scale",))
    assert not any(t.is_meta for _, t in _tensors(m))
    assert {n: t.dtype for n, t in _tensors(m)} == {
        "emb.weight": torch.bfloat16, "out.weight": torch.bfloat16, "norm.weight": torch.bfloat16,
        "norm.bias": torch.bfloat16, "scale": torch.float32, "pos": torch.int64, "stat": torch.bfloat16}
    assert m.out.weight is m.emb.weight and isinstance(m.scale, nn.Parameter)
    assert torch.equal(m.pos, torch.arange(6))


def _save(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.clone() for k, v in sd.items()}, str(path))  # tied tensors are saved as copies
    return path


def test_streamed_load_is_strict_and_checks_tied_copies(tmp_path):
    src = Net()
    sd = {k: v.clone() for k, v in src.state_dict().items()}  # emb.weight and out.weight, both
    # sharded: one checkpoint in two files, safetensors and a torch pickle
    _save({k: sd[k] for k in ("emb.weight", "scale")}, tmp_path / "a.safetensors")
    torch.save({k: sd[k] for k in ("out.weight", "norm.weight", "norm.bias", "stat")}, tmp_path / "b.bin")
    files = [tmp_path / "a.safetensors", tmp_path / "b.bin"]
    with init_on_meta():
        m = Net()
    materialize(m)
    loaded = load_checkpoint_files(m, files)
    assert loaded == set(sd) and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())

    def load(state, **kw):
        _save(state, tmp_path / "c.safetensors")
        with init_on_meta():
            m = Net()
        return load_checkpoint_files(materialize(m), [tmp_path / "c.safetensors"], source="ckpt", **kw)

    one = {k: v for k, v in sd.items() if k != "out.weight"}
    assert load(one) == set(sd)  # one name of a tied tensor loads it
    with pytest.raises(CheckpointError, match=r"out.weight \(differs from emb.weight\)"):
        load(dict(sd, **{"out.weight": sd["emb.weight"] + 1}))
    alias = dict(one, **{"embed.weight": sd["emb.weight"]})
    with pytest.raises(CheckpointError, match="1 unexpected key.*embed.weight"):
        load(alias)
    assert load(alias, aliases={"embed.weight": "emb.weight"}) == set(sd)
    with pytest.raises(CheckpointError, match=r"embed.weight \(differs from emb.weight\)"):
        load(dict(alias, **{"embed.weight": sd["emb.weight"] * 2}), aliases={"embed.weight": "emb.weight"})
    with pytest.raises(CheckpointError, match=r"embed.weight: checkpoint \(2, 4\) vs model \(10, 4\)"):
        load(dict(alias, **{"embed.weight": sd["emb.weight"][:2]}), aliases={"embed.weight": "emb.weight"})
    bad = {k: v for k, v in one.items() if k != "norm.bias"}
    bad.update({"norm.weight": torch.zeros(5), "extra": torch.zeros(1), "old.position_ids": torch.zeros(1)})
    with pytest.raises(CheckpointError) as e:
        load(bad, ignore=("*position_ids",))
    msg = str(e.value)
    assert msg.startswith("ckpt:") and "missing key(s): norm.bias" in msg and "unexpected key(s): extra" in msg
    assert "norm.weight: checkpoint (5,) vs model (4,)" in msg
    assert load({k: v for k, v in one.items() if k != "stat"}, optional=("stat",)) == set(sd) - {"stat"}
    assert load({"x." + k: v for k, v in one.items()}, rename=lambda k: k[2:]) == set(sd)


def test_weight_files_prefers_safetensors_and_reads_indexes(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                        "c": "model-00001-of-00002.safetensors"}}))
    assert weight_files(tmp_path) == [tmp_path / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]


def _floating(m):
    return {n: t.dtype for n, t in _tensors(m) if t.is_floating_point()}


def test_pickscore_streamed_load_dtype_and_bit_identical_scores(tmp_path):
    from miro_scale.rewards.hf_clip import PickScoreReward, tiny_clip_config
    src = PickScoreReward(config=tiny_clip_config(), tokenizer=None)
    src.model.save_pretrained(tmp_path / "pick")
    r = PickScoreReward(weights=str(tmp_path / "pick"), tokenizer=None)
    assert torch.equal(r.score(X, CAPS), src.score(X, CAPS))
    torch.save(src.model.state_dict(), tmp_path / "pick" / "pytorch_model.bin")  # a torch pickle instead
    (tmp_path / "pick" / "model.safetensors").unlink()
    assert torch.equal(PickScoreReward(weights=str(tmp_path / "pick"), tokenizer=None).score(X, CAPS),
                       src.score(X, CAPS))
    b = PickScoreReward(weights=str(tmp_path / "pick"), tokenizer=None, dtype=torch.bfloat16)
    dtypes = _floating(b.model)
    assert not any(t.is_meta for _, t in _tensors(b.model))
    assert dtypes.pop("logit_scale") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}
    assert b.model.logit_scale.item() == src.model.logit_scale.item()
    assert torch.allclose(b.score(X, CAPS), src.score(X, CAPS), atol=0.1)


def test_image_reward_streamed_load_dtype_and_bit_identical_scores(tmp_path):
    from miro_scale.rewards import image_reward as ir
    from miro_scale.rewards.registry import build_reward
    src = build_reward("image_reward", "tiny")
    sd = dict(src.model.state_dict())
    sd["blip.text_proj.weight"] = torch.zeros(256, 32)  # the released file's unused projections
    torch.save({"state_dict": sd}, tmp_path / "ImageReward.pt")
    kw = dict(vision_config=ir.BlipVisionConfig(patch_size=32, width=32, layers=2, heads=2),
              text_config=ir.BlipTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, encoder_width=32, max_position_embeddings=64),
              tokenizer=src.tokenizer, weights=str(tmp_path / "ImageReward.pt"), filename=None)
    assert torch.equal(ir.ImageRewardReward(**kw).score(X, CAPS), src.score(X, CAPS))
    b = ir.ImageRewardReward(dtype=torch.bfloat16, **kw)
    assert not any(t.is_meta for _, t in _tensors(b.model))
    dtypes = _floating(b.model)
    head = {n: dtypes.pop(n) for n in list(dtypes) if n.startswith("mlp.")}
    assert set(head.values()) == {torch.float32} and set(dtypes.values()) == {torch.bfloat16}
    assert torch.isfinite(b.score(X, CAPS)).all()


def test_vqascore_streamed_load_dtype(tmp_path):
    from test_rewards_vqascore import X as X336, _save_released_layout

    from miro_scale.rewards import vqascore as vq
    from miro_scale.rewards.registry import build_reward
    r = build_reward("vqa", "tiny")
    _save_released_layout(r, tmp_path / "ck")
    _, vis = vq.tiny_configs()
    for dtype in (torch.bfloat16, torch.float16):
        m = vq.VQAScoreReward(weights=str(tmp_path / "ck"), vision_config=vis, tokenizer=r.tokenizer,
                              dtype=dtype).model
        assert not any(t.is_meta for _, t in _tensors(m))
        kept = {n for n, d in _floating(m).items() if d == torch.float32}
        assert set(_floating(m).values()) <= {dtype, torch.float32}
        # fp16 only: FlanT5's feed-forward output projections (4 = 2 encoder + 2 decoder blocks)
        assert len(kept) == (4 if dtype == torch.float16 else 0)
        assert all(n.endswith(".DenseReluDense.wo.weight") for n in kept)
    r2 = vq.VQAScoreReward(weights=str(tmp_path / "ck"), vision_config=vis, tokenizer=r.tokenizer)
    assert torch.equal(r2.score(X336, CAPS), r.score(X336, CAPS))


PEAK_RSS = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    from miro_scale.rewards.loading import init_on_meta, load_checkpoint_files, materialize
    def build():
        return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with init_on_meta():
        m = build()
    materialize(m, "cpu", torch.float32)
    load_checkpoint_files(m, [sys.argv[1]])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
""")


def test_streamed_load_holds_about_one_copy_of_the_model(tmp_path):
    """Peak host memory while loading a 256 MiB checkpoint: the model plus about one tensor (a
    load_state_dict of the whole file would need two copies)."""
    from safetensors.torch import save_file
    m = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    size = sum(p.numel() * 4 for p in m.parameters())
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    del m
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "m.safetensors")], capture_output=True,
                         text=True, check=True)
    peak = int(out.stdout.split()[-1])
    assert peak < 1.5 * size, (peak, size)


def test_open_clip_rewards_stream_into_the_requested_dtype(tmp_path):
    from miro_scale.rewards.openclip_models import AestheticReward, HPSv2Reward, build_open_clip
    from miro_scale.rewards.registry import TINY_OPEN_CLIP
    hps = HPSv2Reward(clip_config=TINY_OPEN_CLIP, random_init=True)
    _save(hps.clip.state_dict(), tmp_path / "hps.safetensors")
    got = HPSv2Reward(clip_config=TINY_OPEN_CLIP, weights=str(tmp_path / "hps.safetensors"), dtype=torch.bfloat16)
    dtypes = _floating(got.clip)
    assert not any(t.is_meta for _, t in _tensors(got.clip))
    assert dtypes.pop("logit_scale") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}
    assert torch.allclose(got.score(X, CAPS), hps.score(X, CAPS), atol=0.05)
    # the aesthetic predictor reads only the image tower: its checkpoint's text tower is not loaded
    cfg = dict(TINY_OPEN_CLIP, quick_gelu=True)
    src = AestheticReward(clip_config=cfg, random_init=True)
    full = build_open_clip(cfg)
    full.visual.load_state_dict(src.clip.visual.state_dict())
    torch.save(full.state_dict(), tmp_path / "clip.pt")
    torch.save(src.head.state_dict(), tmp_path / "head.pth")
    a = AestheticReward(clip_config=cfg, clip_weights=str(tmp_path / "clip.pt"), head_weights=str(tmp_path / "head.pth"),
                        dtype=torch.bfloat16)
    assert not any(n.startswith(("transformer.", "token_embedding.")) for n, _ in _tensors(a.clip))
    assert {t.dtype for _, t in _tensors(a.head)} == {torch.float32}  # the score's own layers stay fp32
    assert a.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert torch.allclose(a.score(X), src.score(X), rtol=0.05, atol=0.05)
