"""remat replays dropout exactly on every device its tensors live on, and leaves the RNGs alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptfn.model.remat import remat

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def _rng_states(device: str) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device != "cpu":
        states.append(torch.get_device_module(device).get_rng_state())
    return states


def _dropped(p: dict, x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x * p["w"], 0.5, training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", ["backward", "torch.func.grad"])
def test_backward_replays_the_forward_dropout_mask(device, api):
    x = torch.ones(64, 64, device=device)
    p = {"w": torch.ones(64, device=device)}
    torch.manual_seed(0)
    forward_mask = _dropped(p, x)  # = 2 * mask: what the forward draws from seed 0
    assert 0.3 < float((forward_mask == 0).float().mean()) < 0.7
    seen = {}

    def total(x: torch.Tensor) -> torch.Tensor:
        y = remat(_dropped)(p, x)
        if api == "backward":
            assert torch.equal(y, forward_mask)
        torch.rand(100, device=device)  # the streams move on between forward and backward
        seen["before"] = _rng_states(device)
        return y.sum()

    # with x = w = 1, y = 2 * mask and dy/dx = 2 * mask * w = y: the gradient shows the mask
    # that the backward drew
    torch.manual_seed(0)
    if api == "backward":
        (grad,) = torch.autograd.grad(total(x.requires_grad_(True)), x)
    else:
        grad = torch.func.grad(total)(x)
    assert torch.equal(grad, forward_mask), "the backward drew a different dropout mask"
    after = _rng_states(device)
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], after)), "backward moved an RNG"
