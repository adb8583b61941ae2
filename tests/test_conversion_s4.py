"""State-spaces S4 / S4D checkpoints into ssm-hf (`ssm-hf convert --from s4`).

Checkpoints are random tensors laid out here as state-spaces writes them (example.py's S4Model around
models/s4/s4d.py's S4D or models/s4/s4.py's S4Block): their names, shapes and conventions (A = -f(A_real) -
i g(A_imag) with the configured transforms, B and C as real views of complex vectors, Δ/A/B/P shared across channels
and n_ssm groups, the DPLR C stored as C̃ attuned to the `l_kernel` buffer). Each converted model is checked against
a float64 step-by-step recurrence written here from those conventions (full conjugate-symmetric state, ZOH or
bilinear discretisation, the DPLR matrix Λ - P P*, C from C̃ through (I - Ā^L)), not through ssm-hf's kernels.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ssm_hf.cli import main
from ssm_hf.conversion import ConversionError, convert_checkpoint

H, N = 8, 8          # d_model, d_state (N/2 = 4 conjugate pairs)
M = N // 2
TOKENS = 40


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def s4_config(layer: dict, **top) -> dict:
    config = dict(d_model=H, n_layers=2, n_tokens=TOKENS, d_output=TOKENS, pool=None, prenorm=False, dropout=0.1,
                  layer=layer)
    config.update(top)
    return copy.deepcopy(config)  # the tests edit it


def _inverse_transform(value: torch.Tensor, transform: str) -> torch.Tensor:
    """The stored parameter whose state-spaces transform gives the positive `value`."""
    return {"exp": torch.log(value), "softplus": torch.log(torch.expm1(value)), "relu": value - 1e-4,
            "none": value, "sigmoid": torch.logit(value)}[transform]


def final_act(layer: dict):
    """S4Block's output activation: `postact` is the old name of `final_act` (which is then null)."""
    return layer.get("postact") or layer.get("final_act", "glu")


def s4_state_dict(config: dict, seed: int = 0, tied: bool = False, l_kernels=(0, 0)) -> dict:
    """Random tensors with the names and shapes state-spaces writes for `config` (example.py's S4Model)."""
    g = torch.Generator().manual_seed(seed)
    layer = config["layer"]

    def uniform(lo, hi, *shape):
        return torch.empty(*shape).uniform_(lo, hi, generator=g)

    def normal(std, *shape):
        return std * torch.randn(*shape, generator=g)

    sd = {"encoder.weight": normal(1.0, config["n_tokens"], H)}
    for i in range(config["n_layers"]):
        p = f"s4_layers.{i}."
        sd[f"norms.{i}.weight"], sd[f"norms.{i}.bias"] = 1 + normal(0.2, H), normal(0.2, H)
        if layer["_name_"] == "s4d":
            sd[p + "kernel.log_dt"] = torch.log(uniform(0.05, 0.3, H))
            sd[p + "kernel.log_A_real"] = torch.log(uniform(0.2, 0.8, H, M))
            sd[p + "kernel.A_imag"] = math.pi * torch.arange(M).float() + normal(0.3, H, M)
            sd[p + "kernel.C"] = normal(0.7, H, M, 2)
            sd[p + "D"] = normal(1.0, H)
            sd[p + "output_linear.0.weight"] = normal(H ** -0.5, 2 * H, H, 1)
            sd[p + "output_linear.0.bias"] = normal(0.2, 2 * H)
            continue
        k = p + "layer.kernel."
        channels, n_ssm, rank = layer.get("channels", 1), layer.get("n_ssm") or H, layer.get("rank", 1)
        sd[k + "inv_dt"] = _inverse_transform(uniform(0.05, 0.3, H, 1), layer.get("dt_transform", "exp"))
        sd[k + "A_real"] = _inverse_transform(uniform(0.2, 0.8, n_ssm, M), layer.get("real_transform", "exp"))
        sd[k + "A_imag"] = uniform(0.0, 4.0, n_ssm, M)  # their A = ... - i A_imag: frequencies >= 0 as initialised
        sd[k + "B"] = normal(0.7, 1, n_ssm, M, 2)
        sd[k + "C"] = normal(0.7, channels, H, M, 2)
        if layer.get("mode", "dplr") in ("dplr", "nplr", "s4"):
            sd[k + "P"] = normal(0.3, rank, n_ssm, M, 2)
            sd[k + "l_kernel"] = torch.tensor(l_kernels[i])
        sd[p + "layer.D"] = normal(1.0, channels, H)
        width = 2 * H if final_act(layer) == "glu" else H
        sd[p + "output_linear.0.weight"] = normal((channels * H) ** -0.5, width, channels * H)
        sd[p + "output_linear.0.bias"] = normal(0.2, width)
    sd["decoder.weight"] = sd["encoder.weight"] if tied else normal(H ** -0.5, config["d_output"], H)
    sd["decoder.bias"] = normal(0.2, config["d_output"])
    return sd


