import math

import pytest
import torch

from miro_scale.config import OptimConfig
from miro_scale.flow import MiroFlowModel
from miro_scale.train.optim import EMA, build_optimizer, lr_multiplier, parameter_groups


def lamb_published_step(params, grads, state, step, lr, beta1, beta2, eps, weight_decay):
    """The LAMB update as published and released: bias-corrected Adam step, L2 decay added to it,
    trust ratio ||w|| / ||update|| (1 where either norm is 0), applied only when decay is on."""
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
        trust = 1.0
        if weight_decay > 0:
            update = update + weight_decay * p
            w_norm, u_norm = p.norm(), update.norm()
            trust = (w_norm / u_norm) if (w_norm > 0 and u_norm > 0) else 1.0
        p.sub_(lr * trust * update)


def test_lamb_matches_the_published_update_rule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    decay_ids = {id(p) for p in opt.param_groups[0]["params"]}
    wd = [cfg.weight_decay if id(p) in decay_ids else 0.0 for p in model.parameters()]
    states = [{} for _ in reference]
    for step in range(1, 6):
        x = torch.randn(4, 6)
        opt.zero_grad()
        model(x).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, (p, g) in enumerate(zip(reference, grads)):
            lamb_published_step([p], [g], states[i], step, cfg.lr, 0.9, 0.999, cfg.eps, wd[i])
    for ours, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)


def test_groups_are_the_releases(tiny_cfg):
    """Norms and biases get neither decay nor trust ratio; the plain nn.Parameters (latents,
    positional embeddings, registers, layer scales) and the whole loss-weighting head get both."""
    cfg = tiny_cfg()
    model = MiroFlowModel(cfg.model, cfg.flow)
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for expected in ["net.data_ln.weight", "net.patch_extractor.bias",
                     "net.rin_blocks.0.retrieve_cond.ca.q_norm.weight", "net.transformers_blocks.0.initial_ln.weight"]:
        assert expected in no_decay_names, expected
    for expected in ["net.data_pos_embedding", "net.latents", "net.text_registers",
                     "net.coherence_positional_embedding", "net.transformers_blocks.0.layer_scale_1",
                     "net.patch_extractor.weight", "net.rin_blocks.0.writer_ca.ca.kv.weight",
                     "logvar_proj.1.weight", "logvar_proj.1.bias"]:
        assert expected in decay_names, expected
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert len(no_decay_names) + len(decay_names) == len(list(model.parameters()))


def test_warmup_then_cosine_with_rate():
    assert lr_multiplier(0, 100, 1000, 0.8) == 1.0  # the release's first update: the full rate
    assert lr_multiplier(1, 100, 1000, 0.8) == 0.01
    assert lr_multiplier(50, 100, 1000, 0.8) == 0.5
    assert lr_multiplier(100, 100, 1000, 0.8) == 1.0
    assert math.isclose(lr_multiplier(1000, 100, 1000, 0.8), 0.5 * (1 + math.cos(0.8 * math.pi)))


