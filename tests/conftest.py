import inspect
import os
from types import SimpleNamespace

import torch

# Without a GPU, Triton kernels run in its interpreter (numpy on the CPU); this must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

import ssm_hf  # noqa: E402
from ssm_hf.data import python_stdlib_text, train_bpe_tokenizer  # noqa: E402

# family -> (tiny preset, our causal LM, transformers' config class and causal LM with the same state dict, or
# None where transformers has no such model)
FAMILIES = {
    "mamba": ("mamba-tiny", ssm_hf.MambaForCausalLM, transformers.MambaConfig, transformers.MambaForCausalLM),
    "mamba2": ("mamba2-tiny", ssm_hf.Mamba2ForCausalLM, transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
    "s4": ("s4-tiny", ssm_hf.S4ForCausalLM, None, None),
    "s4d": ("s4d-tiny", ssm_hf.S4ForCausalLM, None, None),
}


class KernelParam:
    """A stand-in for a JITFunction's parameter (name, default; upper-case names are constexprs), for tests of the
    launch paths without a GPU."""

    def __init__(self, name, default=inspect.Parameter.empty):
        self.name, self.default = name, default
        self.is_constexpr = name.isupper()


class StandInDriver:
    """Triton's `driver.active` for launch-path tests without a GPU: device 0, stream 1234, an NVIDIA target (set
    `backend` for another)."""

    backend = "cuda"

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234

    def get_current_target(self):
        return SimpleNamespace(backend=self.backend)


@pytest.fixture
def stand_in_driver(monkeypatch):
    """The StandInDriver as Triton's active driver until the test ends, FastLaunch's cache on."""
    from triton.runtime.driver import driver

    monkeypatch.delenv("SSM_HF_TRITON_LAUNCH_CACHE", raising=False)
    # (reset_active would ask for a real GPU driver)
    stand_in = StandInDriver()
    monkeypatch.setattr(driver, "_active", stand_in)
    yield stand_in


def tiny_config(family: str = "mamba", **overrides):
    """The zoo's tiny preset of `family`, id 0 reserved for padding, no eos (generation runs its full length)."""
    fields = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
    fields.update(overrides)
    return ssm_hf.preset_config(FAMILIES[family][0], **fields)


def tiny_mamba_config(**overrides) -> ssm_hf.MambaConfig:
    return tiny_config("mamba", **overrides)


def causal_lm_class(family: str):
    return FAMILIES[family][1]


def transformers_twin(family: str, config):
    """transformers' in-tree causal LM of the same architecture as our `config` (random weights)."""
    _, _, their_config_class, their_model_class = FAMILIES[family]
    if their_model_class is None:
        raise ValueError(f"transformers has no in-tree model of the {family} family")
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "scan_chunk_size")}
    return their_model_class(their_config_class(**fields)).eval()


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


def tiny_lm(preset: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A causal LM of a tiny zoo preset (id 0 for padding, no eos), weights spread by `spread_weights`, in eval."""
    fields = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(ssm_hf.preset_config(preset, **fields))
    return spread_weights(model, seed=seed).eval()


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: they gain nothing from more, and on a busy machine spinning thread pools
    make each small op take tens of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
