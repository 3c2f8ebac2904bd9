"""The check that a zoo model is another library's model (torchvision's, PyTorchVideo's)."""

from typing import Sequence

import torch
from torch import nn


def assert_same_model(theirs: nn.Module, ours: nn.Module, their_input, our_inputs: Sequence) -> None:
    """Both built from the same seed (both in eval mode): the same state_dict keys in the same
    order and the same values; ``ours`` on each of ``our_inputs`` gives ``theirs``'s output on
    ``their_input`` bit for bit; fused (``ours.fused = True``) it gives it within fp32 rounding."""
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(our_sd) == list(their_sd)
    assert all(torch.equal(our_sd[k], v) for k, v in their_sd.items())
    with torch.no_grad():
        expected = theirs(their_input)
        for x in our_inputs:
            assert torch.equal(ours(x), expected)
        ours.fused = True
        torch.testing.assert_close(ours(our_inputs[0]), expected, rtol=1e-4, atol=1e-5)
