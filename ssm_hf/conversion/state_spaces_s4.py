"""State-spaces S4 / S4D checkpoints (github.com/state-spaces/s4) -> ssm-hf `S4ForCausalLM` or
`S4ForSequenceClassification`.

SRC layout (what `ssm-hf convert --from s4 SRC OUT` reads): a folder with

- `config.json`: the model's options under state-spaces' own names. The top level holds the arguments of the `S4Model`
  wrapper of state-spaces' `example.py`, with a token embedding as encoder:

  field        meaning
  d_model      width H of the residual stream
  n_layers     number of residual blocks
  n_tokens     vocabulary size: rows of the `nn.Embedding` encoder
  d_output     rows of the `nn.Linear` decoder: the vocabulary size for a language model, the classes otherwise
  pool         `null`: a language model (decoder on every position) -> S4ForCausalLM; `"mean"` (example.py's average
               over the sequence) or `"last"` (last position): a classifier -> S4ForSequenceClassification
  prenorm      LayerNorm before each layer (example.py's `--prenorm`); default false (after each residual)
  dropout      dropout probability (kept in the config; no effect in eval)
  encoder      `"embedding"` (default); `"linear"` (example.py's pixel encoder) is refused
  layer        the S4 layer's options (below)

  `layer._name_` names the layer module, as in state-spaces v4's layer registry:
  `"s4d"`: the minimal S4D of `models/s4/s4d.py` (diagonal A, ZOH, B = 1, GELU, width-1 Conv1d + GLU output; options
  `d_state`, `dt_min`, `dt_max`, `lr`, `dropout`, `transposed`);
  `"standalone"`: the `S4Block` of `models/s4/s4.py` (v4) around its `FFTConv` and `SSMKernelDiag` / `SSMKernelDPLR`;
  every option of those classes is accepted under its own name (`mode`/`kernel`, `d_state`, `channels`, `n_ssm`,
  `rank`, `l_max`, `disc`, `dt_min`, `dt_max`, `dt_tie`, `dt_transform`, `real_transform`, `imag_transform`,
  `activation`, `final_act`/`postact`, `bidirectional`, `gate`, `bottleneck`, ... and the initialisation-only ones,
  which are ignored), with state-spaces' defaults for those left out.
- the weights, as `example.py` names them (`encoder.weight`, `s4_layers.N.<layer tensors>`, `norms.N.{weight,bias}`,
  `decoder.{weight,bias}`), in `model.safetensors` / `pytorch_model.bin` (sharded or not), or in one `*.ckpt`,
  `*.pth` or `*.pt` file read with `torch.load(weights_only=True)`: a plain state dict, example.py's
  `{"model": state_dict, "acc": ..., "epoch": ...}`, or a Lightning-style `{"state_dict": ...}` (a `model.` prefix
  on every name, as a LightningModule holding the S4Model as `model` writes, is removed). Files that hold other
  Python objects (a pickled Hydra config) are refused, never unpickled; the message says how to extract the state
  dict.

How the tensors map (S = channels·H SSMs, ours indexed c·H + h as their (channels, H) layout flattens):

state-spaces (per layer, under s4_layers.N.)     ssm-hf (under backbone.layers.N.mixer.)
s4d: kernel.log_dt (H), kernel.log_A_real,       kernel.log_dt, kernel.log_A_real, kernel.A_imag, kernel.C: the same
  kernel.A_imag (H, N/2), kernel.C (H, N/2, 2)     (both write A = -exp(log_A_real) + i A_imag); kernel.B = 1
s4d: output_linear.0.weight (2H, H, 1), .bias    output_linear.weight (2H, H) (the width-1 Conv1d squeezed), .bias
standalone: layer.kernel.inv_dt (H, 1)           kernel.log_dt = log(dt_transform(inv_dt)) (copied for "exp"),
                                                   repeated over the channels
standalone: layer.kernel.A_real, A_imag (n_ssm,  kernel.log_A_real = log(real_transform(A_real)) (copied for
  N/2): A = -real_transform(A_real)                "exp"), kernel.A_imag = imag_transform(A_imag) (copied for
  - i imag_transform(A_imag)                       "none"): the conjugate system, which has the same real output
standalone: layer.kernel.B (1, n_ssm, N/2, 2),   kernel.B, kernel.P conjugated (their [..., 1] negated); Δ, A, B, P
  layer.kernel.P (rank, n_ssm, N/2, 2)             tiled from n_ssm to S SSMs (SSM h uses their h mod n_ssm)
standalone: layer.kernel.C (channels, H, N/2, 2) kernel.C (S, N/2, 2), conjugated; for DPLR their C is C̃ attuned to
  (+ DPLR: layer.kernel.l_kernel, a scalar)        `l_kernel` (the plain C while that is 0): ours is attuned to the
                                                   common l_max (l_kernel, or the layer's l_max), recomputed in
                                                   float64 through the dense Ā where they differ
standalone: layer.D (channels, H)                D (S,)
standalone: output_linear.0.weight, .bias        output_linear.weight, .bias
norms.N.weight, .bias                            backbone.layers.N.norm.weight, .bias
encoder.weight (n_tokens, H)                     backbone.embeddings.weight
decoder.weight, decoder.bias                     lm_head.* (tied when equal to the embedding) or score.*

Outputs match state-spaces' for sequences up to the layer's `l_max`: beyond it their FFTConv cuts the kernel at
`l_max` taps, while ssm-hf computes the full SSM (its recurrent view). Refused with a NotImplementedError naming the
option: bidirectional kernels, `channels` doubled by a GLU `activation`, `swap_channels`, gates and bottlenecks, a
second activation (`mult_act`), no output linear (`final_act: null`), output activations other than GLU, GELU or
identity, untied Δ (`dt_tie: false`), `dt_fast`, `bandlimit`, real-valued (`is_real`) and DSS (`disc: dss`) kernels,
kernels other than diag / DPLR, a Linear encoder and example.py's pre-norm stack (no norm after its last block). The
training pipeline's `SequenceLightningModule` layout (`model.layers.N.layer.layer.kernel...`, task encoders and
decoders) is not read.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedModel

from ..configs.s4 import S4Config
from ..kernels import s4_torch as ops
from ..models.s4 import S4ForCausalLM, S4ForSequenceClassification
from .checkpoint_io import read_state_dict
from .validation import ConversionError, check_state_dict, compare_shapes

REQUIRED = object()  # a field without a default
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, what example.py's norms use
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt")

TOP_FIELDS = dict(d_model=REQUIRED, n_layers=REQUIRED, n_tokens=REQUIRED, d_output=REQUIRED, pool=REQUIRED,
                  layer=REQUIRED, prenorm=False, dropout=0.0, encoder="embedding")
# models/s4/s4d.py: S4D(d_model, d_state, dropout, transposed, **S4DKernel(N, dt_min, dt_max, lr))
S4D_FIELDS = dict(_name_=REQUIRED, d_state=64, dt_min=0.001, dt_max=0.1, lr=None, dropout=None, transposed=True)
# models/s4/s4.py (v4): S4Block -> FFTConv -> SSMKernelDiag / SSMKernelDPLR, with their defaults
STANDALONE_FIELDS = dict(
    _name_=REQUIRED,
    # S4Block
    bottleneck=None, gate=None, gate_act=None, mult_act=None, final_act="glu", postact=None, initializer=None,
    weight_norm=False, dropout=None, tie_dropout=False, transposed=True,
    # FFTConv
    l_max=None, channels=1, swap_channels=False, bidirectional=False, activation="gelu", drop_kernel=0.0,
    mode="dplr", kernel=None,
    # SSMKernel
    d_state=64, deterministic=False, dt_min=0.001, dt_max=0.1, dt_tie=True, dt_transform="exp", rank=1, n_ssm=None,
    measure=None, init="legs", lr=None, wd=0.0, verbose=True,
    # SSMKernelDiag (inherited by SSMKernelDPLR)
    disc="zoh", dt_fast=False, real_transform="exp", imag_transform="none", bandlimit=None, backend="cuda",
    is_real=False,
    # arguments of the initialisation functions (dplr, nplr): no effect on trained weights
    real_random=None, real_scale=None, imag_random=None, imag_scale=None, B_random=None, B_init=None, B_scale=None,
    P_scale=None, normalize=None, diagonalize_precision=None, B_clip=None,
)
LAYER_FIELDS = {"s4d": S4D_FIELDS, "standalone": STANDALONE_FIELDS}
KERNELS = {"diag": "diag", "s4d": "diag", "dplr": "dplr", "nplr": "dplr", "s4": "dplr"}
# state-spaces' Activation names -> transformers' ACT2FN keys (same functions: nn.GELU is the exact GELU)
ACTIVATIONS = {None: "linear", "id": "linear", "identity": "linear", "linear": "linear", "tanh": "tanh",
               "relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "sigmoid": "sigmoid"}
FINAL_ACTIVATIONS = {"glu": "glu", "gelu": "gelu", "id": "linear", "identity": "linear", "linear": "linear"}
TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
POOLS = (None, "mean", "last")


@dataclass(frozen=True)
class S4Layout:
    """A state-spaces S4 config.json, checked and with defaults filled in."""

    layer: str                  # "s4d" | "standalone"
    d_model: int
    n_layers: int
    n_tokens: int
    d_output: int
    pool: str | None
    dropout: float
    d_state: int
    kernel: str                 # ours: "diag" | "dplr"
    discretization: str         # ours: "zoh" | "bilinear"
    channels: int
    n_ssm: int
    rank: int
    l_max: int | None
    activation: str             # an ACT2FN key
    output_activation: str      # "glu" | "gelu" | "linear"
    dt_transform: str
    real_transform: str
    imag_transform: str
    dt_min: float
    dt_max: float
    init: str                   # ours; only used to re-initialise

    @property
    def num_ssms(self) -> int:
        return self.channels * self.d_model

    @property
    def modes(self) -> int:
        return self.d_state // 2


def _refuse(feature: str) -> NotImplementedError:
    return NotImplementedError(f"state-spaces S4 checkpoints with {feature} are not supported: ssm-hf's S4 has no "
                               "equivalent")


def _with_defaults(given: object, defaults: dict, where: str) -> dict:
    if not isinstance(given, Mapping):
        raise ConversionError(f"state-spaces S4 {where} must be a JSON object, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConversionError(f"unknown state-spaces S4 {where} field(s) {unknown}; known: {sorted(defaults)}")
    missing = sorted(name for name, value in defaults.items() if value is REQUIRED and name not in given)
    if missing:
        raise ConversionError(f"state-spaces S4 {where} lacks the field(s) {missing}")
    return {**defaults, **given}


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"state-spaces S4 {name}={value!r} must be a positive integer")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"state-spaces S4 {name}={value!r} must be a number")
    return float(value)


def _known(value: object, table) -> bool:
    """`value in table` for JSON values (a list or an object is in no table)."""
    return isinstance(value, (str, type(None))) and value in table


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConversionError(f"state-spaces S4 {name}={value!r} must be true or false")
    return value


def parse_s4_config(s4_config: Mapping) -> S4Layout:
    """Check a state-spaces S4 config.json dict (see the module docstring) and fill in state-spaces' defaults.
    Raises ConversionError for wrong values (naming the field) and NotImplementedError for options ssm-hf's S4
    cannot express."""
    top = _with_defaults(s4_config, TOP_FIELDS, "config")
    d_model = _positive_int(top["d_model"], "d_model")
    if top["encoder"] != "embedding":
        if top["encoder"] == "linear":
            raise _refuse("a Linear encoder (encoder='linear', real-valued inputs): ssm-hf's S4 reads token ids "
                          "through an embedding")
        raise ConversionError(f"state-spaces S4 encoder={top['encoder']!r} must be 'embedding'")
    if not _known(top["pool"], POOLS):
        raise ConversionError(f"state-spaces S4 pool={top['pool']!r} must be null (a language model), 'mean' or "
                              "'last' (a classifier)")
    if _flag(top["prenorm"], "prenorm"):
        raise _refuse("prenorm=true (example.py's pre-norm stack has no norm after its last block, while ssm-hf's "
                      "pre-norm S4 ends with one)")
    dropout = _number(top["dropout"], "dropout")
    layer_config = top["layer"]
    name = layer_config.get("_name_") if isinstance(layer_config, Mapping) else None
    if not _known(name, LAYER_FIELDS):
        raise ConversionError(f"state-spaces S4 layer._name_={name!r} must be one of {sorted(LAYER_FIELDS)} (the "
                              "layer modules of models/s4/s4d.py and models/s4/s4.py)")
    layer = _with_defaults(layer_config, LAYER_FIELDS[name], "layer")
    d_state = _positive_int(layer["d_state"], "layer.d_state")
    if d_state % 2:
        raise ConversionError(f"state-spaces S4 layer.d_state={d_state} must be even (N/2 conjugate pairs)")
    dt_min, dt_max = _number(layer["dt_min"], "layer.dt_min"), _number(layer["dt_max"], "layer.dt_max")
    common = dict(d_model=d_model, n_layers=_positive_int(top["n_layers"], "n_layers"),
                  n_tokens=_positive_int(top["n_tokens"], "n_tokens"),
                  d_output=_positive_int(top["d_output"], "d_output"), pool=top["pool"], dropout=dropout,
                  d_state=d_state, dt_min=dt_min, dt_max=dt_max)
    if common["pool"] is None and common["d_output"] != common["n_tokens"]:
        raise ConversionError(f"state-spaces S4 pool=null (a language model) needs d_output == n_tokens, got "
                              f"{common['d_output']} and {common['n_tokens']}")
    if name == "s4d":
        return S4Layout(layer="s4d", kernel="diag", discretization="zoh", channels=1, n_ssm=d_model, rank=1,
                        l_max=None, activation="gelu", output_activation="glu", dt_transform="exp",
                        real_transform="exp", imag_transform="none", init="s4d_lin", **common)
    return _standalone_layout(layer, common)


def _standalone_layout(layer: dict, common: dict) -> S4Layout:
    d_model = common["d_model"]
    for option, wanted in (("bidirectional", False), ("swap_channels", False), ("dt_tie", True), ("dt_fast", False),
                           ("is_real", False)):
        if _flag(layer[option], f"layer.{option}") != wanted:
            raise _refuse(f"layer.{option}={str(not wanted).lower()}")
    for option in ("gate", "bottleneck", "bandlimit"):
        if layer[option] is not None:
            raise _refuse(f"layer.{option}={layer[option]!r}")
    if not _known(layer["mult_act"], (None, "id", "identity", "linear")):
        raise _refuse(f"layer.mult_act={layer['mult_act']!r} (a second activation after the layer)")
    if layer["mode"] is not None and layer["kernel"] is not None:
        raise ConversionError("state-spaces S4 layer: give either mode or kernel, not both (as FFTConv asserts)")
    mode = layer["mode"] if layer["mode"] is not None else layer["kernel"]
    if not _known(mode, KERNELS):
        raise _refuse(f"layer.mode={mode!r} (only the diagonal and DPLR kernels: {sorted(KERNELS)})")
    kernel = KERNELS[mode]
    if kernel == "diag" and not _known(layer["disc"], ("zoh", "bilinear")):
        raise _refuse(f"layer.disc={layer['disc']!r} (only 'zoh' and 'bilinear')")
    activation = layer["activation"]
    if isinstance(activation, str) and activation.startswith("glu"):
        raise _refuse(f"layer.activation={activation!r} (a GLU after the convolution doubles the SSM channels)")
    if not _known(activation, ACTIVATIONS):
        raise _refuse(f"layer.activation={activation!r} (supported: {sorted(map(str, ACTIVATIONS))})")
    final_act = layer["final_act"]
    if layer["postact"] is not None:  # the old name of final_act, which S4Block moves across
        if final_act not in (None, "glu"):
            raise ConversionError("state-spaces S4 layer: give either final_act or postact, not both")
        final_act = layer["postact"]
    if final_act is None:
        raise _refuse("layer.final_act=null (no output linear layer)")
    if not _known(final_act, FINAL_ACTIVATIONS):
        raise _refuse(f"layer.final_act={final_act!r} (supported: {sorted(FINAL_ACTIVATIONS)})")
    for option in ("dt_transform", "real_transform", "imag_transform"):
        if not _known(layer[option], TRANSFORMS):
            raise _refuse(f"layer.{option}={layer[option]!r} (supported: {list(TRANSFORMS)})")
    channels = _positive_int(layer["channels"], "layer.channels")
    n_ssm = d_model if layer["n_ssm"] is None else _positive_int(layer["n_ssm"], "layer.n_ssm")
    if d_model % n_ssm:
        raise ConversionError(f"state-spaces S4 layer.n_ssm={n_ssm} must divide d_model={d_model}")
    l_max = None if layer["l_max"] is None else _positive_int(layer["l_max"], "layer.l_max")
    init = layer["init"] if layer["measure"] is None else layer["measure"]
    ours_init = "legs" if kernel == "dplr" else {"diag-inv": "s4d_inv", "diag-legs": "legs"}.get(str(init), "s4d_lin")
    return S4Layout(layer="standalone", kernel=kernel,
                    discretization="bilinear" if kernel == "dplr" else layer["disc"],  # DPLR ignores `disc`
                    channels=channels, n_ssm=n_ssm, rank=_positive_int(layer["rank"], "layer.rank"), l_max=l_max,
                    activation=ACTIVATIONS[activation], output_activation=FINAL_ACTIVATIONS[final_act],
                    dt_transform=layer["dt_transform"], real_transform=layer["real_transform"],
                    imag_transform=layer["imag_transform"], init=ours_init, **common)


def s4_config_to_ssm_hf(s4_config: Mapping | S4Layout, *, l_max: int | None = None, tied: bool = False,
                        head_bias: bool = False) -> S4Config:
    """Our S4Config for a state-spaces S4 config.json dict. What only the weights tell (the DPLR kernel length,
    tied embeddings, a decoder bias) is passed in; without them the config is a provisional one, for checking."""
    layout = s4_config if isinstance(s4_config, S4Layout) else parse_s4_config(s4_config)
    fields = dict(
        vocab_size=layout.n_tokens, hidden_size=layout.d_model, num_hidden_layers=layout.n_layers,
        state_size=layout.d_state, kernel=layout.kernel, init=layout.init, discretization=layout.discretization,
        rank=layout.rank, num_ssm_copies=layout.channels, time_step_min=layout.dt_min, time_step_max=layout.dt_max,
        hidden_act=layout.activation, output_activation=layout.output_activation, dropout=layout.dropout,
        prenorm=False, layer_norm_epsilon=LAYER_NORM_EPS, head_bias=head_bias, tie_word_embeddings=tied,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)  # state-spaces models name no special tokens
    l_max = l_max if l_max is not None else layout.l_max
    if l_max is not None:
        fields["l_max"] = l_max
    if layout.pool is not None:
        fields.update(num_labels=layout.d_output, classifier_pooling=layout.pool, tie_word_embeddings=False)
    try:
        return S4Config(**fields)
    except (ValueError, TypeError, StrictDataclassError) as err:
        message = " ".join(str(err).split())
        raise ConversionError(f"the state-spaces S4 config gives an invalid S4Config: {message}") from None


def expected_s4_shapes(layout: S4Layout) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a state-spaces checkpoint in the SRC layout (see `optional_s4_tensors`)."""
    H, M, S, n_ssm = layout.d_model, layout.modes, layout.num_ssms, layout.n_ssm
    out_width = 2 * H if layout.output_activation == "glu" else H
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (layout.n_tokens, H),
                                          "decoder.weight": (layout.d_output, H), "decoder.bias": (layout.d_output,)}
    for i in range(layout.n_layers):
        p = f"s4_layers.{i}."
        shapes[f"norms.{i}.weight"] = shapes[f"norms.{i}.bias"] = (H,)
        if layout.layer == "s4d":
            shapes.update({p + "kernel.log_dt": (H,), p + "kernel.log_A_real": (H, M), p + "kernel.A_imag": (H, M),
                           p + "kernel.C": (H, M, 2), p + "D": (H,), p + "output_linear.0.weight": (2 * H, H, 1),
                           p + "output_linear.0.bias": (2 * H,)})
            continue
        k = p + "layer.kernel."
        shapes.update({k + "inv_dt": (H, 1), k + "A_real": (n_ssm, M), k + "A_imag": (n_ssm, M),
                       k + "B": (1, n_ssm, M, 2), k + "C": (layout.channels, H, M, 2),
                       p + "layer.D": (layout.channels, H),
                       p + "output_linear.0.weight": (out_width, S), p + "output_linear.0.bias": (out_width,)})
        if layout.kernel == "dplr":
            shapes.update({k + "P": (layout.rank, n_ssm, M, 2), k + "l_kernel": ()})
    return shapes


