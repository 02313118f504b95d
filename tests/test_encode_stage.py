"""The encode stage (preprocessing/encode.py) on tiny random AutoencoderKL / T5 models saved locally."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rewards"))
sys.path.insert(0, str(ROOT / "preprocessing"))

pytest.importorskip("diffusers")


def test_vae_input_is_the_release_crop_and_resize():
    from torchvision import transforms

    from miro_scale.data.encode import vae_input

    a = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    side = min(im.size)
    ref = transforms.Compose([transforms.CenterCrop((side, side)), transforms.Resize(32), transforms.ToTensor(),
                              transforms.Normalize(mean=0.5, std=0.5)])(im)
    got = vae_input(im, 32)
    assert got.shape == (3, 32, 32) and torch.equal(got, ref)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from encoders import save_tiny_t5, save_tiny_vae
    from shards import write_shards

    w = tmp_path_factory.mktemp("enc")
    write_shards(str(w / "data"), num_shards=2, per_shard=5)
    cfg = {"extends": str(ROOT / "configs" / "tiny_cpu.json"),
           "model": {"latent_size": 4, "text_dim": 32},
           "data": {"caption_source": {"txt": 0.5, "short": 0.5}, "max_text_len": 6},
           "text_encoder": {"kind": "t5", "name_or_path": save_tiny_t5(str(w / "t5")), "max_length": 6},
           "autoencoder": {"kind": "sdxl_vae", "name_or_path": save_tiny_vae(str(w / "vae")), "image_size": 32}}
    (w / "config.json").write_text(json.dumps(cfg))
    import encode
    rc = encode.main(["--shards", str(w / "data"), "--config", str(w / "config.json"), "--out", str(w / "enc"),
                      "--batch-size", "3", "--num-workers", "1", "--precision", "fp32", "--no-progress"])
    assert rc == 0
    return w


def test_encoded_sidecar_holds_what_the_encoders_give(encoded):
    from miro_scale.config import load_config
    from miro_scale.data.decode import decode_image
    from miro_scale.data.encode import vae_input
    from miro_scale.data.sidecars import iter_members
    from miro_scale.data.tario import load_index, scan_tar
    from miro_scale.models.encoders import autoencoder_from_config, text_encoder_from_config

    w = encoded
    cfg = load_config(w / "config.json")
    ae = autoencoder_from_config(cfg, torch.device("cpu"))
    te = text_encoder_from_config(cfg, torch.device("cpu"), max_length=6)  # padded to 6, as training reads it
    src = str(w / "data" / "00001.tar")
    source = dict(iter_members(src, load_index(src)))
    enc_path = str(w / "enc" / "00001.encoded.tar")
    enc = dict(iter_members(enc_path, scan_tar(enc_path)))
    # broken images are left out; samples whose caption is unusable keep latents, not that embedding
    assert set(enc) == {k for k in source if not k.endswith(("_corrupt", "_empty", "_noimage"))}
    rec = json.loads((w / "enc" / "00001.encode.done.json").read_text())["counts"]
    assert rec["written"] == len(enc) and rec["skipped_keys"] == {
        "corrupt_image": ["s001_corrupt"], "empty_member": ["s001_empty"], "missing_image": ["s001_noimage"]}
    assert "text_emb.npy" not in enc["s001_notxt"] and "text_emb_short.npy" not in enc["s001_notxt"]
    key = next(k for k in enc if not k.startswith("s001"))
    m = {e: np.load(io.BytesIO(v)) for e, v in enc[key].items()}
    assert set(m) == {"latent_mean.npy", "latent_std.npy", "text_emb.npy", "text_emb_short.npy"}
    assert all(a.dtype == np.float16 for a in m.values())
    img = vae_input(decode_image(source[key]["jpg"], key), 32)
    mean, std = ae.encode(img[None])
    assert m["latent_mean.npy"].shape == (4, 4, 4)
    np.testing.assert_allclose(m["latent_mean.npy"], mean[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(m["latent_std.npy"], std[0].numpy(), atol=2e-3, rtol=2e-3)
    caption = source[key]["txt"].decode()
    emb, mask = te.encode([caption])
    n = int(mask.sum())
    assert m["text_emb.npy"].shape == (n, 32)  # trimmed to the caption's tokens
    np.testing.assert_allclose(m["text_emb.npy"], emb[0, :n].numpy(), atol=2e-3, rtol=2e-3)


def test_rerun_with_another_text_encoder_redoes_every_shard(encoded):
    import encode
    w = encoded
    before = (w / "enc" / "00000.encoded.tar").stat().st_mtime_ns
    assert encode.main(["--shards", str(w / "data"), "--config", str(w / "config.json"), "--out", str(w / "enc"),
                        "--no-progress", "--precision", "fp32"]) == 0
    assert (w / "enc" / "00000.encoded.tar").stat().st_mtime_ns == before  # same settings: skipped
    assert encode.main(["--shards", str(w / "data"), "--config", str(w / "config.json"), "--out", str(w / "enc"),
                        "--no-progress", "--precision", "fp32", "--set", "data.max_text_len=4"]) == 0
    assert (w / "enc" / "00000.encoded.tar").stat().st_mtime_ns != before
