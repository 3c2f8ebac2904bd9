"""Distributed training helpers on PyTorch's own engine (torch.distributed, torchrun, DDP).

c3dzoo has no launcher or communication layer of its own: start one process per GPU with
``torchrun`` and use these few helpers. Every function also works in a plain single process
(``python train.py``): then nothing is initialised, ``world_size()`` is 1, ``is_main()`` is True,
``wrap_ddp`` returns the model unchanged and ``broadcast_object`` returns its argument.

A training script, run as ``torchrun --nproc_per_node=8 train.py`` (or on several machines with
``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``)::

    import c3dzoo
    from c3dzoo import distributed as dist

    device = dist.init_from_env()                    # nccl on CUDA (sets the local GPU), else gloo
    model = c3dzoo.get_model("c3d_bn", fused=True, sync_bn=True).to(device)
    ddp = dist.wrap_ddp(model)                       # DistributedDataParallel, or model when alone
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    sampler = dist.distributed_sampler(train_set, shuffle=True, seed=0)   # None when alone
    loader = DataLoader(train_set, batch_size=B, sampler=sampler, shuffle=sampler is None)
    for epoch in range(epochs):
        dist.set_epoch(sampler, epoch)               # a different shuffle every epoch, same on all ranks
        for x, y in loader:
            loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
            opt.zero_grad(); loss.backward(); opt.step()
        val_loss = dist.all_reduce_mean(val_loss)    # metrics averaged over ranks
        if dist.is_main():
            save_checkpoint(dist.unwrap(ddp).state_dict(), ...)   # rank 0 writes, once
    dist.teardown()

Net2Net growth during distributed training (every rank must grow identically)::

    model = dist.grow_identically(dist.unwrap(ddp), [("conv3a", 96)], optimizer=opt, noise=0.02)
    ddp = dist.wrap_ddp(model)                       # DDP must be rebuilt: the parameters are new

``grow_identically`` draws one seed on rank 0, broadcasts it, and grows with a generator seeded
from it, so the replica mapping and the noise are the same on every rank; the optimizer is
rewritten in place (its parameters become the grown ones) and keeps working with the new DDP.
A model made by ``c3dzoo.fuse`` holds references to the old modules: grow the unfused model,
then fuse again (zoo models built with ``fused=True`` read their modules at every forward).

SyncBatchNorm: ``get_model(..., fused=True, sync_bn=True)``, ``c3dzoo.fuse(model, sync_bn=True)``
or ``c3dzoo.nn.Conv3dBNAct(..., sync_bn=True)``: see ``c3dzoo.ops.sync_batch_norm``.

Per-rank batches and the loss: DDP averages gradients over ranks. With equal per-rank batches
(``DistributedSampler`` pads the dataset so that every rank gets the same number of samples;
``drop_last=True`` drops the tail instead), a per-rank mean loss gives the gradient of the mean
loss over the global batch. With uneven per-rank batches, scale each rank's summed loss by
``world_size() / global_batch`` to get the same.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as _dist
from torch import nn

__all__ = [
    "init_from_env", "is_initialized", "rank", "world_size", "local_rank", "is_main", "device",
    "barrier", "wrap_ddp", "unwrap", "distributed_sampler", "set_epoch", "broadcast_object",
    "all_reduce_mean", "shared_seed", "grow_identically", "same_on_all_ranks", "teardown",
]

_initialised_here = False


def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def is_initialized() -> bool:
    """True when torch.distributed has a default process group."""
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return _dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return _dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine: ``$LOCAL_RANK`` as torchrun sets it (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on global rank 0: the rank that logs, shows progress and writes checkpoints."""
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_from_env(backend: Optional[str] = None, *, init_method: Optional[str] = None,
                  timeout: Optional[datetime.timedelta] = None) -> torch.device:
    """Initialise torch.distributed from torchrun's environment and return this rank's device.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and, with the default ``init_method``
    ``"env://"``, ``MASTER_ADDR``/``MASTER_PORT``). Without ``WORLD_SIZE``, or with
    ``WORLD_SIZE=1``, nothing is initialised (a plain single-process run). ``backend``: "nccl" on
    CUDA (and the local GPU becomes the current device), "gloo" on CPU, unless given. Calling it
    again when already initialised just returns the device.
    """
    global _initialised_here
    if is_initialized():
        return device()
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return device()
    if not _dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    global_rank = _env_int("RANK")
    if global_rank is None:
        raise ValueError("WORLD_SIZE is set but RANK is not: start the processes with torchrun")
    if not 0 <= global_rank < size:
        raise ValueError(f"RANK={global_rank} is outside 0..WORLD_SIZE-1 ({size - 1})")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and backend == "nccl":  # gloo ranks may train on the CPU of a GPU machine
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank()} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank())
    kwargs = {} if timeout is None else {"timeout": timeout}
    _dist.init_process_group(backend, init_method=init_method or "env://", rank=global_rank,
                             world_size=size, **kwargs)
    _initialised_here = True
    return device()


