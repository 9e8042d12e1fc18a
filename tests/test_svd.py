"""The lora-svd baseline: prefixes of the re-factored adapter are the best rank-k approximations of ΔW."""
import pytest
import torch

from conftest import tiny_model
from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, load_matryoshka_model, use_rank
from matryoshka_lora.svd import svd_adapter, svd_factors
from test_core import randomize_, tokens


def test_factors_reproduce_delta_and_truncate_optimally():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)
    A2, B2 = svd_factors(A, B, 0.25)
    delta = 0.25 * B @ A
    torch.testing.assert_close(B2 @ A2, delta, atol=1e-5, rtol=1e-5)
    S = torch.linalg.svdvals(delta.double())
    for k in range(1, 9):
        err = torch.linalg.matrix_norm((delta - B2[:, :k] @ A2[:k]).double())
        # Eckart–Young: the Frobenius error of the best rank-k approximation
        assert err.item() == pytest.approx(S[k:].square().sum().sqrt().item(), rel=1e-4, abs=1e-5)


def test_svd_adapter_at_full_rank_equals_lora(tmp_path):
    model = randomize_(get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, method="lora", scaling="rank")))
    model.save_pretrained(tmp_path / "lora")
    svd_adapter(tmp_path / "lora", tmp_path / "svd")
    svd = load_matryoshka_model(tiny_model(), tmp_path / "svd")
    assert svd.matryoshka.config.scaling == "none"
    with use_rank(model, 8), use_rank(svd, 8), torch.no_grad():
        torch.testing.assert_close(svd(tokens()).logits, model(tokens()).logits, atol=1e-4, rtol=1e-4)


def test_svd_adapter_refuses_other_methods(tmp_path):
    model = get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=4))
    with pytest.raises(ValueError, match="method 'lora'"):
        svd_adapter(model, tmp_path / "svd")
