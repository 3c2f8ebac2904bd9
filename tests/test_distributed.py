"""Distributed training and fused SyncBatchNorm, on CPU with gloo and 2 processes spawned here.

The multi-process tests share one spawn of 2 ranks (``torch.multiprocessing.spawn``), which
rendezvous through a ``file://`` store in a temporary folder, run every scenario (``_worker``) and
save each one's results there; the checks against single-process stock PyTorch on the
concatenated batch run in this process.
Per-rank batches are uneven (2 and 3 samples).
"""

from __future__ import annotations

import copy
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo import distributed as c3d_dist
from c3dzoo import net2net
from c3dzoo.ops import conv3d_bn_act
from c3dzoo.testing import assert_parity
from interpreter import skip_unless_triton_runs_cpu_tensors

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this PyTorch build has no torch.distributed")

WORLD = 2
RANK_BATCH = (2, 3)  # uneven on purpose
GLOBAL_BATCH = sum(RANK_BATCH)
EMPTY_SPLIT = (0, GLOBAL_BATCH)  # rank 0 without samples still joins the collectives
STEPS = 3
CLASSES = 5


def _rank_slice(rank: int, split=RANK_BATCH) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


# --------------------------------------------------------------------------------------------
# the model and data every rank and the single-process reference build identically
# --------------------------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6, momentum=None), nn.LeakyReLU(0.1),
        nn.Conv3d(6, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )


def batches():
    """STEPS global batches (x: GLOBAL_BATCH×3×4×8×8 with a non-zero mean, labels)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 4, 8, 8, generator=g) + 0.5,
             torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def train_stock(dtype: torch.dtype):
    """Single-process stock training on the concatenated batches; the mean loss over the batch."""
    model = tiny_model().to(dtype)
    opt = _sgd(model.parameters())
    for x, y in batches():
        loss = F.cross_entropy(model(x.to(dtype)), y, reduction="sum") / GLOBAL_BATCH
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


def _worker(rank: int, tmp: str) -> None:
    """Runs every scenario in order, saving each one's result (or its traceback) per rank. After a
    failure the rank stops (its peer then fails on the collective timeout)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    c3d_dist.init_from_env("gloo", init_method=f"file://{tmp}/rendezvous",
                           timeout=datetime.timedelta(seconds=60))
    assert (c3d_dist.rank(), c3d_dist.world_size(), c3d_dist.is_main()) == (rank, WORLD, rank == 0)
    for name, scenario in _SCENARIOS.items():
        try:
            result = scenario(rank)
        except Exception:
            torch.save({"error": traceback.format_exc()}, os.path.join(tmp, f"{name}_rank{rank}.pt"))
            raise
        torch.save(result, os.path.join(tmp, f"{name}_rank{rank}.pt"))
    c3d_dist.teardown()


def _step(model, opt, x, y, average_grads_by_hand: bool = False):
    # scaled so that DDP's average over ranks is the gradient of the mean loss over the global batch
    loss = F.cross_entropy(model(x), y, reduction="sum") * WORLD / GLOBAL_BATCH
    opt.zero_grad()
    loss.backward()
    if average_grads_by_hand:  # what DDP does, for a model DDP refuses on CPU (nn.SyncBatchNorm)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    opt.step()


def _scenario_train_sync(rank):
    part = _rank_slice(rank)
    fused = c3dzoo.fuse(tiny_model(), backend="reference", sync_bn=True)
    ddp = c3d_dist.wrap_ddp(fused)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    opt = _sgd(ddp.parameters())
    for x, y in batches():
        _step(ddp, opt, x[part], y[part])

    # the same with stock nn.SyncBatchNorm modules mapped by fuse (no sync_bn flag); DDP refuses
    # SyncBatchNorm on CPU, so gradients are averaged by hand
    converted = c3dzoo.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model()), backend="reference")
    assert converted.c3dzoo_fused_chains == 3
    opt = _sgd(converted.parameters())
    for x, y in batches():
        _step(converted, opt, x[part], y[part], average_grads_by_hand=True)
    return {"sync_bn": c3d_dist.unwrap(ddp).state_dict(), "converted": converted.state_dict()}


def zoo_model(dtype=torch.float32) -> nn.Module:
    """MC3-18 as every rank and the single-process reference build it (stock modules)."""
    torch.manual_seed(0)
    return c3dzoo.mc3_18(num_classes=CLASSES).to(dtype)


