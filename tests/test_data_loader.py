"""Torch (PIL) loader: batch format, exactly-once over ranks x workers, seeded shuffles, exact resume,
latents and text embeddings."""
import collections

import numpy as np
import pytest
import torch

from miro_scale.data._testing import simple_dataset
from miro_scale.data.loader import WebDatasetLoader, device_batch
from miro_scale.data.plan import epoch_order, rank_chunks

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    simple_dataset(str(d), 53, 10, latents=True, text_emb=True)  # 6 shards, the last short
    return str(d)


def keys_of(loader):
    return [k for b in loader for k in b["keys"]]


def test_batch_format(ds):
    L = WebDatasetLoader(ds, 8, resolution=32, reward_keys=["b", "a"], num_workers=0, drop_last=False)
    b = next(iter(L))
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["rewards"].shape == (8, 2) and b["rewards"].dtype == torch.float32
    assert len(b["text"]) == len(b["keys"]) == 8
    for k, t, r in zip(b["keys"], b["text"], b["rewards"]):
        i = int(k[1:])
        assert t == f"caption {i}"
        # reward order follows reward_keys: "b" first (bin (7i+3)%64), then "a" (bin 7i%64)
        assert r[0].item() == pytest.approx(((i * 7 + 3) % 64) / 63)
        assert r[1].item() == pytest.approx(((i * 7) % 64) / 63)
    assert len(L) == 7


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 2), (4, 3)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exactly_once_over_ranks_and_workers(ds, world, workers, drop_last):
    B = 4
    seen = collections.Counter()
    per_rank = []
    for rank in range(world):
        L = WebDatasetLoader(ds, B, resolution=16, reward_keys=["a"], rank=rank, world_size=world,
                             num_workers=workers, drop_last=drop_last, seed=3)
        ks = keys_of(L)
        per_rank.append(len(ks))
        seen.update(ks)
        assert len(L) == (len(ks) + B - 1) // B
    assert max(seen.values()) == 1, "a sample was seen twice in one epoch"
    if drop_last:
        assert len(set(per_rank)) == 1 and per_rank[0] % B == 0
        assert sum(per_rank) == 53 // world // B * B * world
    else:
        assert sum(seen.values()) == 53


def test_order_independent_of_workers_and_seeded_per_epoch(ds):
    runs = {}
    for w in (0, 1, 3):
        L = WebDatasetLoader(ds, 5, resolution=16, num_workers=w, drop_last=False, seed=7)
        runs[w] = (keys_of(L), keys_of(L))  # epochs 0 and 1
    assert runs[0] == runs[1] == runs[3]
    e0, e1 = runs[0]
    assert sorted(e0) == sorted(e1) and e0 != e1, "epochs must be shuffled differently"
    L2 = WebDatasetLoader(ds, 5, resolution=16, num_workers=0, drop_last=False, seed=8)
    assert keys_of(L2) != e0
    L3 = WebDatasetLoader(ds, 5, resolution=16, num_workers=0, drop_last=False, shuffle=False)
    assert keys_of(L3) == sorted(e0)