def teardown() -> None:
    """Destroy the process group if ``init_from_env`` created it (safe to call always)."""
    global _initialised_here
    if _initialised_here and is_initialized():
        _dist.destroy_process_group()
    _initialised_here = False


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_initialized():
        _dist.barrier()


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` on the current device (``device_ids=[LOCAL_RANK]`` on
    CUDA), or ``model`` itself when not distributed. Move the model to ``device()`` first.
    Keyword arguments go to DDP (e.g. ``find_unused_parameters``)."""
    if not is_initialized() or world_size() == 1:
        return model
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        ddp_kwargs.setdefault("device_ids", [param.device.index])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model``): save, grow and evaluate this one."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def distributed_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` over this rank's share of ``dataset``, or None when not
    distributed (then let the DataLoader shuffle). Call ``set_epoch(sampler, epoch)`` at the start
    of every epoch: the permutation is seeded by ``seed + epoch``, the same on every rank."""
    if not is_initialized() or world_size() == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)


def set_epoch(sampler_or_loader, epoch: int) -> None:
    """Tell a DistributedSampler (given itself, or a DataLoader using it) which epoch starts;
    anything else (None, a plain sampler) is ignored."""
    sampler = getattr(sampler_or_loader, "sampler", sampler_or_loader)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself when not distributed."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    _dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Mean of ``value`` over ranks (a float or a tensor; for logging metrics)."""
    if not is_initialized():
        return value
    is_tensor = isinstance(value, torch.Tensor)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    if _dist.get_backend() == "nccl":
        t = t.to(device())
    _dist.all_reduce(t)
    t = t / world_size()
    return t.to(value.device) if is_tensor else t.item()


def shared_seed(seed: Optional[int] = None) -> int:
    """``seed``, or a fresh random 63-bit seed drawn on rank 0, identical on every rank."""
    if seed is None and rank() == 0:
        seed = random.SystemRandom().getrandbits(63)
    return int(broadcast_object(seed))


def grow_identically(model: nn.Module, widths: Sequence[Tuple[str, int]], *, noise: float = 0.0,
                     optimizer: Optional[torch.optim.Optimizer] = None,
                     seed: Optional[int] = None) -> nn.Module:
    """Net2Net ``wider`` for each ``(layer, width)`` in order, identically on every rank.

    The replica mappings and the noise come from one ``torch.Generator`` (CPU) seeded with
    ``shared_seed(seed)`` — rank 0's seed, broadcast — so every rank that starts from the same
    parameters ends with the same grown parameters, running statistics and optimizer state.
    ``model`` must be the plain module (``unwrap(ddp)``); re-wrap the result with ``wrap_ddp``.
    Every rank must call it at the same point (it broadcasts). Returns ``model``.
    """
    from . import net2net

    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("grow_identically takes the plain model: pass dist.unwrap(ddp) and re-wrap "
                        "the result with dist.wrap_ddp (DDP holds the old parameters)")
    generator = torch.Generator().manual_seed(shared_seed(seed))
    for layer, width in widths:
        net2net.wider(model, layer, width, noise=noise, generator=generator, optimizer=optimizer)
    return model


@torch.no_grad()
def same_on_all_ranks(model: nn.Module) -> bool:
    """True when every parameter and buffer of ``model`` equals rank 0's, bit for bit (one
    broadcast per tensor: a check for tests and debugging, not for every step)."""
    if not is_initialized():
        return True
    same = True
    for tensor in list(model.parameters()) + list(model.buffers()):
        reference = tensor.detach().clone()
        _dist.broadcast(reference, src=0)
        same = same and torch.equal(reference, tensor.detach())
    flag = torch.tensor([1 if same else 0], device=device() if _dist.get_backend() == "nccl" else "cpu")
    _dist.all_reduce(flag, op=_dist.ReduceOp.MIN)
    return bool(flag.item())