def zoo_batch():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(GLOBAL_BATCH, 3, 4, 16, 16, generator=g),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))


def _scenario_zoo_converted(rank):
    """The usual DDP recipe on a zoo model: ``nn.SyncBatchNorm.convert_sync_batchnorm`` then fused
    (stock SyncBatchNorm refuses CPU tensors in a process group, so only the fused chains can run
    here: they synchronise over gloo)."""
    part = _rank_slice(rank)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(zoo_model())
    model.fused, model.backend = True, "reference"
    x, y = zoo_batch()
    _step(model, _sgd(model.parameters()), x[part], y[part], average_grads_by_hand=True)
    return {"state": model.state_dict()}


def _scenario_train_local(rank):
    part = _rank_slice(rank)
    x, y = batches()[0]
    ddp = c3d_dist.wrap_ddp(c3dzoo.fuse(tiny_model(), backend="reference"))
    opt = _sgd(ddp.parameters())
    _step(ddp, opt, x[part], y[part])
    stock = tiny_model()
    stock(x[part])  # this rank's batch alone, stock modules
    return {"fused": c3d_dist.unwrap(ddp).state_dict(), "stock_local": stock.state_dict()}


def _scenario_grow(rank):
    part = slice(2 * rank, 2 * rank + 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 16, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    torch.manual_seed(0)
    model = c3dzoo.get_model("c3d_bn", num_classes=CLASSES, width_mult=0.03125, input_size=(16, 32, 32),
                             fused=True, backend="reference", sync_bn=True)
    ddp = c3d_dist.wrap_ddp(model)
    opt = _sgd(ddp.parameters())
    _step(ddp, opt, x[part], y[part])
    control = copy.deepcopy(c3d_dist.unwrap(ddp))
    torch.manual_seed(100 + rank)  # ranks' global RNGs differ: unseeded growth would differ
    net2net.wider(control, "conv3a", 12, noise=0.02)

    with pytest.raises(TypeError, match="plain model"):  # raised before any collective
        c3d_dist.grow_identically(ddp, [("conv3a", 12)])
    model = c3d_dist.grow_identically(c3d_dist.unwrap(ddp), [("conv3a", 12), ("fc6", 160)],
                                      noise=0.02, optimizer=opt)
    ddp = c3d_dist.wrap_ddp(model)
    _step(ddp, opt, x[part], y[part])  # training continues on the rebuilt DDP and optimizer
    return {
        "identical": c3d_dist.same_on_all_ranks(model),
        "control_identical": c3d_dist.same_on_all_ranks(control),
        "state": model.state_dict(),
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "conv3a_out": model.conv3a.out_channels,
    }


def op_case(dtype=torch.float64):
    """Inputs of the op-level test: two global batches, parameters, an upstream gradient."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(GLOBAL_BATCH, 3, 4, 6, 6, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    params = dict(
        weight=torch.randn(5, 3, 3, 3, 3, generator=g, dtype=torch.float64) * 0.2,
        bias=torch.randn(5, generator=g, dtype=torch.float64) + 3,  # the conv output's mean ≫ 0
        gamma=torch.rand(5, generator=g, dtype=torch.float64) + 0.5,
        beta=torch.randn(5, generator=g, dtype=torch.float64),
    )
    grad = torch.randn(GLOBAL_BATCH, 5, 4, 3, 3, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in xs], {k: v.to(dtype) for k, v in params.items()}, grad.to(dtype)


OP_KW = dict(padding=1, activation="leaky_relu", negative_slope=0.2, pool=((1, 2, 2), (1, 2, 2), 0))


def _op_run(rank, dtype, backend, track, split=RANK_BATCH):
    part = _rank_slice(rank, split)
    xs, p, grad = op_case(dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    c = p["weight"].shape[0]
    stats = dict(running_mean=torch.zeros(c, dtype=dtype), running_var=torch.ones(c, dtype=dtype),
                 num_batches_tracked=torch.zeros((), dtype=torch.long)) if track else {}
    out = None
    for x in xs:  # two training calls: momentum=None averages both batches' statistics
        x = x[part].clone().requires_grad_()
        out = conv3d_bn_act(x, leaves["weight"], leaves["bias"], leaves["gamma"], leaves["beta"],
                            stats.get("running_mean"), stats.get("running_var"),
                            num_batches_tracked=stats.get("num_batches_tracked"), training=True,
                            momentum=None, sync=True, backend=backend, **OP_KW)
    out.backward(grad[part])
    grads = {k: v.grad.clone() for k, v in leaves.items()}
    for v in grads.values():  # per-rank parameter gradients are local contributions: sum them
        dist.all_reduce(v)
    return {"out": out.detach(), "grad_x": x.grad, "grads": grads, "stats": stats}


def _triton_runs_cpu_tensors() -> bool:
    try:
        from c3dzoo.kernels.conv3d_bias_act_pool import runs_interpreted
        from c3dzoo.ops._registry import triton_cpu_unsupported_reason
    except ImportError:
        return False
    return triton_cpu_unsupported_reason(runs_interpreted) is None


def _scenario_op(rank):
    return {
        "fp64": _op_run(rank, torch.float64, "reference", track=True),
        "fp64_untracked": _op_run(rank, torch.float64, "reference", track=False),
        # the Triton kernels run CPU tensors only under the interpreter (not on a GPU machine)
        "fp32_triton": _op_run(rank, torch.float32, "triton", track=True) if _triton_runs_cpu_tensors() else None,
        "fp64_empty_rank": _op_run(rank, torch.float64, "reference", track=True, split=EMPTY_SPLIT),
    }


def _scenario_double_backward(rank):
    """backward(create_graph=True) through a synchronised fused layer: its backward all-reduces
    values, not graphs, so differentiating it again must raise, never drop those terms silently."""
    torch.manual_seed(0)
    layer = c3dzoo.nn.Conv3dBNAct(3, 4, padding=1, backend="reference", sync_bn=True).train()
    x = torch.randn(2, 3, 4, 6, 6, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    try:
        grad_x.square().sum().backward()
    except RuntimeError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


_SCENARIOS = {
    "train_sync": _scenario_train_sync, "train_local": _scenario_train_local,
    "grow": _scenario_grow, "op": _scenario_op, "double_backward": _scenario_double_backward,
    "zoo_converted": _scenario_zoo_converted,
}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Spawns the 2 ranks once for the module (starting a rank costs seconds on a small CPU)."""
    tmp = tmp_path_factory.mktemp("ranks")
    try:
        mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    except Exception as exc:  # the scenarios that ran have saved their results or tracebacks
        return tmp, f"{type(exc).__name__}: {exc}"
    return tmp, None


def _results(spawned, scenario: str):
    tmp, spawn_error = spawned
    ranks, errors = [], []
    for r in range(WORLD):
        path = tmp / f"{scenario}_rank{r}.pt"
        result = torch.load(path, weights_only=False) if path.exists() else {"error": f"did not run ({spawn_error})"}
        if "error" in result:
            errors.append(f"rank {r}: {result['error']}")
        ranks.append(result)
    if errors:
        pytest.fail(f"scenario {scenario!r} failed:\n" + "\n".join(errors))
    return ranks


# --------------------------------------------------------------------------------------------
# multi-process tests
# --------------------------------------------------------------------------------------------


def test_sync_bn_training_matches_single_process_on_the_global_batch(spawned):
    ranks = _results(spawned, "train_sync")
    reference = train_stock(torch.float64)
    stock = train_stock(torch.float32)
    for variant in ("sync_bn", "converted"):
        for key in reference:
            for r in range(WORLD):
                # parameters stay equal through DDP; running statistics because every rank gets
                # the same global statistics
                assert torch.equal(ranks[r][variant][key], ranks[0][variant][key]), f"{variant} {key}: ranks differ"
            if key.endswith("num_batches_tracked"):
                assert ranks[0][variant][key].item() == STEPS
                continue
            assert_parity(ranks[0][variant][key], stock[key], reference[key], torch.float32, f"{variant} {key}")


def test_a_fused_zoo_model_converted_to_sync_batch_norm_trains_on_the_global_batch(spawned):
    """MC3-18 after ``convert_sync_batchnorm`` (its blocks' Sequentials then hold SyncBatchNorm):
    one step on 2 ranks gives the single-process stock step on the concatenated batch, running
    statistics included, identical on both ranks."""
    ranks = _results(spawned, "zoo_converted")
    x, y = zoo_batch()
    states = {}
    for dtype in (torch.float64, torch.float32):
        model = zoo_model(dtype)
        opt = _sgd(model.parameters())
        loss = F.cross_entropy(model(x.to(dtype)), y, reduction="sum") / GLOBAL_BATCH
        loss.backward()
        opt.step()
        states[dtype] = model.state_dict()
    assert ranks[0]["state"].keys() == states[torch.float32].keys()
    for key, reference in states[torch.float64].items():
        assert torch.equal(ranks[1]["state"][key], ranks[0]["state"][key]), f"{key}: ranks differ"
        if key.endswith("num_batches_tracked"):
            assert ranks[0]["state"][key].item() == 1
            continue
        assert_parity(ranks[0]["state"][key], states[torch.float32][key], reference, torch.float32, key)


def test_without_sync_each_rank_keeps_its_own_statistics(spawned):
    ranks = _results(spawned, "train_local")
    stat_keys = [k for k in ranks[0]["fused"] if k.endswith(("running_mean", "running_var"))]
    assert len(stat_keys) == 6
    for key in stat_keys:
        assert not torch.allclose(ranks[0]["fused"][key], ranks[1]["fused"][key]), f"{key}: ranks agree"
        for r in range(WORLD):  # equal to stock BatchNorm on this rank's batch alone
            torch.testing.assert_close(ranks[r]["fused"][key], ranks[r]["stock_local"][key],
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {r} {key}: {m}")
    # momentum=None after one batch: the running mean IS the local batch mean (checked above
    # against stock, which computes it from the local batch)
    assert ranks[0]["fused"]["5.num_batches_tracked"].item() == 1


def test_grow_identically_gives_identical_models_on_every_rank(spawned):
    ranks = _results(spawned, "grow")
    assert ranks[0]["identical"] and ranks[1]["identical"]
    assert not ranks[0]["control_identical"], "unseeded growth agreed across ranks: the check proves nothing"
    assert ranks[0]["conv3a_out"] == 12
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for a, b in zip(ranks[0]["momentum"], ranks[1]["momentum"]):
        assert torch.equal(a, b)


def _stock_op(dtype, track, backend_dtype=None):
    """Stock F.conv3d → nn.BatchNorm3d(momentum=None) → leaky_relu → max_pool3d on the
    concatenated batches, in ``dtype``; returns the same fields as ``_op_run``."""
    xs, p, grad = op_case(dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    bn = nn.BatchNorm3d(5, momentum=None, affine=False, track_running_stats=track).to(dtype)
    for x in xs:
        x = x.clone().requires_grad_()
        y = F.conv3d(x, leaves["weight"], leaves["bias"], padding=1)
        z = bn(y) * leaves["gamma"].view(1, -1, 1, 1, 1) + leaves["beta"].view(1, -1, 1, 1, 1)
        out = F.max_pool3d(F.leaky_relu(z, 0.2), (1, 2, 2))
    out.backward(grad)
    stats = {"running_mean": bn.running_mean, "running_var": bn.running_var,
             "num_batches_tracked": bn.num_batches_tracked} if track else {}
    return {"out": out.detach(), "grad_x": x.grad, "grads": {k: v.grad for k, v in leaves.items()}, "stats": stats}


def _compare_op(ranks, expected, check, split=RANK_BATCH):
    for r in range(WORLD):
        part = _rank_slice(r, split)
        check(ranks[r]["out"], expected["out"][part], f"rank {r} out")
        check(ranks[r]["grad_x"], expected["grad_x"][part], f"rank {r} grad x")
        for k, v in expected["grads"].items():
            check(ranks[r]["grads"][k], v, f"rank {r} grad {k}")
        for k, v in expected["stats"].items():
            check(ranks[r]["stats"][k], v, f"rank {r} {k}")


def test_sync_op_matches_batch_norm_on_the_concatenated_batch(spawned):
    ranks = _results(spawned, "op")

    def close(a, b, what):
        if not a.is_floating_point():
            assert torch.equal(a, b), what
            return
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")

    _compare_op([r["fp64"] for r in ranks], _stock_op(torch.float64, track=True), close)
    _compare_op([r["fp64_untracked"] for r in ranks], _stock_op(torch.float64, track=False), close)
    _compare_op([r["fp64_empty_rank"] for r in ranks], _stock_op(torch.float64, track=True), close, EMPTY_SPLIT)


def test_sync_op_on_the_triton_kernels_within_the_parity_budget(spawned):
    """fp32, conv and normalise/act/pool on the Triton kernels (the interpreter: the ranks run CPU
    tensors), within the parity budget of stock fp32 against the float64 reference."""
    skip_unless_triton_runs_cpu_tensors()  # the ranks inherit this process's TRITON_INTERPRET
    ranks = _results(spawned, "op")
    reference, stock = _stock_op(torch.float64, track=True), _stock_op(torch.float32, track=True)

    def parity(a, b, what):
        if not a.is_floating_point():
            assert torch.equal(a, b), what
            return
        assert_parity(a, stock_of[what], b, torch.float32, what)

    stock_of = {}
    for r in range(WORLD):
        part = _rank_slice(r)
        stock_of[f"rank {r} out"] = stock["out"][part]
        stock_of[f"rank {r} grad x"] = stock["grad_x"][part]
        stock_of.update({f"rank {r} grad {k}": v for k, v in stock["grads"].items()})
        stock_of.update({f"rank {r} {k}": v for k, v in stock["stats"].items()})
    _compare_op([r["fp32_triton"] for r in ranks], reference, parity)


def test_double_backward_through_sync_batch_norm_raises(spawned):
    for result in _results(spawned, "double_backward"):
        assert result["raised"] is not None and "once_differentiable" in result["raised"], result


# --------------------------------------------------------------------------------------------
# single process: the sync flag changes nothing without a process group of several ranks
# --------------------------------------------------------------------------------------------


def _run_module(module, x):
    x = x.clone().requires_grad_()
    out = module(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {k: v.clone() for k, v in module.state_dict().items()}, \
        [p.grad.clone() for p in module.parameters()]


def _assert_sync_changes_nothing():
    x = torch.randn(2, 3, 4, 8, 8)
    torch.manual_seed(0)
    plain = c3dzoo.nn.Conv3dBNAct(3, 4, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend="reference")
    synced = copy.deepcopy(plain)
    synced.sync_bn = True
    for a, b in zip(_run_module(plain, x), _run_module(synced, x)):
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a)
        elif isinstance(a, list):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        else:
            assert torch.equal(a, b)
    fused, fused_sync = c3dzoo.fuse(tiny_model()), c3dzoo.fuse(tiny_model(), sync_bn=True)
    assert torch.equal(fused(x), fused_sync(x))
    assert all(torch.equal(v, fused_sync.state_dict()[k]) for k, v in fused.state_dict().items())


def test_sync_flag_changes_nothing_without_distributed():
    assert not dist.is_initialized()
    _assert_sync_changes_nothing()


def test_sync_flag_changes_nothing_with_world_size_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        _assert_sync_changes_nothing()
    finally:
        dist.destroy_process_group()


def test_sync_arguments_are_checked():
    x = torch.randn(2, 3, 4, 4, 4)
    w = torch.randn(4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="process_group is given but sync=False"):
        conv3d_bn_act(x, w, training=True, process_group=object())
    with pytest.raises(ValueError, match="sync_bn=False"):
        c3dzoo.nn.Conv3dBNAct(3, 4, process_group=object())
    with pytest.raises(ValueError, match="needs fused=True"):
        c3dzoo.get_model("c3d_bn", sync_bn=True)


def test_distributed_helpers_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert c3d_dist.init_from_env() == c3d_dist.device()
    assert not dist.is_initialized()
    assert (c3d_dist.rank(), c3d_dist.world_size(), c3d_dist.is_main()) == (0, 1, True)
    model = nn.Linear(2, 2)
    assert c3d_dist.wrap_ddp(model) is model and c3d_dist.unwrap(model) is model
    assert c3d_dist.distributed_sampler(range(10)) is None
    c3d_dist.set_epoch(None, 3)  # ignored
    assert c3d_dist.broadcast_object({"a": 1}) == {"a": 1}
    assert c3d_dist.shared_seed(7) == 7
    assert c3d_dist.all_reduce_mean(2.5) == 2.5
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is not"):
        c3d_dist.init_from_env()