def test_shuffle_mixes_shards_within_batches(ds):
    L = WebDatasetLoader(ds, 16, resolution=16, num_workers=0, shuffle_chunk=4, seed=1)
    b = next(iter(L))
    shards = {int(k[1:]) // 10 for k in b["keys"]}
    assert len(shards) >= 3


@pytest.mark.parametrize("stop_after,workers_after", [(3, 0), (5, 2)])
def test_resume_mid_epoch_exactly(ds, stop_after, workers_after):
    mk = lambda w: WebDatasetLoader(ds, 4, resolution=16, reward_keys=["a"], num_workers=w,  # noqa: E731
                                    drop_last=False, seed=11, mode="latent")
    ref = mk(0)
    ref_batches = [b for b in ref] + [b for b in ref]  # two epochs
    L = mk(2)
    L.set_epoch(0)
    it = iter(L)
    got = [next(it) for _ in range(stop_after)]
    state = L.state_dict()
    assert state["batch_in_epoch"] == stop_after and state["epoch"] == 0
    del it
    R = mk(workers_after)
    R.load_state_dict(state)
    got += [b for b in R] + [b for b in R]
    assert [b["keys"] for b in got] == [b["keys"] for b in ref_batches]
    for a, b in zip(got, ref_batches):  # sampled latents are reproducible too
        assert torch.equal(a["latents"], b["latents"])
    assert R.epoch == 2


def test_state_mismatch_is_refused(ds):
    L = WebDatasetLoader(ds, 4, resolution=16, num_workers=0)
    st = L.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        WebDatasetLoader(ds, 8, resolution=16, num_workers=0).load_state_dict(st)


def test_latents_and_text_embeddings(ds):
    L = WebDatasetLoader(ds, 6, mode="latent", text_embeddings=True, max_text_len=6,
                         latent_std=False, num_workers=0, drop_last=False)
    for host in L:
        # the host keeps the stored fp16 and pads text to the batch's longest caption only ...
        assert "image" not in host and "latents_std" not in host
        assert host["latents"].dtype == host["text_embeddings"].dtype == torch.float16
        longest = max(min(3 + int(k[1:]) % 5, 6) for k in host["keys"])
        assert host["text_embeddings"].shape[1:] == (longest, 8) and host["text_mask"].shape[1] == longest
        # ... and device_batch gives the trainer float32, padded to max_text_len
        b = device_batch(host, "cpu", max_text_len=6)
        assert b["latents"].shape[1:] == (4, 4, 4) and b["latents"].dtype == torch.float32
        assert b["text_embeddings"].shape[1:] == (6, 8) and b["text_embeddings"].dtype == torch.float32
        assert b["text_mask"].dtype == torch.bool
        for k, lat, emb, m in zip(b["keys"], b["latents"], b["text_embeddings"], b["text_mask"]):
            i = int(k[1:])
            assert torch.all(lat == i)
            n = 3 + i % 5
            assert m.sum().item() == min(n, 6) and m[:min(n, 6)].all()
            assert torch.all(emb[m] == i) and torch.all(emb[~m] == 0)
    S = WebDatasetLoader(ds, 6, mode="latent", num_workers=0, seed=0)  # the posterior std too
    b = next(iter(S))
    assert torch.all(b["latents_std"] == 0.5) and b["latents_std"].shape == b["latents"].shape


def test_plan_partitions():
    # ranks' chunks tile all chunks (no drop) / whole rounds of full chunks (drop)
    for n in (0, 1, 7, 100, 101):
        for world in (1, 2, 3, 8):
            chunks = sorted(c for r in range(world) for c in rank_chunks(n, r, world, 4, False))
            assert chunks == list(range((n + 3) // 4))
            d = [len(rank_chunks(n, r, world, 4, True)) for r in range(world)]
            assert len(set(d)) == 1 and d[0] * world * 4 <= n < (d[0] + 1) * world * 4


def test_step_contents_independent_of_world_size_and_elastic_resume(ds):
    """2 ranks x 1 batch per step == 1 rank x 2 accumulated batches; resume 1 -> 2 ranks."""
    mk = lambda r, w: WebDatasetLoader(ds, 4, resolution=16, rank=r, world_size=w,  # noqa: E731
                                       num_workers=0, seed=5)
    one = [b["keys"] for b in mk(0, 1)]
    r0, r1 = [b["keys"] for b in mk(0, 2)], [b["keys"] for b in mk(1, 2)]
    steps_two_ranks = [set(a) | set(b) for a, b in zip(r0, r1)]
    steps_accum = [set(one[2 * s]) | set(one[2 * s + 1]) for s in range(len(one) // 2)]
    assert steps_two_ranks == steps_accum
    L = mk(0, 1)
    it = iter(L)
    for _ in range(4):
        next(it)
    st = L.state_dict()
    del it
    R0, R1 = mk(0, 2), mk(1, 2)
    R0.load_state_dict(st)
    R1.load_state_dict(st)
    assert R0.batch_in_epoch == 2
    rest = [set(a["keys"]) | set(b["keys"]) for a, b in zip(R0, R1)]
    assert rest == steps_accum[2:]
    L.batch_in_epoch = 3
    with pytest.raises(ValueError, match="multiple of world_size"):
        mk(0, 2).load_state_dict(L.state_dict())


def test_epoch_order_is_a_permutation(ds):
    L = WebDatasetLoader(ds, 4, num_workers=0)
    o = epoch_order(L.index, 0, 5, True, 3)
    assert sorted(o.tolist()) == list(range(53))
    assert not np.array_equal(o, epoch_order(L.index, 0, 6, True, 3))
    assert np.array_equal(o, epoch_order(L.index, 0, 5, True, 3))


def test_caption_mix_with_per_caption_rewards(tmp_path):
    from miro_scale.data.format import reward_entry
    from miro_scale.data.writer import ShardWriter

    from miro_scale.data._testing import solid_jpeg

    with ShardWriter(str(tmp_path), max_samples=50) as w:
        for i in range(40):
            w.write(f"k{i:03d}", {"jpg": solid_jpeg((9, 9, 9)), "txt": f"short {i}", "json": {
                "captions": {"long": f"long {i}"},
                "rewards": {"r": reward_entry(0.0, 0, 64)},
                "rewards_by_caption": {"long": {"r": reward_entry(1.0, 63, 64)}}}})
    L = WebDatasetLoader(str(tmp_path), 40, resolution=16, reward_keys=["r"], num_workers=0,
                         caption_source={"txt": 0.5, "long": 0.5}, seed=0)
    pick0 = {k: (t, r.item()) for b in L for k, t, r in zip(b["keys"], b["text"], b["rewards"][:, 0])}
    pick1 = {k: (t, r.item()) for b in L for k, t, r in zip(b["keys"], b["text"], b["rewards"][:, 0])}
    for picks in (pick0, pick1):
        assert all((t.startswith("long") and r == 1.0) or (t.startswith("short") and r == 0.0)
                   for t, r in picks.values())
        n_long = sum(t.startswith("long") for t, _ in picks.values())
        assert 8 <= n_long <= 32
    assert pick0 != pick1  # drawn again each epoch
    L2 = WebDatasetLoader(str(tmp_path), 40, resolution=16, reward_keys=["r"], num_workers=0,
                          caption_source={"txt": 0.5, "long": 0.5}, seed=0)
    assert {k: v for b in L2 for k, v in zip(b["keys"], zip(b["text"], b["rewards"][:, 0].tolist()))} == pick0


def test_duplicate_shard_paths_are_used_once(ds, caplog):
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(ds, "*.tar")))
    L = WebDatasetLoader(paths + paths[:2], 8, resolution=16, num_workers=0, drop_last=False)
    ks = keys_of(L)
    assert len(ks) == len(set(ks)) == 53
    assert "more than once" in caplog.text


def test_caption_mix_with_per_caption_embeddings(tmp_path):
    from miro_scale.data.format import reward_entry
    from miro_scale.data.writer import ShardWriter

    with ShardWriter(str(tmp_path), max_samples=50) as w:
        for i in range(30):
            w.write(f"k{i:03d}", {
                "latent_mean.npy": np.zeros((4, 2, 2), np.float16), "txt": f"short {i}",
                "json": {"captions": {"long": f"long {i}"}, "rewards": {"r": reward_entry(0.0, 5, 64)}},
                "text_emb.npy": np.full((2, 4), 1, np.float16),
                "text_emb_long.npy": np.full((5, 4), 2, np.float16)})
    L = WebDatasetLoader(str(tmp_path), 30, mode="latent", latent_std=False, text_embeddings=True,
                         max_text_len=8, reward_keys=["r"], num_workers=0,
                         caption_source={"txt": 0.5, "long": 0.5})
    b = next(iter(L))
    for t, e, m in zip(b["text"], b["text_embeddings"], b["text_mask"]):
        want = (2, 5) if t.startswith("long") else (1, 2)
        assert m.sum().item() == want[1] and torch.all(e[m] == want[0])
    assert {t.split()[0] for t in b["text"]} == {"short", "long"}


def test_stream_runs_across_epochs(ds):
    L = WebDatasetLoader(ds, 8, resolution=16, num_workers=0, seed=2)  # 6 full batches per epoch
    it = L.stream()
    got = [next(it)["keys"] for _ in range(15)]
    assert L.epoch == 2 and L.batch_in_epoch == 3
    ref = WebDatasetLoader(ds, 8, resolution=16, num_workers=0, seed=2)
    want = [b["keys"] for b in ref] + [b["keys"] for b in ref] + [b["keys"] for b in ref][:3]
    assert got == want


def test_stream_refuses_a_rank_with_no_batches(tmp_path):
    """An endless stream over an epoch plan with nothing for this rank would spin forever."""
    simple_dataset(str(tmp_path), 3, 3)
    loader = WebDatasetLoader(str(tmp_path), 8, resolution=16, num_workers=0, drop_last=True)
    with pytest.raises(RuntimeError, match=r"this rank \(0 of 1\) gets no batches from 3 samples with batch_size 8"):
        next(loader.stream())