def optional_s4_tensors(layout: S4Layout) -> tuple[str, ...]:
    """Tensors a checkpoint may leave out: the decoder's bias, and a language model's decoder weight (tied to the
    embedding: safetensors stores a shared tensor once)."""
    return ("decoder.bias",) if layout.pool is not None else ("decoder.bias", "decoder.weight")


def _unwrap(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Refuse layouts that are not the SRC layout with a message saying so; drop a `model.` prefix that every name
    carries (a LightningModule holding example.py's S4Model as `model`)."""
    names = list(state_dict)
    if any(name.startswith("model.layers.") for name in names):
        raise NotImplementedError(
            "this is a checkpoint of state-spaces' training pipeline (SequenceLightningModule: model.layers.N.layer."
            "layer.kernel..., task encoders and decoders), which `--from s4` does not read; it reads example.py's "
            "S4Model layout (encoder.weight, s4_layers.N..., norms.N..., decoder.weight): see `ssm-hf convert --help` "
            "and README.md")
    if names and all(name.startswith("model.") for name in names):
        state_dict = {name[len("model."):]: tensor for name, tensor in state_dict.items()}
    if "encoder.bias" in state_dict:
        raise _refuse("a Linear encoder (encoder.bias is present: real-valued inputs, as in example.py's image "
                      "models): ssm-hf's S4 reads token ids through an embedding")
    return dict(state_dict)


def _conj(x: torch.Tensor) -> torch.Tensor:
    """The complex conjugate of a real view (..., 2): its imaginary parts negated (a new tensor)."""
    return torch.stack([x[..., 0], -x[..., 1]], dim=-1)


def _tile(x: torch.Tensor, copies: int, dim: int = 0) -> torch.Tensor:
    """`copies` copies of x one after another along `dim` (their "(v t)" repeat: entry j is x[j mod size])."""
    repeats = [1] * x.dim()
    repeats[dim] = copies
    return x.repeat(*repeats)


def _transformed(param: torch.Tensor, transform: str) -> torch.Tensor:
    """state-spaces' `param_transform`, in float64."""
    x = param.double()
    if transform == "exp":
        return x.exp()
    if transform == "relu":
        return F.relu(x) + 1e-4
    if transform == "sigmoid":
        return torch.sigmoid(x)
    if transform == "softplus":
        return F.softplus(x)
    return x


def _log_of_transformed(param: torch.Tensor, transform: str, name: str) -> torch.Tensor:
    """log(transform(param)) in param's dtype: the parameter itself for "exp" (bit for bit)."""
    if transform == "exp":
        return param.clone()
    value = _transformed(param, transform)
    if not bool((value > 0).all()):
        raise ConversionError(f"{name} has values whose {transform!r} transform is not positive (a step or decay "
                              "rate <= 0), which ssm-hf's S4 cannot represent")
    return value.log().to(param.dtype)


def _s4d_layer(sd: dict, p: str, layout: S4Layout) -> dict[str, torch.Tensor]:
    C = sd[p + "kernel.C"]
    B = torch.zeros_like(C)
    B[..., 0] = 1  # models/s4/s4d.py has no B: it is 1
    return {"kernel.log_dt": sd[p + "kernel.log_dt"], "kernel.log_A_real": sd[p + "kernel.log_A_real"],
            "kernel.A_imag": sd[p + "kernel.A_imag"], "kernel.B": B, "kernel.C": C, "D": sd[p + "D"],
            "output_linear.weight": sd[p + "output_linear.0.weight"].squeeze(-1).clone(),
            "output_linear.bias": sd[p + "output_linear.0.bias"]}


def _standalone_layer(sd: dict, p: str, layout: S4Layout) -> dict[str, torch.Tensor]:
    k = p + "layer.kernel."
    S, M = layout.num_ssms, layout.modes
    repeat = S // layout.n_ssm
    ours = {
        "kernel.log_dt": _tile(_log_of_transformed(sd[k + "inv_dt"][:, 0], layout.dt_transform, k + "inv_dt"),
                               layout.channels),
        "kernel.log_A_real": _tile(_log_of_transformed(sd[k + "A_real"], layout.real_transform, k + "A_real"), repeat),
        # their A = -f(A_real) - i g(A_imag); ours is its conjugate, with B, C and P conjugated below
        "kernel.A_imag": _tile(sd[k + "A_imag"].clone() if layout.imag_transform == "none"
                               else _transformed(sd[k + "A_imag"], layout.imag_transform).to(sd[k + "A_imag"].dtype),
                               repeat),
        "kernel.B": _tile(_conj(sd[k + "B"][0]), repeat),
        "kernel.C": _conj(sd[k + "C"]).reshape(S, M, 2),
        "D": sd[p + "layer.D"].reshape(S).clone(),
        "output_linear.weight": sd[p + "output_linear.0.weight"],
        "output_linear.bias": sd[p + "output_linear.0.bias"],
    }
    if layout.kernel == "dplr":
        ours["kernel.P"] = _tile(_conj(sd[k + "P"]), repeat, dim=1)
    return ours


def _l_kernels(sd: dict, layout: S4Layout) -> list[int]:
    lengths = []
    for i in range(layout.n_layers):
        name = f"s4_layers.{i}.layer.kernel.l_kernel"
        tensor = sd[name]
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or int(tensor) < 0:
            raise ConversionError(f"{name}={tensor.tolist()} must be a non-negative integer")
        lengths.append(int(tensor))
    return lengths


def _attuned_c(layer: dict[str, torch.Tensor], length: int, target: int) -> torch.Tensor:
    """Our DPLR C̃ attuned to `length` (0: the plain C) -> attuned to `target`, through the dense Ā in complex128."""
    dt = layer["kernel.log_dt"].double().exp()
    A = torch.complex(-layer["kernel.log_A_real"].double().exp(), layer["kernel.A_imag"].double())
    P, B, C = (torch.view_as_complex(layer[f"kernel.{n}"].double().contiguous()) for n in ("P", "B", "C"))
    Abar, _ = ops.dplr_dense(dt, A, P, B)
    plain = ops.c_from_generating_c(C, Abar, length) if length else C
    return torch.view_as_real(ops.generating_c_from_c(plain, Abar, target)).to(layer["kernel.C"].dtype)


def s4_to_ssm_hf(s4_config: Mapping, state_dict: Mapping[str, torch.Tensor]
                 ) -> tuple[type[PreTrainedModel], S4Config, dict[str, torch.Tensor]]:
    """A state-spaces S4 checkpoint in the SRC layout (config.json dict, state dict) -> (our model class, S4Config,
    its state dict). Raises ConversionError naming missing, unexpected or mis-shaped tensors (under their names)
    and wrong config values, NotImplementedError for what ssm-hf's S4 cannot express."""
    layout = parse_s4_config(s4_config)
    sd = _unwrap(state_dict)
    compare_shapes(expected_s4_shapes(layout), sd, "a state-spaces S4 checkpoint of this config.json",
                   optional=optional_s4_tensors(layout))
    sd.setdefault("decoder.weight", sd["encoder.weight"])

    layers = []
    for i in range(layout.n_layers):
        convert_layer = _s4d_layer if layout.layer == "s4d" else _standalone_layer
        layers.append(convert_layer(sd, f"s4_layers.{i}.", layout))
    l_max = layout.l_max
    if layout.kernel == "dplr":
        lengths = _l_kernels(sd, layout)
        attuned = sorted(set(lengths) - {0})
        if attuned:
            l_max = attuned[-1]
        elif l_max is None:
            raise ConversionError("layer.l_max is needed: every layer's l_kernel is 0, so its C is the plain C, and "
                                  "ssm-hf's DPLR kernel stores C̃ attuned to a length l_max")
        for layer, length in zip(layers, lengths):
            if length != l_max:
                layer["kernel.C"] = _attuned_c(layer, length, l_max)

    tied = layout.pool is None and torch.equal(sd["decoder.weight"], sd["encoder.weight"])
    head_bias = "decoder.bias" in sd
    config = s4_config_to_ssm_hf(layout, l_max=l_max, tied=tied, head_bias=head_bias)
    head = "lm_head" if layout.pool is None else "score"
    converted = {"backbone.embeddings.weight": sd["encoder.weight"], f"{head}.weight": sd["decoder.weight"]}
    if head_bias:
        converted[f"{head}.bias"] = sd["decoder.bias"]
    for i, layer in enumerate(layers):
        converted.update({f"backbone.layers.{i}.mixer.{name}": tensor for name, tensor in layer.items()})
        converted[f"backbone.layers.{i}.norm.weight"] = sd[f"norms.{i}.weight"]
        converted[f"backbone.layers.{i}.norm.bias"] = sd[f"norms.{i}.bias"]
    model_class = S4ForCausalLM if layout.pool is None else S4ForSequenceClassification
    check_state_dict(model_class, config, converted)
    return model_class, config, converted


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix in CHECKPOINT_SUFFIXES and path.is_file())


def read_s4_state_dict(folder: str | Path, progress: bool | None = False) -> dict[str, torch.Tensor]:
    """The tensors of a state-spaces S4 SRC folder: its safetensors / pytorch_model.bin files, or its one `.ckpt`,
    `.pth` or `.pt` file (a state dict, or a dict holding it under "state_dict" or "model"), loaded with
    `torch.load(weights_only=True)`."""
    folder = Path(folder)
    checkpoints = _checkpoint_files(folder)
    if not checkpoints:
        return read_state_dict(folder, progress)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if len(checkpoints) > 1 or others:
        names = ", ".join([p.name for p in checkpoints] + others)
        raise ConversionError(f"{folder} holds several weight files ({names}); keep exactly one checkpoint there")
    path = checkpoints[0]
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        message = " ".join(str(err).split())[:300]
        raise ConversionError(
            f"{path.name} cannot be read with torch.load(weights_only=True), which ssm-hf uses so that no arbitrary "
            f"Python object is unpickled ({message}). Lightning checkpoints hold such objects (the Hydra config in "
            "hyper_parameters). If you trust the file, extract its weights once with: python -c \"import torch; "
            f"c = torch.load('{path.name}', map_location='cpu', weights_only=False); "
            "torch.save(c['state_dict'], 'pytorch_model.bin')\", and put that pytorch_model.bin in SRC instead of "
            f"{path.name}") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in data.items()):
        raise ConversionError(f"{path.name} does not hold a state dict (names to tensors), directly or under "
                              "'state_dict' or 'model'")
    return dict(data)


__all__ = ["S4Layout", "expected_s4_shapes", "optional_s4_tensors", "parse_s4_config", "read_s4_state_dict",
           "s4_config_to_ssm_hf", "s4_to_ssm_hf"]
