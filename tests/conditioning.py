"""BatchNorm conditioning for tests that compare fp32 gradients tightly (fused against stock)."""

import torch
from torch import nn


def condition_batch_norms(model: nn.Module, seed: int = 4) -> None:
    """Each BatchNorm3d: running statistics drawn near (0, 1), γ = 0.5 and β = ±3 (a random sign a
    channel; +3 for the BNs that feed a residual add, ``norm_c`` and ``branch1_norm``), as
    test_models_zoo's ``_condition`` does, so no ReLU input lies within rounding of its kink."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, bn in model.named_modules():
            if isinstance(bn, nn.BatchNorm3d):
                bn.running_mean.uniform_(-0.2, 0.2, generator=gen), bn.running_var.uniform_(0.5, 1.5, generator=gen)
                bn.weight.fill_(0.5)
                sign = torch.randint(0, 2, (bn.num_features,), generator=gen) * 2 - 1
                bn.bias.copy_(3.0 if name.endswith(("norm_c", "branch1_norm")) else 3.0 * sign)
