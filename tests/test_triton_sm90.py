"""Hopper (sm_90) machine code of every Triton tile configuration, checked without a GPU.

Each configuration the launcher can pick (``HOPPER_CONFIGS`` in bf16, fp16, fp32 as TF32 and full
fp32, with and without a fused pool) is compiled for sm_90 and must: use wgmma for its matrix math
(all but full fp32, which has no tensor-core path), fit in the 227 KB of shared memory an H100 block
may use, and not spill registers (ptxas -v).

The training forward's kernels are checked the same way: the conv with the batch-statistics
epilogue (``conv3d_bn_stats``) in every configuration and dtype variant (wgmma, shared memory, no
spills), and the elementwise normalise + activation + pool kernel (``bn_act_pool``; no matrix math:
shared memory and spills).

The training backward's kernels likewise: the weight-gradient GEMM (``conv3d_wgrad``) in every
configuration and dtype variant (wgmma, shared memory, no spills), the input gradient (the inference
kernel without bias or activation, as ``conv3d_dgrad`` launches it), and the two elementwise kernels
of ``bn_act_pool_backward`` (shared memory and spills).

The depthwise kernels (``conv3d_depthwise``: CSN's and X3D's conv_b) do no matrix math: each config
in each dtype, in each launch kind (inference with the residual epilogue, training forward with the
statistics epilogue and the input prologue, the transposed input gradient, the weight gradient) is
checked for shared memory and spills, and must use no MMA at all.

The test process runs under TRITON_INTERPRET=1 (conftest), which makes ``@triton.jit`` interpret, so
the compilation runs in ONE subprocess without it (this file run as a script), which prints JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from ptx import atomics

from c3dzoo.kernels import batch_norm_statistics as BNS
from c3dzoo.kernels import bn_act_pool as E
from c3dzoo.kernels import bn_act_pool_backward as B
from c3dzoo.kernels import conv3d_bias_act_pool as K
from c3dzoo.kernels import conv3d_bn_stats as S
from c3dzoo.kernels import conv3d_depthwise as DW
from c3dzoo.kernels import conv3d_wgrad as W

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on H100/H200 (sm_90)

# A C3D-like layer each configuration is made for: (x shape N,C,D,H,W; C_out). The scalars of these
# shapes specialise the compiled kernel as a real launch would (ints divisible by 16, ones).
_SHAPES = {
    K.CHANNEL_BLOCKS_128x128x64: ((32, 256, 8, 28, 28), 256),
    K.CHANNEL_BLOCKS_128x128x32: ((32, 32, 16, 56, 56), 128),
    K.CHANNEL_BLOCKS_128x64x64: ((32, 64, 16, 56, 56), 64),
    K.CHANNEL_BLOCKS_64x64x64: ((32, 512, 2, 7, 7), 512),
    K.FLAT_K_128x64x16: ((32, 3, 16, 112, 112), 64),
}
_POOLS = {
    "nopool": (),
    "pool122": (1, 2, 2, 1, 2, 2, 0, 0, 0),  # pool1
    "pool5": (2, 2, 2, 2, 2, 2, 0, 1, 1),  # 2×2×2 windows with padding: the general epilogue
}
# dtype name → (dtype, allow_tf32). "fp32" is TF32 (allow_tf32 is the default for convolutions);
# "fp32full" has no tensor-core path, so it is checked for shared memory and spills only.
_DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32": (torch.float32, True),
    "fp32full": (torch.float32, False),
}

_ELEMENT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _cases():
    """case id → (tile config as launched, x shape, C_out, pool, dtype, allow_tf32); a variant that
    several configs share (full fp32, say) is compiled once."""
    cases, seen = {}, set()
    for config in K.HOPPER_CONFIGS:
        x_shape, out_c = _SHAPES[config]
        for pool in ("nopool", "pool122" if config.flat_k else "pool5"):
            for dtype_name, (dtype, tf32) in _DTYPES.items():
                launched = config.for_dtype(dtype, tf32)
                if (launched, pool, dtype) in seen:
                    continue
                seen.add((launched, pool, dtype))
                cases[f"{launched.name}-{pool}-{dtype_name}"] = (launched, x_shape, out_c, _POOLS[pool], dtype, tf32)
    return cases


CASES = _cases()


def _stats_cases():
    """The statistics-epilogue conv in every config × dtype variant the launcher can pick (no pool)."""
    cases, seen = {}, set()
    for config in K.HOPPER_CONFIGS:
        x_shape, out_c = _SHAPES[config]
        for dtype_name, (dtype, tf32) in _DTYPES.items():
            launched = config.for_dtype(dtype, tf32)
            if (launched, dtype) in seen:
                continue
            seen.add((launched, dtype))
            cases[f"stats-{launched.name}-{dtype_name}"] = (launched, x_shape, out_c, (), dtype, tf32)
    return cases


STATS_CASES = _stats_cases()


def _prologue_cases():
    """The conv kernels with the input prologue (a deferred BatchNorm + ReLU of the previous layer,
    ``_implicit_gemm.normalize_activate`` on every loaded input tile): the statistics conv (the
    training consumer) and the inference kernel with and without a pool (a frozen-BN consumer),
    in every config × dtype variant."""
    cases = {}
    for name, (launched, x_shape, out_c, pool, dtype, tf32) in STATS_CASES.items():
        cases[f"prologue-{name}"] = (launched, x_shape, out_c, pool, dtype, tf32, "stats", None, True)
    for launched, x_shape, out_c, pool, dtype, tf32 in CASES.values():
        if pool:  # the launcher's variant for prologue + pool
            launched = K.with_prologue_and_pool(launched, dtype, tf32)
        name = f"prologue-{launched.name}-{'pool' if pool else 'nopool'}-{_ELEMENT[dtype]}{'' if tf32 or dtype != torch.float32 else 'full'}"
        cases.setdefault(name, (launched, x_shape, out_c, pool, dtype, tf32, "inference", None, True))
    return cases


PROLOGUE_CASES = _prologue_cases()
# the elementwise kernel on C3D-like conv outputs (N, C, D, H, W): pool5 (padded windows), no pool
ELEMENTWISE_CASES = {
    f"bn_act_pool-{pool}-{dtype_name}": ((32, 512, 2, 7, 7) if pool == "pool5" else (32, 64, 16, 56, 56),
                                        _POOLS[pool], dtype)
    for pool in ("nopool", "pool5")
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
}
# the weight gradient: a C3D layer per config, as (x shape, C_out)
_WGRAD_SHAPES = {
    W.WGRAD_128x128x64: ((32, 256, 8, 28, 28), 256),
    W.WGRAD_64x128x64: ((32, 64, 16, 56, 56), 128),
    W.WGRAD_64x64x64: ((32, 64, 16, 56, 56), 64),
    W.WGRAD_FLAT_K_64x64x32: ((32, 3, 16, 112, 112), 64),
}
WGRAD_CASES = {}
for _config in W.WGRAD_HOPPER_CONFIGS:
    for _dtype_name, (_dtype, _tf32) in _DTYPES.items():
        _launched = _config.for_dtype(_dtype, _tf32)
        WGRAD_CASES.setdefault(f"wgrad-{_launched.name}-{_dtype_name}", (_launched, *_WGRAD_SHAPES[_config], _dtype, _tf32))
# the input gradient: the inference kernel without bias/activation/pool, on C3D's dgrad shapes
# (dy of conv3b → conv3a's input; dy of conv2 → conv1's output)
DGRAD_CASES = {
    f"dgrad-{name}-{dtype_name}": (dy_shape, c_in, dtype, tf32)
    for name, (dy_shape, c_in) in {"c3d_conv3b": ((32, 256, 8, 28, 28), 256),
                                   "c3d_conv2": ((32, 128, 16, 56, 56), 64)}.items()
    for dtype_name, (dtype, tf32) in _DTYPES.items()
}
BACKWARD_ELEMENTWISE_CASES = {
    f"{kernel}-{pool}-{dtype_name}": (kernel, (32, 512, 2, 7, 7) if pool == "pool5" else (32, 64, 16, 56, 56),
                                      _POOLS[pool], dtype)
    for kernel in ("act_pool_backward", "bn_backward")
    for pool in (("nopool", "pool5") if kernel == "act_pool_backward" else ("nopool",))
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
}
# the video ResNets' 3×7×7 stem (147 taps: the flat-K loop's per-element bounds path), in every dtype
STEM_CASES = {
    f"stem377-{K.FLAT_K_128x64x16.for_dtype(dtype, tf32).name}-{dtype_name}":
        (K.FLAT_K_128x64x16.for_dtype(dtype, tf32), (32, 3, 16, 112, 112), 64, (), dtype, tf32, "inference",
         dict(kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), dilation=(1, 1, 1)))
    for dtype_name, (dtype, tf32) in _DTYPES.items()
}
# the inference kernel with the residual epilogue (a residual block's last conv: no pool), in every
# config × dtype variant, on each config's layer and on a ResNet-50 bottleneck's 1×1×1 conv_c
RESIDUAL_CASES = {
    f"residual-{name.rsplit('-', 2)[0]}-{name.rsplit('-', 1)[1]}": (launched, x_shape, out_c, (), dtype, tf32,
                                                                     "inference", None, False, True)
    for name, (launched, x_shape, out_c, pool, dtype, tf32) in CASES.items() if not pool
}
RESIDUAL_CASES.update({
    f"residual-conv_c111-{K.CHANNEL_BLOCKS_128x128x64.for_dtype(dtype, tf32).name}-{dtype_name}":
        (K.CHANNEL_BLOCKS_128x128x64.for_dtype(dtype, tf32), (32, 128, 8, 28, 28), 512, (), dtype, tf32, "inference",
         dict(kernel_size=(1, 1, 1), stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1)), False, True)
    for dtype_name, (dtype, tf32) in _DTYPES.items()
})
# the depthwise kernels: every shipped config × dtype × launch kind, on a CSN R101 conv_b (3×3×3)
DEPTHWISE_CASES = {
    f"depthwise-{kind}-{config.name}-{dtype_name}": (kind, config, dtype)
    for kind in ("residual", "silu", "stats_prologue", "dgrad", "wgrad")
    for config in DW.HOPPER_CONFIGS
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
}
# X3D's swish (silu: an exp per element, in fp32) in the epilogues: the inference kernel with its
# heaviest (pooled) epilogue and the statistics conv with a silu input prologue (a deferred
# BatchNorm + silu), every config × dtype; the elementwise forward and backward kernels
SILU_CASES = {
    **{f"silu-{name}": (*case, "inference", None, False, False, "silu") for name, case in CASES.items() if case[3]},
    **{f"silu-{name}": (*case[:6], "stats", None, True, False, "silu") for name, case in PROLOGUE_CASES.items()
       if case[6] == "stats"},
}
SILU_ELEMENTWISE_CASES = {f"silu-{name}": case for name, case in ELEMENTWISE_CASES.items()}
SILU_BACKWARD_CASES = {f"silu-{name}": case for name, case in BACKWARD_ELEMENTWISE_CASES.items()
                       if case[0] == "act_pool_backward"}
# BatchNorm's statistics finalize (float64 Chan folds) and the running-statistics update, as launched
# for C3D's conv1 in training at batch 32 (50,176 tiles of 128 positions, 64 channels)
STATISTICS_CASES = {f"statistics-{kind}": (kind,) for kind in ("fold_tiles", "fold_splits", "update", "update_cumulative")}
ALL_CASES = [*CASES, *STEM_CASES, *STATISTICS_CASES, *STATS_CASES, *PROLOGUE_CASES, *RESIDUAL_CASES, *ELEMENTWISE_CASES, *WGRAD_CASES,
             *DGRAD_CASES, *BACKWARD_ELEMENTWISE_CASES, *DEPTHWISE_CASES, *SILU_CASES, *SILU_ELEMENTWISE_CASES,
             *SILU_BACKWARD_CASES]


# --------------------------------------------------------------------------------------------
# the subprocess: compile every case for sm_90, run ptxas -v on the PTX
# --------------------------------------------------------------------------------------------


def _ptxas() -> str | None:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # triton ≥ 3.9 emits PTX that only its ptxas-blackwell accepts; older versions ship one ptxas
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path):
            return path
    return None


def _compile_case(case: str) -> dict:
    if case in STATS_CASES:
        return compile_sm90(*STATS_CASES[case], kernel="stats")
    if case in STATISTICS_CASES:
        return compile_statistics_sm90(*STATISTICS_CASES[case])
    if case in PROLOGUE_CASES:
        return compile_sm90(*PROLOGUE_CASES[case])
    if case in STEM_CASES:
        return compile_sm90(*STEM_CASES[case])
    if case in RESIDUAL_CASES:
        return compile_sm90(*RESIDUAL_CASES[case])
    if case in ELEMENTWISE_CASES:
        return compile_elementwise_sm90(*ELEMENTWISE_CASES[case])
    if case in WGRAD_CASES:
        return compile_wgrad_sm90(*WGRAD_CASES[case])
    if case in DGRAD_CASES:
        return compile_dgrad_sm90(*DGRAD_CASES[case])
    if case in BACKWARD_ELEMENTWISE_CASES:
        return compile_backward_elementwise_sm90(*BACKWARD_ELEMENTWISE_CASES[case])
    if case in DEPTHWISE_CASES:
        return compile_depthwise_sm90(*DEPTHWISE_CASES[case])
    if case in SILU_CASES:
        return compile_sm90(*SILU_CASES[case])
    if case in SILU_ELEMENTWISE_CASES:
        return compile_elementwise_sm90(*SILU_ELEMENTWISE_CASES[case], activation="silu")
    if case in SILU_BACKWARD_CASES:
        return compile_backward_elementwise_sm90(*SILU_BACKWARD_CASES[case], activation="silu")
    return compile_sm90(*CASES[case])




def compile_sm90(config, x_shape, out_c, pool, dtype, allow_tf32, kernel="inference", geometry=None,
                 prologue=False, residual=False, activation="relu") -> dict:
    """Compile the conv kernel (``kernel``: "inference", or "stats", the training forward's conv
    with the statistics epilogue) as the launcher would launch it for this layer (C3D's 3×3×3
    geometry unless ``geometry`` is given), with the input prologue (BatchNorm + ``activation`` of the
    input) if ``prologue``, with the residual epilogue if ``residual``, with ``activation`` in the
    epilogue (inference); report its resources."""
    torch.backends.cudnn.allow_tf32 = allow_tf32  # what the launcher reads for fp32
    geometry = geometry or dict(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1))
    input_norm = dict(input_activation=activation if prologue else None, input_eps=1e-5)
    element = _ELEMENT[dtype]
    if kernel == "stats":
        plan = S.plan_stats_launch(
            x_shape, out_c, **geometry, has_bias=True, dtype=dtype, device=torch.device("cuda"), config=config,
            **input_norm,
        )
        fn = S.conv3d_bn_stats_kernel
        pointers = {"x_ptr": f"*{element}", "w_ptr": f"*{element}", "bias_ptr": "*fp32", "y_ptr": f"*{element}",
                    "part_mean_ptr": "*fp32", "part_m2_ptr": "*fp32", "in_stats_ptr": "*fp32"}
    else:
        plan = K.plan_launch(
            x_shape, out_c, **geometry, activation=activation, negative_slope=0.0, pool=pool, has_bias=True,
            dtype=dtype, device=torch.device("cuda"), config=config, has_residual=residual, **input_norm,
        )
        fn = K.conv3d_bias_act_pool_kernel
        pointers = {"x_ptr": f"*{element}", "w_ptr": f"*{element}", "bias_ptr": "*fp32", "out_ptr": f"*{element}",
                    "in_stats_ptr": "*fp32", "res_ptr": f"*{element}"}
    report = _compile(fn, plan, pointers, config.num_warps, config.num_stages)
    report.update(tensor_cores=dtype != torch.float32 or allow_tf32,
                  tile=[config.block_m, config.block_n, config.block_k])
    return report


def compile_elementwise_sm90(y_shape, pool, dtype, activation="relu") -> dict:
    """Compile ``bn_act_pool_kernel`` as its launcher would launch it; report its resources."""
    plan = E.plan_bn_act_pool(
        y_shape, eps=1e-5, activation=activation, negative_slope=0.0, pool=pool, has_gamma=True, has_beta=True,
        device=torch.device("cuda"),
    )
    element = _ELEMENT[dtype]
    pointers = {"y_ptr": f"*{element}", "mean_ptr": "*fp32", "var_ptr": "*fp32", "gamma_ptr": "*fp32",
                "beta_ptr": "*fp32", "out_ptr": f"*{element}"}
    report = _compile(E.bn_act_pool_kernel, plan, pointers, plan.config.num_warps, 1)
    report.update(tensor_cores=False, tile=[plan.config.block_p, plan.config.block_c])
    return report


def compile_statistics_sm90(kind: str) -> dict:
    """Compile a ``batch_norm_statistics`` kernel as its launcher launches it on C3D's conv1 in
    training at batch 32; no matrix math."""
    channels, block_m = 64, 128
    positions = 32 * 16 * 112 * 112
    tiles = -(-positions // block_m)
    splits = BNS.splits_for(tiles, channels)
    per_split = -(-tiles // splits)
    if kind == "fold_tiles":
        fn, pointers = BNS.chan_fold_tiles_kernel, {"part_mean_ptr": "*fp32", "part_m2_ptr": "*fp32", "ws_ptr": "*fp64"}
        scalars = dict(channels=channels, tiles=tiles, positions=positions, block_m=block_m, per_split=per_split,
                       splits=-(-tiles // per_split))
        constexprs = dict(BLOCK_T=BNS.BLOCK_T, BLOCK_C=BNS.BLOCK_C)
    elif kind == "fold_splits":
        fn, pointers = BNS.chan_fold_splits_kernel, {"ws_ptr": "*fp64", "mean_ptr": "*fp32", "var_ptr": "*fp32"}
        scalars = dict(channels=channels, splits=-(-tiles // per_split))
        constexprs = dict(BLOCK_S=BNS.BLOCK_T, BLOCK_C=BNS.BLOCK_C)
    else:
        fn = BNS.running_stats_update_kernel
        pointers = {name: "*fp32" for name in ("mean_ptr", "var_ptr", "running_mean_ptr", "running_var_ptr")}
        pointers["num_batches_tracked_ptr"] = "*i64" if kind == "update_cumulative" else "*fp32"
        scalars = dict(channels=channels, unbias=1.0, momentum=0.1, keep=0.9)
        constexprs = dict(CUMULATIVE=kind == "update_cumulative", BLOCK_C=BNS.BLOCK_C)
    plan = dataclasses.make_dataclass("Launch", ["scalars", "constexprs"])(scalars, constexprs)
    report = _compile(fn, plan, pointers, 1 if kind.startswith("update") else BNS.NUM_WARPS, 1)
    report.update(tensor_cores=False, tile=[BNS.BLOCK_T, BNS.BLOCK_C])
    return report


def compile_wgrad_sm90(config, x_shape, out_c, dtype, allow_tf32) -> dict:
    """Compile ``conv3d_wgrad_kernel`` as its launcher would launch it for this layer (3×3×3, pad 1)."""
    torch.backends.cudnn.allow_tf32 = allow_tf32
    dy_shape = (x_shape[0], out_c, *x_shape[2:])
    plan = W.plan_wgrad_launch(
        x_shape, dy_shape, kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1),
        dtype=dtype, device=torch.device("cuda"), config=config, splits=4,
    )
    element = _ELEMENT[dtype]
    pointers = {"x_ptr": f"*{element}", "dy_ptr": f"*{element}", "dw_ptr": "*fp32"}
    report = _compile(W.conv3d_wgrad_kernel, plan, pointers, config.num_warps, config.num_stages)
    report.update(tensor_cores=dtype != torch.float32 or allow_tf32,
                  tile=[config.block_m, config.block_n, config.block_k])
    return report


def compile_dgrad_sm90(dy_shape, c_in, dtype, allow_tf32) -> dict:
    """Compile the inference kernel as ``conv3d_dgrad`` launches it (flipped padding, no bias, no
    activation, no pool), with the config its heuristic picks on an H100 (132 SMs)."""
    torch.backends.cudnn.allow_tf32 = allow_tf32
    K._sm_count = lambda index: 132  # this subprocess has no GPU to ask
    plan = K.plan_launch(
        dy_shape, c_in, kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1),
        activation="none", negative_slope=0.0, pool=(), has_bias=False, dtype=dtype, device=torch.device("cuda", 0),
    )
    element = _ELEMENT[dtype]
    pointers = {"x_ptr": f"*{element}", "w_ptr": f"*{element}", "bias_ptr": f"*{element}", "out_ptr": f"*{element}",
                "in_stats_ptr": "*fp32", "res_ptr": f"*{element}"}
    report = _compile(K.conv3d_bias_act_pool_kernel, plan, pointers, plan.config.num_warps, plan.config.num_stages)
    report.update(tensor_cores=dtype != torch.float32 or allow_tf32,
                  tile=[plan.config.block_m, plan.config.block_n, plan.config.block_k])
    return report


def compile_backward_elementwise_sm90(kernel, y_shape, pool, dtype, activation="relu") -> dict:
    """Compile ``act_pool_backward_reduce_kernel`` or ``bn_backward_kernel`` as launched; no matrix math."""
    element = _ELEMENT[dtype]
    plan = B.plan_act_pool_backward(
        y_shape, eps=1e-5, activation=activation, negative_slope=0.0, pool=pool, has_norm=True, has_gamma=True,
        has_beta=True, device=torch.device("cuda"),
    )
    if kernel == "act_pool_backward":
        fn = B.act_pool_backward_reduce_kernel
        pointers = {"grad_out_ptr": f"*{element}", "y_ptr": f"*{element}", "dz_ptr": f"*{element}",
                    **{name: "*fp32" for name in ("mean_ptr", "var_ptr", "gamma_ptr", "beta_ptr",
                                                   "part_sum_ptr", "part_dot_ptr")}}
    else:
        fn = B.bn_backward_kernel
        plan = dataclasses.replace(
            plan,
            scalars={"positions": plan.scalars["out_positions"], "channels": plan.scalars["channels"], "eps": 1e-5},
            constexprs={"HAS_GAMMA": True, "BLOCK_P": plan.config.block_p, "BLOCK_C": plan.config.block_c},
        )
        pointers = {"dz_ptr": f"*{element}", "y_ptr": f"*{element}", "dy_ptr": f"*{element}",
                    **{name: "*fp32" for name in ("mean_ptr", "var_ptr", "gamma_ptr", "sum_dz_ptr",
                                                   "sum_dz_xhat_ptr")}}
    report = _compile(fn, plan, pointers, plan.config.num_warps, 1)
    report.update(tensor_cores=False, tile=[plan.config.block_p, plan.config.block_c])
    return report


def compile_depthwise_sm90(kind, config, dtype) -> dict:
    """Compile a depthwise kernel as its launcher launches it on CSN R101's stage-2 conv_b (batch 32,
    128 channels, 16×28×28, 3×3×3, padding 1; the input gradient from the stride-2 block)."""
    element = _ELEMENT[dtype]
    geometry = dict(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1))
    x_shape = (32, 128, 16, 28, 28)
    cuda = torch.device("cuda")
    if kind == "wgrad":
        plan = DW.plan_depthwise_wgrad_launch(x_shape, x_shape, **geometry, device=cuda, config=config)
        fn = DW.conv3d_depthwise_wgrad_kernel
        pointers = {"x_ptr": f"*{element}", "dy_ptr": f"*{element}", "part_ptr": "*fp32"}
    else:
        options = {
            "residual": dict(activation="relu", has_bias=True, has_residual=True),
            "silu": dict(activation="silu", has_bias=True),
            "stats_prologue": dict(stats=True, input_activation="relu", input_eps=1e-5),
            "dgrad": dict(transposed=True),
        }[kind]
        if kind == "dgrad":
            geometry["stride"] = (2, 2, 2)
            x_shape = (32, 128, 8, 14, 14)  # the output gradient of the stride-2 conv of a 16×28×28 input
        grid = (16, 28, 28) if kind == "dgrad" else x_shape[2:]
        plan = DW.plan_depthwise_launch(x_shape, grid, **geometry, device=cuda, config=config, **options)
        fn = DW.conv3d_depthwise_kernel
        pointers = {"x_ptr": f"*{element}", "w_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{element}",
                    "res_ptr": f"*{element}", "part_mean_ptr": "*fp32", "part_m2_ptr": "*fp32",
                    "in_stats_ptr": "*fp32"}
    report = _compile(fn, plan, pointers, config.num_warps, 1)
    report.update(tensor_cores=False, tile=[config.block_p, config.block_c])
    return report


def _compile(kernel, plan, pointers, num_warps, num_stages) -> dict:
    """triton.compile for sm_90 with a launch's specialisation, then ptxas -v."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, name in enumerate(kernel.arg_names):  # as triton's JIT specialises a launch
        if name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = divisible
        elif name in plan.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = plan.constexprs[name]
        elif isinstance(plan.scalars[name], float):
            signature[name] = "fp32"
        elif plan.scalars[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if plan.scalars[name] % 16 == 0:
                attrs[(i,)] = divisible
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    report = {
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": bool(re.search(r"\b(?:wgmma|mma)\.", ptx)),
        "atomics": atomics(ptx),
        "shared": int(compiled.metadata.shared),
        "num_warps": num_warps,
        "num_stages": num_stages,
        "registers": None, "spill_stores": None, "spill_loads": None, "ptxas": None,
    }
    ptxas = _ptxas()
    if ptxas is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            result = subprocess.run(
                [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True, text=True,
            )
        log = result.stdout + result.stderr
        report["ptxas"] = log if result.returncode else None
        if result.returncode == 0:
            report["registers"] = int(re.search(r"Used (\d+) registers", log).group(1))
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            report["spill_stores"], report["spill_loads"] = int(spills.group(1)), int(spills.group(2))
    return report


def _compile_all() -> dict:
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(ALL_CASES), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        reports = dict(zip(ALL_CASES, pool.map(_compile_case, ALL_CASES)))
    return reports


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm90_reports():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"sm_90 compilation failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ALL_CASES)
def test_sm90_machine_code(sm90_reports, case):
    report = sm90_reports[case]
    if report["tensor_cores"]:
        assert report["wgmma"], f"{case}: no wgmma in the sm_90 PTX (the matrix math misses Hopper tensor cores)"
    assert report["shared"] <= SHARED_MEMORY_LIMIT, f"{case}: {report['shared']} B shared memory > 227 KB"
    if report["registers"] is None:
        if report["ptxas"]:
            pytest.fail(f"{case}: ptxas rejected the PTX:\n{report['ptxas'][-2000:]}")
        pytest.skip("triton ships no ptxas to check registers and spills with")
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (
        f"{case}: spills {report['spill_stores']} B stores / {report['spill_loads']} B loads "
        f"with {report['registers']} registers"
    )


@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_sm90_depthwise_kernels_do_no_matrix_math(sm90_reports, case):
    """A depthwise conv reduces over no channels: its kernels multiply elementwise on the CUDA cores
    (an MMA there would mean a tile shape that pads the math into a GEMM)."""
    assert not sm90_reports[case]["mma"], f"{case}: MMA instructions in a depthwise kernel"


@pytest.mark.parametrize("case", list(STATISTICS_CASES))
def test_sm90_statistics_kernels_do_no_matrix_math(sm90_reports, case):
    """The statistics kernels sum rows in float64 on the CUDA cores: no MMA."""
    assert not sm90_reports[case]["mma"], f"{case}: MMA instructions in a statistics kernel"


@pytest.mark.parametrize("case", ALL_CASES)
def test_sm90_machine_code_has_no_atomics(sm90_reports, case):
    """Every sum is reduced in a fixed order (partials, then a reduction kernel), so a fused run
    repeats bit for bit on the same GPU and software, as ``torch.use_deterministic_algorithms`` asks."""
    assert sm90_reports[case]["atomics"] == [], f"{case}: atomics in the sm_90 PTX {sm90_reports[case]['atomics']}"


def test_launcher_picks_only_compiled_configs(monkeypatch):
    """The heuristic picks from HOPPER_CONFIGS (or their fp32 variants) for every C3D layer and
    batch size, so the cases above cover everything a GPU run can launch."""
    monkeypatch.setattr(K, "_sm_count", lambda index: 132)
    compiled = {case[0] for case in CASES.values()}
    seen = set()
    layers = [(3, 64, 16, 112), (64, 128, 16, 56), (128, 256, 8, 28), (256, 256, 8, 28), (256, 512, 4, 14),
              (512, 512, 4, 14), (512, 512, 2, 7), (5, 7, 4, 8), (20, 7, 4, 8), (32, 96, 8, 16),
              (64, 64, 8, 56)]  # the last: R3D-18 layer1
    for batch in (1, 2, 32):
        for in_c, out_c, depth, size in layers:
            for dtype, tf32 in _DTYPES.values():
                config = K.select_config(
                    in_c, out_c, 27, batch * depth * size * size, dtype, torch.device("cuda", 0), tf32
                )
                assert config in compiled, config
                seen.add(config)
    assert set(K.HOPPER_CONFIGS) <= seen, "a shipped config is never picked"
    # with the input prologue (deferred BatchNorm of the previous layer) and a pool, the launcher
    # runs its variant of the config: each of those is compiled too
    prologue_pooled = {case[0] for case in PROLOGUE_CASES.values() if case[3] and case[6] == "inference"}
    for config in K.HOPPER_CONFIGS:
        for dtype, tf32 in _DTYPES.values():
            launched = config.for_dtype(dtype, tf32)
            assert K.with_prologue_and_pool(launched, dtype, tf32) in prologue_pooled, (launched, dtype)


def test_wgrad_launcher_picks_only_compiled_configs(monkeypatch):
    """The weight-gradient launcher's GPU rule (``select_wgrad_config``, run by ``plan_wgrad_launch``
    with its split count) picks from WGRAD_HOPPER_CONFIGS' dtype variants for every C3D and R3D-18
    layer, so the wgrad cases above cover what a GPU training step launches; every shipped config is
    picked by some layer."""
    monkeypatch.setattr(W, "_sm_count", lambda index: 132)
    compiled = {case[0] for case in WGRAD_CASES.values()}
    seen = set()
    layers = [(3, 64, 16, 112), (64, 128, 16, 56), (128, 256, 8, 28), (256, 256, 8, 28), (256, 512, 4, 14),
              (512, 512, 2, 7), (5, 7, 4, 8), (64, 64, 8, 56), (128, 128, 4, 28)]
    for batch in (1, 32):
        for in_c, out_c, depth, size in layers:
            x_shape, dy_shape = (batch, in_c, depth, size, size), (batch, out_c, depth, size, size)
            for dtype, tf32 in _DTYPES.values():
                monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)  # what the launcher reads
                plan = W.plan_wgrad_launch(x_shape, dy_shape, kernel_size=(3, 3, 3), stride=(1, 1, 1),
                                           padding=(1, 1, 1), dilation=(1, 1, 1), dtype=dtype,
                                           device=torch.device("cuda", 0))
                assert plan.config in compiled, (in_c, out_c, dtype, plan.config)
                seen.add(plan.config)
    assert {c.for_dtype(d, t) for c in W.WGRAD_HOPPER_CONFIGS for d, t in _DTYPES.values()} <= seen


def test_autotuning_picks_only_compiled_configs():
    """With autotuning on (``c3dzoo.set_triton_autotune``), the launchers may run any of their
    tuning candidates: each is among the configs compiled above, for every input channel count,
    dtype and launch kind (inference, inference with prologue and pool, statistics, weight grad)."""
    compiled = {case[0] for case in CASES.values()}
    prologue_pooled = {case[0] for case in PROLOGUE_CASES.values() if case[3] and case[6] == "inference"}
    stats = {case[0] for case in STATS_CASES.values()}
    wgrad = {case[0] for case in WGRAD_CASES.values()}
    for in_c in (16, 20, 32, 64, 96, 128, 256, 512):
        for dtype, tf32 in _DTYPES.values():
            for default in (K.CHANNEL_BLOCKS_128x128x64, K.CHANNEL_BLOCKS_64x64x64):
                default = default.for_dtype(dtype, tf32)
                assert set(K.tuning_candidates(default, K.HOPPER_CONFIGS, in_c, dtype, tf32)) <= compiled & stats
                variant = functools.partial(K.with_prologue_and_pool, dtype=dtype, tf32=tf32)
                assert set(K.tuning_candidates(variant(default), K.HOPPER_CONFIGS, in_c, dtype, tf32,
                                               variant=variant)) <= prologue_pooled
            default = W.WGRAD_64x64x64.for_dtype(dtype, tf32)
            assert set(K.tuning_candidates(default, W.WGRAD_HOPPER_CONFIGS, in_c, dtype, tf32,
                                           channel_step=lambda c: c.block_m)) <= wgrad


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
