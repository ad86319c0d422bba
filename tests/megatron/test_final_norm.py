"""`use_torch_final_norm`: the hybrid stack's final norm without Transformer Engine (GPU machines without TE)."""

import pytest
from megatron.core.extensions import transformer_engine
from megatron.core.models.hybrid import hybrid_block

from echo_megatron.megatron.norm import TorchNorm, use_torch_final_norm


@pytest.mark.parametrize("have_te, only_without_te, swapped", [(True, True, False), (False, True, True),
                                                               (True, False, True)])
def test_final_norm_becomes_torch_norm_only_without_te_unless_forced(monkeypatch, have_te, only_without_te, swapped):
    monkeypatch.setattr(transformer_engine, "HAVE_TE", have_te)
    monkeypatch.setattr(hybrid_block, "TENorm", transformer_engine.TENorm)
    assert use_torch_final_norm(only_without_te) is swapped
    assert (hybrid_block.TENorm is TorchNorm) is swapped
