"""DWConvBNSwish / BNSwish: NVAE-style state dicts load, and training steps match nn.Conv2d + nn.BatchNorm2d + SiLU
(outputs, parameter grads, running stats, num_batches_tracked)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusion_fast
from diffusion_fast.nn import BNSwish, DWConvBNSwish

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits


class EagerDWConvBNSwish(nn.Module):
    """The unfused layers, with the submodule names NVAE's code uses."""

    def __init__(self, channels, k=5, bias=True, momentum=0.1, track_running_stats=True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=bias)
        self.bn = nn.BatchNorm2d(channels, momentum=momentum, track_running_stats=track_running_stats)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


def randomize(module):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else 0.5 * torch.randn_like(t))


def compare_steps(ours, ref, shape, steps=3, layout=torch.contiguous_format):
    """A few train steps then an eval step: same outputs, grads and buffers."""
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        ref.train(training)
        x = (torch.randn(shape) + 1.0).to(memory_format=layout)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        if training:
            gy = torch.randn_like(y)
            grads = torch.autograd.grad(y, list(ours.parameters()), gy)
            grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), gy)
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("k", [3, 5])
def test_dwconv_module_matches_unfused_layers(backend, k):
    ref = EagerDWConvBNSwish(6, k)
    randomize(ref)
    ours = DWConvBNSwish(6, k)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # strict: NVAE-style keys load unchanged
    with diffusion_fast.use_backend(backend):
        compare_steps(ours, ref, (4, 6, 7, 5))
        compare_steps(ours, ref, (2, 6, 6, 6), layout=torch.channels_last)
    assert int(ours.bn.num_batches_tracked) == 6


def test_dwconv_module_momentum_none_and_no_running_stats():
    """momentum=None is BatchNorm's cumulative average; track_running_stats=False always uses batch stats."""
    for kw in (dict(momentum=None), dict(track_running_stats=False)):
        ref = EagerDWConvBNSwish(4, 3, bias=False, **kw)
        randomize(ref)
        ours = DWConvBNSwish.from_modules(ref.conv, ref.bn)
        ref_copy = EagerDWConvBNSwish(4, 3, bias=False, **kw)
        ref_copy.load_state_dict(ref.state_dict())
        compare_steps(ours, ref_copy, (3, 4, 5, 5))


def test_bn_swish_module_matches_batchnorm_silu():
    ref = nn.Sequential(nn.BatchNorm2d(5), nn.SiLU())
    randomize(ref)
    ours = BNSwish(5)
    ours.bn.load_state_dict(ref[0].state_dict())
    for step in range(3):
        ours.train(step < 2)
        ref.train(step < 2)
        x = torch.randn(3, 5, 4, 6)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bn.running_var, ref[0].running_var)
    assert int(ours.bn.num_batches_tracked) == 2
    assert "swish=True" in repr(ours)


def test_unfusable_conv_runs_unfused():
    """A conv the fused op does not compute (here stride 2) still gives the layers' result."""
    ref = EagerDWConvBNSwish(4, 3)
    randomize(ref)
    ref.conv.stride = (2, 2)
    ours = DWConvBNSwish.from_modules(ref.conv, ref.bn)
    assert not ours._fusable()
    ref.eval()
    ours.eval()
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(ours(x), ref(x))


def test_even_kernel_size_rejected():
    with pytest.raises(ValueError, match="odd"):
        DWConvBNSwish(4, 4)
