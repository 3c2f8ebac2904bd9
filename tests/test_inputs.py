"""Bad input gets a clear error naming what is wrong, before any kernel runs."""

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct
from c3dzoo.ops import conv3d_bn_act


def _args(c_in=3, c_out=4, dtype=torch.float32):
    w = torch.randn(c_out, c_in, 3, 3, 3, dtype=dtype)
    return dict(
        conv_weight=w, conv_bias=torch.zeros(c_out, dtype=dtype), bn_weight=torch.ones(c_out),
        bn_bias=torch.zeros(c_out), running_mean=torch.zeros(c_out), running_var=torch.ones(c_out),
    )


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "x, kwargs, error, pattern",
    [
        (_x(3, 4, 6, 6), {}, ValueError, r"x must be 5-D .* got shape \(3, 4, 6, 6\)"),
        (_x(1, 5, 4, 6, 6), {}, ValueError, r"x has 5 channels but conv_weight .* expects 3 per group"),
        (torch.ones(1, 3, 4, 6, 6, dtype=torch.int64), {}, TypeError, r"floating tensor .* torch.int64"),
        (_x(1, 3, 4, 6, 6, dtype=torch.float64), {}, TypeError, r"x is torch.float64 but conv_weight is torch.float32"),
        (_x(1, 3, 4, 6, 6), {"activation": "gelu"}, ValueError, r"activation must be one of"),
        (_x(1, 3, 4, 6, 6), {"backend": "tpu"}, ValueError, r"unknown c3dzoo backend 'tpu'"),
        (_x(1, 3, 2, 2, 2), {"padding": 0}, ValueError, r"too small for kernel"),
        (_x(1, 3, 4, 6, 6), {"pool": ((2, 2, 2), (2, 2, 2), (2, 0, 0))}, ValueError, r"pool padding"),
        (_x(1, 3, 4, 6, 6), {"pool": "max"}, ValueError, r"pool must be None"),
        (_x(1, 3, 4, 6, 6), {"stride": (1, 2)}, ValueError, r"stride must be an int or 3 ints"),
        (_x(1, 3, 4, 6, 6), {"momentum": None}, ValueError, r"momentum=None .* needs num_batches_tracked"),
        (_x(1, 3, 1, 1, 1), {"padding": 0, "_kernel": 1}, ValueError, r"Expected more than 1 value per channel"),
        (_x(1, 3, 4, 6, 6), {"_weight": None}, TypeError, r"conv_weight must be a torch.Tensor, got NoneType"),
        (_x(1, 3, 4, 6, 6).numpy(), {}, TypeError, r"x must be a torch.Tensor, got ndarray"),
        (_x(1, 3, 4, 6, 6), {"_weight": torch.randn(4, 3, 3, 3)}, ValueError,
         r"conv_weight must be 5-D \(C_out, C_in, kD, kH, kW\), got shape \(4, 3, 3, 3\)"),
        (_x(1, 3, 4, 6, 6), {"_running_var": torch.ones(4, dtype=torch.int64)}, TypeError,
         r"running_var must be floating point, got torch.int64"),
        (_x(1, 3, 4, 6, 6), {"_bn_weight": [1.0] * 4}, TypeError, r"bn_weight must be a torch.Tensor or None, got list"),
        (_x(1, 3, 4, 6, 6), {"pool": ((0, 2, 2), None, 0)}, ValueError, r"pool kernel_size and stride must be positive"),
        (_x(1, 3, 4, 6, 6), {"pool": nn.MaxPool3d(2, return_indices=True)}, ValueError,
         r"pool: return_indices=True is not supported"),
        (_x(1, 3, 4, 6, 6), {"pool": nn.MaxPool3d(2, dilation=2)}, ValueError, r"pool: dilation other than 1"),
        (_x(1, 3, 4, 6, 6), {"pool": (2.0, 2, 0)}, ValueError, r"pool kernel_size must be an int or 3 ints"),
        # an empty conv output that the pool's padding alone would turn into one pooled position
        (_x(1, 3, 2, 6, 6), {"padding": 0, "pool": ((2, 1, 1), (2, 1, 1), (1, 0, 0))}, ValueError,
         r"too small for kernel"),
    ],
)
def test_bad_input_is_named(x, kwargs, error, pattern):
    kernel = kwargs.pop("_kernel", 3)
    args = _args()
    if "_weight" in kwargs:
        args["conv_weight"] = kwargs.pop("_weight")
    for name in [k for k in kwargs if k.startswith("_")]:
        args[name[1:]] = kwargs.pop(name)
    if kernel != 3:
        args["conv_weight"] = args["conv_weight"][..., :kernel, :kernel, :kernel].contiguous()
    kwargs.setdefault("padding", 1 if "pool" not in kwargs else 0)
    with pytest.raises(error, match=pattern):
        conv3d_bn_act(x, **args, training=True, **kwargs)


@pytest.mark.parametrize("pool", [
    nn.MaxPool3d((1, 2, 2)),
    ((1, 2, 2), None, 0),  # stride None: the kernel size, as nn.MaxPool3d
    {"kernel_size": (1, 2, 2)},
    {"kernel_size": 2, "stride": 2, "padding": (0, 1, 1)},
])
def test_every_pool_spelling_is_the_max_pool_it_names(pool):
    """``pool`` takes an nn.MaxPool3d, (kernel_size, stride, padding) or the MaxPool3d keyword dict."""
    args = _args()
    x = _x(2, 3, 4, 6, 6)
    if isinstance(pool, nn.MaxPool3d):
        stock_pool = pool
    elif isinstance(pool, dict):
        stock_pool = nn.MaxPool3d(**pool)
    else:
        stock_pool = nn.MaxPool3d(pool[0], pool[1], pool[2])
    expected = stock_pool(torch.relu(nn.functional.batch_norm(
        nn.functional.conv3d(x, args["conv_weight"], args["conv_bias"], padding=1), args["running_mean"],
        args["running_var"], args["bn_weight"], args["bn_bias"], training=False)))
    out = conv3d_bn_act(x, **args, training=False, padding=1, pool=pool, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_parameter_shape_mismatch_is_named():
    args = _args()
    args["running_var"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        conv3d_bn_act(_x(1, 3, 4, 6, 6), **args, training=False, padding=1)


def test_device_mismatch_is_named():
    args = _args()
    args["bn_weight"] = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match=r"bn_weight is on meta but x is on cpu"):
        conv3d_bn_act(_x(1, 3, 4, 6, 6), **args, training=True, padding=1)


def test_eval_mode_needs_running_stats_pair():
    args = _args()
    args["running_var"] = None
    with pytest.raises(ValueError, match=r"running_mean and running_var must both be given"):
        conv3d_bn_act(_x(1, 3, 4, 6, 6), **args, training=False, padding=1)


def test_module_rejects_unfusable_configuration():
    with pytest.raises(ValueError, match=r"ceil_mode=True is not supported"):
        Conv3dBNAct(3, 4, 3, padding=1, pool=nn.MaxPool3d(2, ceil_mode=True))
    with pytest.raises(ValueError, match=r"activation must be"):
        Conv3dBNAct(3, 4, 3, activation="swish")


def test_model_input_size_is_named():
    model = c3dzoo.c3d_bn(width_mult=0.125, input_size=(16, 32, 32), num_classes=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, 16, 32, 32\)"):
        model(torch.randn(1, 3, 16, 64, 64))
    with pytest.raises(ValueError, match=r"expects input of shape"):
        model(torch.randn(3, 16, 32, 32))


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"unknown model 'c4d'"):
        c3dzoo.get_model("c4d")
