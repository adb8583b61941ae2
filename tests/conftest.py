import pytest
import torch

import ssm_hf
from ssm_hf.data import python_stdlib_text, train_bpe_tokenizer


def tiny_mamba_config(**overrides) -> ssm_hf.MambaConfig:
    """The zoo's tiny Mamba with ids 0 reserved for padding; no eos so that generation runs its full length."""
    fields = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
    fields.update(overrides)
    return ssm_hf.preset_config("mamba-tiny", **fields)


def spread_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every weight with fresh noise, so that a random model's outputs vary with the input
    (a freshly initialised tiny model tends to repeat one token, which would make generation tests weak)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                continue  # keep A = -exp(A_log) in its usual range
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return model


@pytest.fixture(scope="session")
def stdlib_text() -> str:
    return python_stdlib_text(60_000)


@pytest.fixture(scope="session")
def tokenizer(stdlib_text):
    return train_bpe_tokenizer(stdlib_text, vocab_size=512)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """max |actual - expected| <= tol * max |expected|: float32 rounding relative to the tensor's scale."""
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    err = (actual.detach().double() - expected.detach().double()).abs().max() / scale
    assert err <= tol, f"max abs difference is {err.item():.3g} of max |expected|, above {tol:g}"
