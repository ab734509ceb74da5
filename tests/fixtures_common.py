"""Helpers shared by the fixture generators."""
import math

import torch


def perturb(model, gen):
    """Adds noise to every parameter, the zero-initialised ones included, so that each one matters to the outputs:
    matrices and kernels at the default-init scale (0.6 / sqrt(fan_in), so activations stay O(1) through deep
    networks), vectors (norms, biases) at 0.1."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if not t.is_floating_point():
                continue
            if t.dim() >= 2:
                t.add_(torch.randn(t.shape, generator=gen) * (0.6 / math.sqrt(t[0].numel())))
            else:
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
