"""Latent mode's host path: stored fp16 kept, workers hand batches over in shared memory, text padded
to the batch's longest caption on the host and to max_text_len on the device (device_batch), .npy
members read without a copy and without unpickling."""
import io

import numpy as np
import pytest
import torch

from miro_scale.data._testing import simple_dataset
from miro_scale.data.format import SampleError
from miro_scale.data.loader import WebDatasetLoader, _load_npy, device_batch

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
KEYS = ("clip_score", "aesthetic_score")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("lat")
    simple_dataset(str(d), 24, 8, keys=KEYS, latents=True, text_emb=True)  # text lengths 3..7, fp16
    return str(d)


def _loader(ds, workers):
    return WebDatasetLoader(ds, 6, mode="latent", text_embeddings=True, max_text_len=6, num_workers=workers,
                            drop_last=False, reward_keys=KEYS)


def test_worker_batches_come_in_shared_memory_and_match_in_process_ones(ds):
    inproc, worker = list(_loader(ds, 0)), list(_loader(ds, 1))
    assert [b["keys"] for b in inproc] == [b["keys"] for b in worker]
    for a, b in zip(inproc, worker):
        for name in ("latents", "latents_std", "text_embeddings", "text_mask", "rewards"):
            # a tensor made in a worker's shared memory crosses the pipe as a file descriptor
            assert b[name].is_shared(), name
            assert torch.equal(a[name], b[name]) and a[name].dtype == b[name].dtype, name
        assert b["latents"].dtype == b["text_embeddings"].dtype == torch.float16  # no host up-cast
        assert b["text_embeddings"].shape[1] == b["text_mask"].sum(1).max()  # padded to the longest only


def test_device_batch_pads_and_casts_like_the_host_used_to(ds):
    host = next(iter(_loader(ds, 0)))
    b = device_batch(host, "cpu", max_text_len=6)
    assert b["text_embeddings"].shape == (6, 6, 8) and b["text_embeddings"].dtype == torch.float32
    assert b["latents"].dtype == b["latents_std"].dtype == torch.float32
    n = host["text_embeddings"].shape[1]
    assert torch.equal(b["text_embeddings"][:, :n], host["text_embeddings"].float())
    assert not b["text_embeddings"][:, n:].any() and not b["text_mask"][:, n:].any()
    assert b["keys"] == host["keys"] and torch.equal(b["rewards"], host["rewards"])
    with pytest.raises(ValueError, match="max_text_len"):
        device_batch(host, "cpu", max_text_len=n - 1)


def test_the_trainer_stream_gets_padded_float32_batches(ds):
    from miro_scale.config import config_from_dict
    from miro_scale.train.data import ShardBatchStream
    from tests.conftest import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(
        model={"latent_size": 4, "text_dim": 8, "reward_keys": list(KEYS)},
        data={"source": "shards", "shards": ds, "mode": "latent", "precomputed_text": True, "max_text_len": 10,
              "num_workers": 0},
        train={"micro_batch_size": 4, "global_batch_size": 4}))
    stream = ShardBatchStream(cfg, 0, 1, torch.device("cpu"))
    b = next(stream)
    assert b["text_embeddings"].shape == (4, 10, 8) and b["text_embeddings"].dtype == torch.float32
    assert b["text_mask"].shape == (4, 10) and b["latents"].dtype == torch.float32


def _npy(a, **kw) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False, **kw)
    return buf.getvalue()


def test_npy_members_are_views_of_the_bytes_and_never_unpickled():
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    data = _npy(a)
    got = _load_npy(data, "s:k", "x.npy")
    assert np.array_equal(got, a) and got.dtype == np.float16
    assert np.shares_memory(got, np.frombuffer(data, np.uint8))  # no copy
    for other in (np.asfortranarray(a), a.astype(">f4")):
        assert np.array_equal(_load_npy(_npy(other), "s:k", "x.npy"), a)
    assert np.array_equal(_load_npy(_npy(a, version=(2, 0)), "s:k", "x.npy"), a)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for bad in (buf.getvalue(), data[:-3], b"not an npy"):
        with pytest.raises(SampleError) as e:
            _load_npy(bad, "s:k", "x.npy")
        assert e.value.reason == "bad_npy"