def write_src(folder, config: dict, sd: dict, layout: str):
    """SRC folder: config.json plus the weights as safetensors, pytorch_model.bin, example.py's ckpt.pth
    ({"model", "acc", "epoch"}) or a Lightning-style .ckpt ({"state_dict" with a `model.` prefix, plain
    hyper_parameters})."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if layout == "safetensors":
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    elif layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif layout == "example_pth":
        torch.save({"model": sd, "acc": 91.5, "epoch": 3}, folder / "ckpt.pth")
    elif layout == "lightning_ckpt":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                    "hyper_parameters": {"model": config}}, folder / "last.ckpt")
    else:
        raise ValueError(layout)
    return folder


# --------------------------------------------------------------------------------------------------------------
# the float64 reference, from state-spaces' conventions


def _transform(x: torch.Tensor, transform: str) -> torch.Tensor:
    x = x.double()
    return {"none": x, "exp": x.exp(), "relu": F.relu(x) + 1e-4, "sigmoid": torch.sigmoid(x),
            "softplus": F.softplus(x)}[transform]


def _complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[..., 0].double(), x[..., 1].double())


def _full(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.conj()], dim=-1)


def _diag_discretize(dt, A, B, disc):
    dtA = dt[:, None] * A
    if disc == "zoh":
        dA = torch.exp(dtA)
        return dA, (dA - 1) / A * B
    return (1 + dtA / 2) / (1 - dtA / 2), dt[:, None] * B / (1 - dtA / 2)


def layer_system(sd: dict, p: str, layer: dict):
    """(Ā (S, 2M, 2M), B̄ (S, 2M), C (S, 2M), D (S,)) of one layer's S = channels·H SSMs in the full
    conjugate-symmetric state, with y = Re(C · x): SSM c·H + h reads input channel h."""
    if layer["_name_"] == "s4d":
        k = p + "kernel."
        dt = sd[k + "log_dt"].double().exp()
        A = torch.complex(-sd[k + "log_A_real"].double().exp(), sd[k + "A_imag"].double())
        dA, dB = _diag_discretize(dt, A, torch.ones_like(A), "zoh")
        return torch.diag_embed(_full(dA)), _full(dB), _full(_complex(sd[k + "C"])), sd[p + "D"].double()
    k = p + "layer.kernel."
    channels = layer.get("channels", 1)
    n_ssm = sd[k + "A_real"].shape[0]
    ssm_of = torch.tensor([h % n_ssm for _ in range(channels) for h in range(H)])     # their "(v t)" repeat
    dt = _transform(sd[k + "inv_dt"][:, 0], layer.get("dt_transform", "exp")).repeat(channels)
    A = torch.complex(-_transform(sd[k + "A_real"], layer.get("real_transform", "exp")),
                      -_transform(sd[k + "A_imag"], layer.get("imag_transform", "none")))[ssm_of]
    B = _complex(sd[k + "B"][0])[ssm_of]
    C = _complex(sd[k + "C"]).reshape(channels * H, M)
    D = sd[p + "layer.D"].double().reshape(-1)
    if layer.get("mode", "dplr") == "diag":
        dA, dB = _diag_discretize(dt, A, B, layer.get("disc", "zoh"))
        return torch.diag_embed(_full(dA)), _full(dB), _full(C), D
    P = _full(_complex(sd[k + "P"])[:, ssm_of])                                       # (R, S, 2M)
    A_full = torch.diag_embed(_full(A)) - torch.einsum("rsi,rsj->sij", P, P.conj())   # Λ - P P*
    eye = torch.eye(2 * M, dtype=A_full.dtype)
    back = eye - dt[:, None, None] / 2 * A_full
    dA = torch.linalg.solve(back, eye + dt[:, None, None] / 2 * A_full)
    dB = dt[:, None] * torch.linalg.solve(back, _full(B).unsqueeze(-1)).squeeze(-1)   # bilinear, whatever `disc`
    C = _full(C)
    length = int(sd[k + "l_kernel"])
    if length:  # the stored C is C̃ = (I - (Ā^L)^T) C
        C = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, length)).mT, C.unsqueeze(-1)).squeeze(-1)
    return dA, dB, C, D


def _activation(x: torch.Tensor, name) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name in ("silu", "swish"):
        return x * torch.sigmoid(x)
    return x  # id / identity / linear / None


def reference_logits(config: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """example.py's S4Model forward (post-norm residual blocks), each S4 layer run as its recurrence, in float64."""
    layer = config["layer"]
    x = sd["encoder.weight"].double()[ids]                                            # (b, L, H)
    for i in range(config["n_layers"]):
        p = f"s4_layers.{i}."
        dA, dB, C, D = layer_system(sd, p, layer)
        channels = 1 if layer["_name_"] == "s4d" else layer.get("channels", 1)
        u = x.repeat(1, 1, channels)                                                  # (b, L, S)
        state = torch.zeros(u.shape[0], u.shape[2], 2 * M, dtype=torch.complex128)
        ys = []
        for t in range(u.shape[1]):
            state = torch.einsum("sij,bsj->bsi", dA, state) + dB * u[:, t, :, None]
            ys.append(torch.einsum("si,bsi->bs", C, state).real + D * u[:, t])
        y = _activation(torch.stack(ys, 1), "gelu" if layer["_name_"] == "s4d" else layer.get("activation", "gelu"))
        weight = sd[p + "output_linear.0.weight"].double()
        y = y @ (weight[..., 0] if weight.dim() == 3 else weight).T + sd[p + "output_linear.0.bias"].double()
        final = "glu" if layer["_name_"] == "s4d" else final_act(layer)
        if final == "glu":
            a, gate = y.chunk(2, dim=-1)
            y = a * torch.sigmoid(gate)
        else:
            y = _activation(y, final)
        x = F.layer_norm(x + y, (H,), sd[f"norms.{i}.weight"].double(), sd[f"norms.{i}.bias"].double(), eps=1e-5)
    if config["pool"] == "mean":
        x = x.mean(1)
    elif config["pool"] == "last":
        x = x[:, -1]
    return x @ sd["decoder.weight"].double().T + sd["decoder.bias"].double()


