"""MSF EMA: target <- m target + (1 - m) online on the parameters; the target's BatchNorm buffers are its own."""
import copy

import pytest
import torch

import common


def randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.5, 0.0, 1.0])
def test_ema_update_against_float64(momentum):
    online = common.build_encoder("resnet10", 16)
    target = copy.deepcopy(online)
    randomise(online, 0)
    randomise(target, 1)
    expected = [momentum * t.double() + (1 - momentum) * o.double()
                for t, o in zip(target.parameters(), online.parameters())]
    online_before = copy.deepcopy(online.state_dict())
    common.ema_update_(target, online, momentum)
    for (name, p), e in zip(target.named_parameters(), expected):
        torch.testing.assert_close(p.double(), e, atol=2e-6, rtol=1e-6, msg=name)
    for name, value in online.state_dict().items():
        assert torch.equal(value, online_before[name]), name  # the online network is only read


def test_repeated_ema_converges_geometrically():
    online, target = common.mlp(4, 8, 3), common.mlp(4, 8, 3)
    randomise(online, 2)
    randomise(target, 3)
    start = [t.detach().double().clone() for t in target.parameters()]
    for _ in range(10):
        common.ema_update_(target, online, 0.9)
    for t0, t, o in zip(start, target.parameters(), online.parameters()):
        expected = o.double() + 0.9 ** 10 * (t0 - o.double())
        torch.testing.assert_close(t.double(), expected, atol=1e-6, rtol=0)


def test_target_batchnorm_buffers_untouched():
    online = common.build_encoder("resnet10", 16)
    target = copy.deepcopy(online)
    randomise(online, 4)
    online.train()
    with torch.no_grad():  # give the online BN different running statistics
        online(torch.randn(4, 3, 16, 16))
    buffers_before = {name: b.clone() for name, b in target.named_buffers()}
    assert any(not torch.equal(b, dict(target.named_buffers())[n]) for n, b in online.named_buffers())
    weight_before = target.projection[0].weight.clone()
    common.ema_update_(target, online, 0.99)
    for name, b in target.named_buffers():
        assert torch.equal(b, buffers_before[name]), name
    assert not torch.equal(target.projection[0].weight, weight_before)  # while the parameters moved
