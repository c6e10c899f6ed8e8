"""Every variant accepts activations of any leading shape, as the spliced metrics pass [batch, pos, d_in]."""

from __future__ import annotations

import pytest
import torch

from saelab.saes import build_sae

VARIANTS = [("relu.ReluSAE", {}), ("gated.GatedSAE", {}), ("jumprelu.JumpReLUSAE", {}),
            ("topk.TopKSAE", {"k": 4}), ("batchtopk.BatchTopKSAE", {"k": 4})]


@pytest.mark.parametrize(("target", "extra"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_batch_by_position_input_matches_flat_tokens(target, extra):
    torch.manual_seed(0)
    sae = build_sae({"_target_": f"saelab.saes.{target}", "d_in": 8, "d_sae": 32, **extra}).eval()
    x = torch.randn(2, 5, 8)
    assert sae(x).shape == (2, 5, 8) and sae.encode(x).shape == (2, 5, 32)
    torch.testing.assert_close(sae(x).reshape(10, 8), sae(x.reshape(10, 8)))
    torch.testing.assert_close(sae.encode(x).reshape(10, 32), sae.encode(x.reshape(10, 8)))
