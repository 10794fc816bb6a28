"""GraphedModel: replaying a model's forward from a CUDA graph (diffusion_fast.cuda_graphs)."""

import pytest
import torch

from diffusion_fast.cuda_graphs import GraphedModel


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="model must be callable"):
        GraphedModel(3)
    g = GraphedModel(lambda x, t: x)
    with pytest.raises(TypeError, match="inputs must be tensors"):
        g()
    with pytest.raises(TypeError, match="inputs must be tensors, got \\['Tensor', 'int'\\]"):
        g(torch.zeros(1), 1)
    with pytest.raises(ValueError, match="CUDA tensors on one device, got \\['cpu'\\]"):
        g(torch.zeros(1), torch.zeros(1))
    with pytest.raises(TypeError, match="cudnn_benchmark must be a bool, got int"):
        GraphedModel(lambda x: x, cudnn_benchmark=1)


@pytest.mark.cuda
def test_any_number_of_inputs_replays_the_model():
    """One input (a text encoder's tokens) and two (a denoiser's x, t): each replay equals the eager
    call on the new values, and one graph serves every call of one shape."""
    dev = torch.device("cuda")
    w = torch.randn(8, 8, device=dev)
    one = GraphedModel(lambda tokens: w[tokens].sum(1).tanh())
    two = GraphedModel(lambda x, t: (x @ w) * t[:, None].float())
    with pytest.raises(RuntimeError, match="inference only"):
        one(torch.zeros(2, 3, dtype=torch.long, device=dev))
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            tokens = torch.randint(0, 8, (2, 3), device=dev)
            x, t = torch.randn(4, 8, device=dev), torch.randint(0, 9, (4,), device=dev)
            torch.testing.assert_close(one(tokens).clone(), w[tokens].sum(1).tanh())
            torch.testing.assert_close(two(x, t).clone(), (x @ w) * t[:, None].float())
    assert len(one._graphs) == 1 and len(two._graphs) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("cudnn_benchmark", [True, False])
def test_capture_autotunes_convolutions_and_restores_the_flag(cudnn_benchmark):
    """The warm-up and capture run in cuDNN's benchmark mode (unless cudnn_benchmark=False); the global flag is
    what it was before, after the capture; the replay equals the eager conv."""
    seen = []
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).cuda()

    def model(x):
        seen.append(torch.backends.cudnn.benchmark)
        return conv(x)

    graph = GraphedModel(model, cudnn_benchmark=cudnn_benchmark)
    x = torch.randn(2, 8, 12, 12, device="cuda")
    before = torch.backends.cudnn.benchmark
    with torch.no_grad():
        out = graph(x).clone()
        torch.testing.assert_close(out, conv(x))
    assert torch.backends.cudnn.benchmark == before
    assert seen and all(flag == (cudnn_benchmark or before) for flag in seen)