def ids_for(vocab: int = TOKENS, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def load(out, config: dict):
    auto = AutoModelForCausalLM if config["pool"] is None else AutoModelForSequenceClassification
    model = auto.from_pretrained(out).eval()
    assert type(model).__module__.startswith("ssm_hf.")
    return model


# --------------------------------------------------------------------------------------------------------------
# conversions against the reference

S4D_LAYER = {"_name_": "s4d", "d_state": N, "dt_min": 0.01, "dt_max": 0.1, "lr": 0.001, "transposed": True}
CASES = {
    # models/s4/s4.py with the diagonal kernel: channels > 1, n_ssm < H, softplus Δ
    "s4d-standalone-zoh": (dict(layer={"_name_": "standalone", "mode": "diag", "disc": "zoh", "d_state": N,
                                       "channels": 2, "n_ssm": 2, "dt_transform": "softplus", "init": "diag-lin",
                                       "lr": {"dt": 0.001, "A": 0.001, "B": 0.001}}), "safetensors", (0, 0)),
    # bilinear diagonal kernel, relu-transformed real part, SiLU, no output GLU; a mean-pooled classifier
    "s4d-standalone-bilinear-classifier": (
        dict(layer={"_name_": "standalone", "mode": "diag", "disc": "bilinear", "d_state": N,
                    "real_transform": "relu", "activation": "silu", "final_act": "id", "l_max": 64},
             pool="mean", d_output=5), "example_pth", (0, 0)),
    # S4 (DPLR, bilinear; `disc` is ignored by that kernel), rank 2, channels > 1, n_ssm < H; C̃ attuned to 32 in
    # layer 0 (copied) and to 16 in layer 1 (re-attuned to 32 by the converter)
    "s4-dplr": (dict(layer={"_name_": "standalone", "mode": "nplr", "d_state": N, "channels": 2, "n_ssm": 4,
                            "rank": 2, "l_max": 16, "dt_transform": "exp", "postact": "glu", "final_act": None}),
                "bin", (32, 16)),
    # S4 whose checkpoint was saved before any forward (l_kernel = 0: plain C), a last-token classifier, run on
    # 20 tokens with l_max 16: ssm-hf extends the kernel past l_max (state-spaces' FFTConv would cut it there)
    "s4-dplr-plain-c-classifier": (dict(layer={"_name_": "standalone", "mode": "nplr", "d_state": N, "l_max": 16,
                                               "n_ssm": 1}, pool="last", d_output=3), "lightning_ckpt", (0, 0)),
}


def test_minimal_s4d_converts_exactly_with_tied_embeddings(tmp_path):
    """models/s4/s4d.py under example.py's wrapper: the tensors copy across bit for bit (B = 1, the width-1 Conv1d
    squeezed), tied decoder, logits equal to the float64 recurrence."""
    config = s4_config(S4D_LAYER)
    sd = s4_state_dict(config, tied=True)
    src = write_src(tmp_path / "src", config, sd, "example_pth")
    assert convert("--from", "s4", src, tmp_path / "out") == 0
    model = load(tmp_path / "out", config)
    assert model.config.tie_word_embeddings and model.config.head_bias and model.config.kernel == "diag"
    ids = ids_for()
    with torch.no_grad():
        assert_close_to_scale(model(ids).logits, reference_logits(config, sd, ids))

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    for name in ("log_dt", "log_A_real", "A_imag", "C"):
        assert torch.equal(saved[f"backbone.layers.1.mixer.kernel.{name}"], sd[f"s4_layers.1.kernel.{name}"])
    assert torch.equal(saved["backbone.layers.0.mixer.output_linear.weight"],
                       sd["s4_layers.0.output_linear.0.weight"][..., 0])
    B = saved["backbone.layers.0.mixer.kernel.B"]
    assert torch.equal(B[..., 0], torch.ones(H, M)) and torch.equal(B[..., 1], torch.zeros(H, M))


def test_a_language_model_without_decoder_weight_is_tied(tmp_path):
    """safetensors keeps a tied tensor once: a language model's missing decoder.weight is the embedding."""
    config = s4_config(S4D_LAYER)
    sd = s4_state_dict(config, tied=True)
    src = write_src(tmp_path / "src", config, {k: v for k, v in sd.items() if k != "decoder.weight"}, "safetensors")
    assert convert("--from", "s4", src, tmp_path / "out") == 0
    model = load(tmp_path / "out", config)
    assert model.config.tie_word_embeddings
    ids = ids_for(length=9)
    with torch.no_grad():
        assert_close_to_scale(model(ids).logits, reference_logits(config, sd, ids))


@pytest.mark.parametrize("case", list(CASES))
def test_standalone_s4_block_checkpoints_match_the_float64_recurrence(case, tmp_path):
    top, layout, l_kernels = CASES[case]
    config = s4_config(**top)
    sd = s4_state_dict(config, seed=len(case), l_kernels=l_kernels)
    src = write_src(tmp_path / "src", config, sd, layout)
    assert convert("--from", "s4", src, tmp_path / "out") == 0
    model = load(tmp_path / "out", config)
    ids = ids_for()
    expected = reference_logits(config, sd, ids)
    with torch.no_grad():  # a classifier of a batch needs the mask to find the real tokens (pad_token_id is None)
        assert_close_to_scale(model(ids, attention_mask=torch.ones_like(ids)).logits, expected)
    if config["pool"] is None:
        assert not model.config.tie_word_embeddings
        # the recurrent view (C from C̃, the O(N) DPLR step) of the converted weights, token by token
        with torch.no_grad():
            out = model(ids[:, :7], use_cache=True)
            steps = [out.logits]
            for t in range(7, ids.shape[1]):
                out = model(ids[:, t:t + 1], cache_params=out.cache_params, use_cache=True)
                steps.append(out.logits)
        assert_close_to_scale(torch.cat(steps, 1), expected)
    if "dplr" in case:
        assert model.config.l_max == max(max(l_kernels), 16) and model.config.discretization == "bilinear"


def test_convert_checkpoint_python_api_and_exact_dplr_copies(tmp_path):
    """The exp-transformed parameters copy bit for bit (B, C, P conjugated, Δ/A/B/P tiled over channels and n_ssm
    groups), and C̃ attuned to the common l_max is copied as is."""
    top, _, l_kernels = CASES["s4-dplr"]
    config = s4_config(**top)
    sd = s4_state_dict(config, l_kernels=(32, 32))
    src = write_src(tmp_path / "src", config, sd, "safetensors")
    convert_checkpoint(src, tmp_path / "out", from_format="s4")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    k, ours = "s4_layers.0.layer.kernel.", "backbone.layers.0.mixer."
    conj = torch.tensor([1.0, -1.0])
    assert torch.equal(saved[ours + "kernel.log_dt"], sd[k + "inv_dt"][:, 0].repeat(2))
    assert torch.equal(saved[ours + "kernel.log_A_real"], sd[k + "A_real"].repeat(4, 1))
    assert torch.equal(saved[ours + "kernel.A_imag"], sd[k + "A_imag"].repeat(4, 1))
    assert torch.equal(saved[ours + "kernel.B"], (sd[k + "B"][0] * conj).repeat(4, 1, 1))
    assert torch.equal(saved[ours + "kernel.P"], (sd[k + "P"] * conj).repeat(1, 4, 1, 1))
    assert torch.equal(saved[ours + "kernel.C"], (sd[k + "C"] * conj).reshape(2 * H, M, 2))
    assert torch.equal(saved[ours + "D"], sd["s4_layers.0.layer.D"].reshape(-1))


# --------------------------------------------------------------------------------------------------------------
# bad input


def _src(tmp_path, edit_config=None, edit_state=None, layout="safetensors", l_kernels=(16, 16)):
    config = s4_config(**CASES["s4-dplr"][0])
    sd = s4_state_dict(config, l_kernels=l_kernels)
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(sd)
    return write_src(tmp_path / "src", config, sd, layout)


@pytest.mark.parametrize("edit_config, edit_state, message", [
    (None, lambda sd: sd.pop("s4_layers.1.layer.D"), "missing: s4_layers.1.layer.D"),
    (None, lambda sd: sd.update({"s4_layers.0.layer.extra": torch.zeros(2)}), "unexpected: s4_layers.0.layer.extra"),
    (None, lambda sd: sd.update({"s4_layers.0.layer.kernel.inv_dt": torch.zeros(H, M)}),
     "mis-shaped: s4_layers.0.layer.kernel.inv_dt [8, 4] (expected [8, 1])"),
    (None, lambda sd: sd.update({"encoder.bias": torch.zeros(H)}), "a Linear encoder"),
    (None, lambda sd: sd.update({"model.layers.0.layer.layer.kernel.inv_dt": torch.zeros(H, 1)}),
     "state-spaces' training pipeline"),
    (None, lambda sd: sd.update({"s4_layers.0.layer.kernel.l_kernel": torch.tensor(-1)}),
     "s4_layers.0.layer.kernel.l_kernel=-1 must be a non-negative integer"),
    (lambda c: c["layer"].update(bidirectional=True), None, "layer.bidirectional=true"),
    (lambda c: c["layer"].update(dt_transform="tanh"), None, "layer.dt_transform='tanh'"),
    (lambda c: c["layer"].update(mode="diag", disc="dss"), None, "layer.disc='dss'"),
    (lambda c: c["layer"].update(mode="dense"), None, "layer.mode='dense'"),
    (lambda c: c["layer"].update(activation="glu"), None, "doubles the SSM channels"),
    (lambda c: c["layer"].update(postact=None, final_act="tanh"), None, "layer.final_act='tanh'"),
    (lambda c: c["layer"].update(d_stat=8), None, "unknown state-spaces S4 layer field(s) ['d_stat']"),
    (lambda c: c["layer"].update(n_ssm=3), None, "layer.n_ssm=3 must divide d_model=8"),
    (lambda c: c.update(prenorm=True), None, "prenorm=true"),
    (lambda c: c.update(encoder="linear"), None, "a Linear encoder"),
    (lambda c: c.pop("pool"), None, "lacks the field(s) ['pool']"),
    (lambda c: c.update(d_output=7), None, "needs d_output == n_tokens"),
    (lambda c: c["layer"].update(_name_="s4nd"), None, "layer._name_='s4nd'"),
    (lambda c: c["layer"].update(activation=["gelu"]), None, "layer.activation=['gelu']"),
    (lambda c: c.update(dropout=1.5), None, "S4Config.dropout must be in [0, 1), got 1.5"),
])
def test_bad_input_fails_naming_the_problem_and_writes_nothing(tmp_path, capsys, edit_config, edit_state, message):
    src = _src(tmp_path, edit_config, edit_state)
    assert convert("--from", "s4", src, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssm-hf convert: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no temporary folder left behind


def test_values_that_do_not_map_are_refused(tmp_path):
    def negative_rates(sd):
        sd["s4_layers.1.layer.kernel.A_real"][0, 0] = -0.5

    src = _src(tmp_path, lambda c: c["layer"].update(real_transform="none"), negative_rates)
    with pytest.raises(ConversionError, match="A_real has values whose 'none' transform is not positive"):
        convert_checkpoint(src, tmp_path / "out", from_format="s4")
    with pytest.raises(ConversionError, match="layer.l_max is needed"):
        convert_checkpoint(_src(tmp_path / "b", lambda c: c["layer"].pop("l_max"), l_kernels=(0, 0)),
                           tmp_path / "out", from_format="s4")
    assert not (tmp_path / "out").exists()


class _HydraConfig:
    """Stands for the pickled OmegaConf object a Lightning checkpoint's hyper_parameters hold."""


def test_pickled_objects_are_refused_with_a_way_out(tmp_path, capsys):
    config = s4_config(S4D_LAYER)
    sd = s4_state_dict(config)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    torch.save({"state_dict": sd, "hyper_parameters": _HydraConfig()}, src / "epoch=3.ckpt")
    assert convert("--from", "s4", src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "cannot be read with torch.load(weights_only=True)" in err
    assert "torch.save(c['state_dict'], 'pytorch_model.bin')" in err
    assert not (tmp_path / "out").exists()

    torch.save(sd, src / "pytorch_model.bin")  # the way out, next to the .ckpt: ambiguous
    assert convert("--from", "s4", src, tmp_path / "out") == 1
    assert "holds several weight files" in capsys.readouterr().err
    (src / "epoch=3.ckpt").unlink()
    assert convert("--from", "s4", src, tmp_path / "out") == 0