def test_ema_tracks_parameters():
    model = torch.nn.Linear(2, 2)
    ema = EMA(dict(model.named_parameters()), decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(dict(model.named_parameters()), step=1)
    torch.testing.assert_close(ema.shadow["weight"], start + 1.0)
    target = torch.nn.Linear(2, 2)
    ema.copy_to(dict(target.named_parameters()))
    torch.testing.assert_close(target.weight.detach(), start + 1.0)


LAMB_ARGS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
# timm's Lamb as the release configured it: the reference
TIMM_LAMB_ARGS = dict(LAMB_ARGS, max_grad_norm=None, trust_clip=False, always_adapt=False)


def lamb_problem(steps=5):
    """Three parameters (one with no decay) and the gradients of `steps` steps."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(4, 4, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]
    return params, grads


def sharded_lamb_rank(rank, world, init_file, out):
    """One rank of ZeRO-style LAMB: every parameter split across the ranks of one flat, padded buffer."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from miro_scale.train.optim import Lamb

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params, grads = lamb_problem()
    decayed, plain = [0, 2], [1]
    flats, chunks = {}, {}
    for g, members in enumerate((decayed, plain)):
        flat = torch.cat([params[i].reshape(-1) for i in members])
        chunk = math.ceil(flat.numel() / world)
        chunks[g] = (members, chunk, flat.numel())
        flats[g] = F.pad(flat, (0, chunk * world - flat.numel()))[rank * chunk:(rank + 1) * chunk].clone()
    partitions = {}
    for g, (members, chunk, _) in chunks.items():
        slices, offset = [], 0
        for index, i in enumerate(members):
            lo, hi = max(offset, rank * chunk), min(offset + params[i].numel(), (rank + 1) * chunk)
            if lo < hi:
                slices.append((index, lo - rank * chunk, hi - lo))
            offset += params[i].numel()
        partitions[id(flats[g])] = (g, slices)
    opt = Lamb([{"params": [flats[0]], "weight_decay": 0.1}, {"params": [flats[1]], "weight_decay": 0.0}],
                      **LAMB_ARGS)
    opt.shard(lambda flat: partitions[id(flat)], [len(decayed), len(plain)], None)
    for step_grads in grads:
        for g, (members, chunk, numel) in chunks.items():
            flat = torch.cat([step_grads[i].reshape(-1) for i in members])
            flats[g].grad = F.pad(flat, (0, chunk * world - numel))[rank * chunk:(rank + 1) * chunk].clone()
        opt.step()
    result = {}
    for g, (members, chunk, numel) in chunks.items():
        parts = [torch.empty(chunk) for _ in range(world)]
        dist.all_gather(parts, flats[g])
        full, offset = torch.cat(parts), 0
        for i in members:
            result[i] = full[offset:offset + params[i].numel()].view(params[i].shape)
            offset += params[i].numel()
    if rank == 0:
        torch.save([result[i] for i in range(len(params))], out)
    dist.destroy_process_group()


def test_sharded_lamb_on_partitions_matches_lamb_on_whole_parameters(tmp_path):
    """ZeRO's flat partitions, each parameter split across 2 gloo processes: the per-parameter trust
    ratio from all-reduced partial norms gives one-process LAMB's weights (observed ~1e-7)."""
    from timm.optim import Lamb

    out = tmp_path / "sharded.pt"
    torch.multiprocessing.spawn(sharded_lamb_rank, args=(2, tmp_path / "store", out), nprocs=2)
    params, grads = lamb_problem()
    opt = Lamb([{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}],
               **TIMM_LAMB_ARGS)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad
        opt.step()
    sharded = torch.load(out, weights_only=True)
    diff = max((a - b).abs().max().item() for a, b in zip(sharded, params))
    print(f"sharded LAMB max diff {diff:.2e}")
    assert diff <= 1e-5, diff


def timm_reference(steps=5):
    """timm's Lamb (the release's optimizer) on lamb_problem: the weights after `steps` steps."""
    from timm.optim import Lamb as TimmLamb

    params, grads = lamb_problem(steps)
    opt = TimmLamb([{"params": [params[0], params[2]], "weight_decay": 0.1},
                    {"params": [params[1]], "weight_decay": 0.0}], **TIMM_LAMB_ARGS)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad
        opt.step()
    return params


def test_lamb_on_whole_tensors_matches_timm_and_skips_non_finite_steps_on_the_device():
    """Same weights as timm's Lamb; a step whose found_inf is 1 (NaN and inf gradients) changes
    neither weights, moments nor the step count, and the host is never asked."""
    from miro_scale.train.optim import Lamb

    params, grads = lamb_problem()
    opt = Lamb([{"params": [params[0], params[2]], "weight_decay": 0.1},
                {"params": [params[1]], "weight_decay": 0.0}], **LAMB_ARGS)
    for n, step_grads in enumerate(grads):
        for p, grad in zip(params, step_grads):
            p.grad = grad
        opt.found_inf = torch.zeros(())
        opt.step()
        if n == 2:  # a poisoned step in the middle: skipped as if it never happened
            before = [p.clone() for p in params] + [t.clone() for s in opt.state.values() for t in s.values()]
            for p in params:
                p.grad = torch.full_like(p, float("nan"))
            params[1].grad[0] = float("inf")
            opt.found_inf = torch.ones(())
            opt.step()
            after = list(params) + [t for s in opt.state.values() for t in s.values()]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert [g["step"].item() for g in opt.param_groups] == [3.0, 3.0]
    diff = max((a - b).abs().max().item() for a, b in zip(params, timm_reference()))
    assert diff <= 1e-6, diff


def test_lamb_step_is_the_same_few_ops_for_any_number_of_parameters():
    """foreach by construction: the ops of a step do not grow with the number of parameters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from miro_scale.train.optim import Lamb

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops_per_step(n):
        params = [torch.randn(3, 2) for _ in range(n)]
        opt = Lamb([{"params": params, "weight_decay": 0.1}], **LAMB_ARGS)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state created
        with CountOps() as count:
            opt.step()
        return count.ops

    assert ops_per_step(4) == ops_per_step(64)


def fsdp_lamb_rank(rank, world, init_file, out):
    """One rank of FSDP2 + LAMB on lamb_problem's parameters, each sharded across the ranks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from miro_scale.train.comm_count import count_collectives
    from miro_scale.train.optim import Lamb

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params, grads = lamb_problem()
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", torch.nn.Parameter(p.clone()))
    fully_shard(module)
    sharded = [module.p0, module.p1, module.p2]
    opt = Lamb([{"params": [sharded[0], sharded[2]], "weight_decay": 0.1},
                {"params": [sharded[1]], "weight_decay": 0.0}], **LAMB_ARGS)
    with count_collectives() as counts:
        for step_grads in grads:
            for p, grad in zip(sharded, step_grads):
                p.grad = torch.distributed.tensor.distribute_tensor(grad, p.device_mesh, p.placements)
            opt.step()
    result = [p.full_tensor() for p in sharded]
    if rank == 0:
        torch.save({"weights": result, "all_reduces": counts.calls["all_reduce"]}, out)
    dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    dist.destroy_process_group()


@pytest.mark.distributed
def test_lamb_under_fsdp2_reduces_all_trust_ratio_norms_at_once():
    """FSDP2 DTensors on 2 gloo processes: one all-reduce per decayed group and step (per-tensor
    DTensor norms would be two per parameter), and timm's one-process weights."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.pt"
        torch.multiprocessing.spawn(fsdp_lamb_rank, args=(2, Path(tmp) / "store", out), nprocs=2)
        result = torch.load(out, weights_only=True)
    assert result["all_reduces"] == 5  # 5 steps x the one decayed group
    diff = max((a - b).abs().max().item() for a, b in zip(result["weights"], timm_reference()))
    assert diff <= 1e-6, diff


def test_guarded_optimizers_skip_when_told_and_say_so_for_deepspeed():
    """DeepSpeed ZeRO-0 reads .overflow on the host; the engine sets non_finite from its one norm."""
    from miro_scale.train.optim import GuardedAdamW, GuardedLamb

    for cls in (GuardedLamb, GuardedAdamW):
        params, grads = lamb_problem(1)
        opt = cls([{"params": params, "weight_decay": 0.1}], lr=1e-2)
        for p, grad in zip(params, grads[0]):
            p.grad = grad
        before = [p.clone() for p in params]
        opt.non_finite = torch.tensor(True)
        opt.step()
        assert opt.overflow and all(torch.equal(a, b) for a, b in zip(before, params))
        opt.non_finite = torch.tensor(False)
        opt.step()
        assert not opt.overflow and not torch.equal(before[0], params[0])
