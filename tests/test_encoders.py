"""Text encoder and autoencoder interfaces, on tiny random models of the real architectures built locally."""
import importlib.util

import pytest
import torch

from miro_scale.models.encoders import (IdentityAutoencoder, SDXLAutoencoder, SmallTextEncoder, build_autoencoder,
                                        build_text_encoder)

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_t5_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "photo": 4, "of": 5, "red": 6, "cat": 7, "dog": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_t5_text_encoder_loads_from_a_local_path(tiny_t5_dir):
    enc = build_text_encoder("t5", str(tiny_t5_dir), max_length=8)
    emb, mask = enc.encode(["a photo of a red cat", "a dog"])
    assert emb.shape == (2, 8, 32) and enc.dim == 32
    assert mask.tolist()[1][:3] == [True, True, False]
    assert torch.all(emb[~mask] == 0)
    other, _ = enc.encode(["a photo of a red dog", "a dog"])
    assert not torch.allclose(emb[0], other[0]) and torch.allclose(emb[1], other[1], atol=1e-6)


def test_small_text_encoder_is_deterministic_and_masks_padding():
    a, b = SmallTextEncoder(dim=16, seed=3), SmallTextEncoder(dim=16, seed=3)
    e1, m1 = a.encode(["two red circles", "a blue square left of a green triangle"])
    e2, _ = b.encode(["two red circles", "a blue square left of a green triangle"])
    torch.testing.assert_close(e1, e2)
    assert m1.sum(1).tolist() == [3, 8] and torch.all(e1[~m1] == 0)


def test_sdxl_vae_wrapper_on_a_tiny_autoencoderkl(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                  sample_size=16)
    vae.save_pretrained(tmp_path)
    ae = SDXLAutoencoder(str(tmp_path))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = ae.encode(images)
    assert mean.shape == (2, 4, 8, 8) and (std > 0).all()
    out = ae.decode(mean)
    assert out.shape == images.shape and out.abs().max() <= 1


def test_identity_autoencoder_and_builders():
    ae = build_autoencoder("identity", "", channels=3)
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    mean, std = ae.encode(x)
    assert torch.equal(mean, x) and torch.all(std == 0) and torch.equal(ae.decode(mean), x)
    assert isinstance(ae, IdentityAutoencoder)
    with pytest.raises(ValueError, match="autoencoder.kind"):
        build_autoencoder("vqgan", "")
    with pytest.raises(ValueError, match="text_encoder.kind"):
        build_text_encoder("clip", "", 77)


def test_our_kernels_package_does_not_pose_as_hugging_face_kernels():
    """transformers probes a top-level `kernels` package for hub kernels; ours must not pass."""
    assert importlib.util.find_spec("kernels") is not None
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()
    import kernels

    assert not hasattr(kernels, "__version__")
