"""`echo_megatron.ops.portable` (copied into exported models): the same outputs as `echo_megatron.ops`, and a
clear error for the backends only the package has."""

import pytest
import torch

from echo_megatron.ops import portable, ska


def test_portable_ska_equals_the_package_torch_path():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 37, 3, 6, generator=generator) for _ in range(2))
    v = torch.randn(2, 37, 3, 5, generator=generator)
    eta, gamma = torch.rand(3, generator=generator) + 0.5, 1.0 + 0.5 * torch.rand(3, generator=generator)
    options = dict(eta=eta, gamma=gamma, chunk_size=8, power=2, eps=1e-3, norm="causal_max", power_iters=6)
    assert torch.equal(portable.ska(q, k, v, **options), ska(q, k, v, backend="torch", **options))


def test_portable_ska_refuses_package_only_backends():
    x = torch.zeros(1, 4, 1, 2)
    with pytest.raises(ValueError, match="ska_backend must be one of"):
        portable.ska(x, x, x, eta=torch.ones(1), gamma=torch.ones(1), backend="triton")
