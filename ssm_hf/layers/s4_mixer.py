"""The S4 / S4D layer: SSM convolution (or recurrence) per channel, D skip, activation, output projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from ..configs.s4 import S4Config
from ..kernels import s4_torch as ops
from .offload import loaded_weights


def _as_complex(x: torch.Tensor, real_dtype: torch.dtype) -> torch.Tensor:
    """A (..., 2) real parameter as a complex tensor (built with torch.complex: works for bf16 storage too)."""
    x = x.to(real_dtype)
    return torch.complex(x[..., 0], x[..., 1])


class S4Kernel(nn.Module):
    """The SSM parameters of one S4 layer, and the three ways to run them: the convolution kernel, the state after a
    chunk, and the single recurrent step.

    S = hidden_size * num_ssm_copies SSMs (index copy * hidden_size + channel), M = state_size / 2 modes each.
    Complex parameters are stored as real tensors with a trailing dimension of 2 (safetensors has no complex type):

    - `log_dt` (S,): Δ = exp(log_dt);
    - `log_A_real` (S, M) and `A_imag` (S, M): the diagonal Λ = -exp(log_A_real) + i·A_imag (real part negative by
      construction, so every mode decays);
    - `B` (S, M, 2), `C` (S, M, 2): input and output vectors; for the DPLR kernel `C` is the generating-function
      vector C̃ = C (I - Ā^l_max) of the S4 paper, as state-spaces stores it;
    - `P` (rank, S, M, 2), DPLR only: the low-rank part, A = Λ - P P*.

    Everything is computed in float32 (float64 for a float64 model), and casting the model to bfloat16 or float16
    keeps these parameters in float32 (see `_apply`).
    """

    def __init__(self, config: S4Config):
        super().__init__()
        self.num_ssms = config.num_ssms
        self.modes = config.state_size // 2
        self.state_size = config.state_size
        self.kernel_type = config.kernel
        self.init = config.init
        self.discretization = config.discretization
        self.l_max = config.l_max
        self.dt_range = (config.time_step_min, config.time_step_max)
        S, M = self.num_ssms, self.modes
        self.log_dt = nn.Parameter(torch.empty(S))
        self.log_A_real = nn.Parameter(torch.empty(S, M))
        self.A_imag = nn.Parameter(torch.empty(S, M))
        self.B = nn.Parameter(torch.empty(S, M, 2))
        self.C = nn.Parameter(torch.empty(S, M, 2))
        if self.kernel_type == "dplr":
            self.P = nn.Parameter(torch.empty(config.rank, S, M, 2))
        # Discretised quantities of the recurrent view, kept while the parameters are unchanged (outside autograd):
        # name -> (key, the parameters' storages, value), see `_memoized`.
        self._memo: dict[str, tuple[tuple, list[torch.Tensor], object]] = {}

    def _apply(self, fn, recurse=True):
        # 8 mantissa bits move Δ = exp(log_dt) and the mode frequencies by a percent or more, which shifts the
        # phases of a long kernel visibly; like state-spaces under mixed precision, the SSM parameters stay float32
        # when the model is cast to a half-precision dtype (`model.to(torch.bfloat16)`, `.half()`).
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
        return self

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel_type}, init={self.init}, discretization={self.discretization}, "
                f"ssms={self.num_ssms}, state_size={self.state_size}")

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Λ, B (and P) from `init`, the same for every SSM; Δ log-uniform in its range; C complex normal (variance
        1, as state-spaces)."""
        S, M = self.num_ssms, self.modes
        Lambda, B, P = ops.ssm_init(self.init, self.state_size)
        init.copy_(self.log_A_real, torch.log(-Lambda.real).float().expand(S, M))
        init.copy_(self.A_imag, Lambda.imag.float().expand(S, M))
        init.copy_(self.B, torch.view_as_real(B).float().expand(S, M, 2))
        if self.kernel_type == "dplr":
            low_rank = torch.zeros(self.P.shape, dtype=torch.float32)
            low_rank[0] = torch.view_as_real(P).float()                   # further ranks start at zero
            init.copy_(self.P, low_rank)
        init.uniform_(self.log_dt, math.log(self.dt_range[0]), math.log(self.dt_range[1]))
        init.normal_(self.C, std=math.sqrt(0.5))

    # -- parameters ---------------------------------------------------------------------------------------------

    def real_dtype(self) -> torch.dtype:
        return torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32

    def continuous(self) -> tuple[torch.Tensor, ...]:
        """(Δ (S,), Λ (S, M), B (S, M), C (S, M), P (R, S, M) or None), in the compute dtype."""
        rd = self.real_dtype()
        A = torch.complex(-torch.exp(self.log_A_real.to(rd)), self.A_imag.to(rd))
        P = _as_complex(self.P, rd) if self.kernel_type == "dplr" else None
        return torch.exp(self.log_dt.to(rd)), A, _as_complex(self.B, rd), _as_complex(self.C, rd), P

    def _memoized(self, name: str, compute):
        """compute(), reused while no parameter changed; recomputed under autograd, where the result must carry
        gradients.

        A parameter counts as unchanged while it is the same memory (its storage, not its address: the allocator
        hands freed addresses out again; the entry holds the storages it was computed from, so that none of them
        can be freed and replaced unseen) with the same layout and the same version (bumped by every in-place
        update through the parameter: optimizer steps, `load_state_dict`, `p.copy_(...)` under no_grad or
        inference_mode). Writes that bypass the parameter's version counter, through `p.data` (`p.data.copy_(t)`)
        or through another tensor sharing its memory, are not seen, as autograd does not see them either: update
        the parameter itself. Parameters that are inference tensors (a model made under inference_mode) have no
        version counter: then the values are computed at every call."""
        params = list(self.parameters())
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or any(p.is_inference() for p in params):
            return compute()
        key = tuple((p.untyped_storage()._cdata, p.storage_offset(), p.shape, p.stride(), p.dtype, p.device,
                     p._version) for p in params)
        hit = self._memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[2]
        value = compute()
        self._memo[name] = (key, [p.detach() for p in params], value)
        return value

    def generating_length(self, length: int) -> int:
        """DPLR: the kernel length used for an input of `length`: l_max, doubled until it covers the input."""
        kernel_length = self.l_max
        while kernel_length < length:
            kernel_length *= 2
        return kernel_length

    def _dense(self, dt, A, P, B) -> tuple[torch.Tensor, torch.Tensor]:
        """Full Ā, B̄ of the DPLR system in complex128 (powers of a non-normal Ā want the precision)."""
        return ops.dplr_dense(dt.double(), A.to(torch.complex128), P.to(torch.complex128), B.to(torch.complex128))

    def _generating_c(self, dt, A, P, B, C, kernel_length: int) -> torch.Tensor:
        if kernel_length == self.l_max:
            return C
        Abar, _ = self._dense(dt, A, P, B)
        return ops.extend_generating_c(C.to(torch.complex128), Abar, self.l_max, kernel_length).to(C.dtype)

    # -- convolution view ---------------------------------------------------------------------------------------

    def convolution_kernel(self, length: int) -> torch.Tensor:
        """K_k = C Ā^k B̄ for k < length: (S, length) real."""
        dt, A, B, C, P = self.continuous()
        if self.kernel_type == "diag":
            log_dA, dB = ops.discretize_diag(dt, A, B, self.discretization)
            return ops.vandermonde_kernel(C * dB, log_dA, length)
        kernel_length = self.generating_length(length)
        C = self._generating_c(dt, A, P, B, C, kernel_length)
        return ops.dplr_kernel(dt, A, P, B, C, kernel_length)[..., :length]

    def state_output(self, h: torch.Tensor, length: int) -> torch.Tensor:
        """The output contribution 2 Re(C Ā^(k+1) h) of an initial state h (b, S, M), k < length: (b, S, length)."""
        dt, A, B, C, P = self.continuous()
        h = h.to(A.dtype)
        if self.kernel_type == "diag":
            log_dA, _ = ops.discretize_diag(dt, A, B, self.discretization)
            return ops.vandermonde_kernel(C * torch.exp(log_dA) * h, log_dA, length)
        kernel_length = self.generating_length(length)
        C = self._generating_c(dt, A, P, B, C, kernel_length)
        return ops.dplr_kernel(dt, A, P, ops.dplr_state_input(h, dt, A, P), C, kernel_length)[..., :length]

    def final_state(self, u: torch.Tensor, h0: torch.Tensor | None, steps: torch.Tensor | None) -> torch.Tensor:
        """The state after a chunk: u (b, S, L) real with its real tokens at the end, h0 (b, S, M) or None, steps
        (b,) real tokens per row or None (all L). Returns (b, S, M) complex."""
        dt, A, B, C, P = self.continuous()
        if self.kernel_type == "diag":
            log_dA, dB = ops.discretize_diag(dt, A, B, self.discretization)
            return ops.diag_final_state(u, log_dA, dB, None if h0 is None else h0.to(A.dtype), steps)
        Abar, Bbar = self._dense(dt, A, P, B)
        full = ops.dense_final_state(u, Abar, Bbar, None if h0 is None else ops.conj_full(h0), steps)
        return full[..., : self.modes].to(A.dtype)

    # -- recurrent view -----------------------------------------------------------------------------------------

    def _step_params(self):
        dt, A, B, C, P = self.continuous()
        if self.kernel_type == "diag":
            log_dA, dB = ops.discretize_diag(dt, A, B, self.discretization)
            return torch.exp(log_dA), dB, C
        Abar, _ = self._dense(dt, A, P, B)
        C = ops.c_from_generating_c(C.to(torch.complex128), Abar, self.l_max).to(A.dtype)
        return ops.dplr_step_setup(dt, A, P, B, C)

    def step(self, u: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u (b, S) real, h (b, S, M) complex. Returns (y (b, S), new state), O(M) per SSM."""
        params = self._memoized("step", self._step_params)
        if self.kernel_type == "diag":
            return ops.diag_step(h, u, *params)
        return ops.dplr_step(h, u, params)


def _read_state(cache_params: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """The layer's complex state (b, S, M) from the cache, which holds it as a real view (b, S, M, 2)."""
    if cache_params is None:
        return None
    state = cache_params.get_recurrent_state(layer_idx)
    if state is None:
        return None
    if torch.is_grad_enabled():
        state = state.clone()  # the cache overwrites its tensor in place below; autograd may still need this one
    return torch.view_as_complex(state.contiguous())


def _write_state(cache_params: Cache, layer_idx: int, state: torch.Tensor) -> None:
    """Store the complex state as a real view. transformers' `LinearAttentionLayer` marks a layer as having a
    previous state only in `update_conv_state`, and S4 has no conv state, so the flag is set here; without it
    `get_recurrent_state` would keep answering None."""
    cache_params.update_recurrent_state(torch.view_as_real(state), layer_idx)
    cache_params.layers[layer_idx].has_previous_state[0] = True


class S4Mixer(nn.Module):
    """The S4 layer: per SSM, y = K * u + D u (convolution view) or the recurrence (with a cached state, one token
    at a time), then `hidden_act`, dropout and `output_linear` (with GLU or GELU if configured).

    Input (batch, seqlen, hidden_size); SSM s = copy * hidden_size + channel reads channel `s % hidden_size`.
    With a cache, the layer reads and writes its state (batch, S, state_size / 2) complex, stored as a real view
    (batch, S, state_size / 2, 2) in the cache's recurrent state at `layer_idx`.
    """

    def __init__(self, config: S4Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.copies = config.num_ssm_copies
        self.kernel = S4Kernel(config)
        self.D = nn.Parameter(torch.empty(config.num_ssms))
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)
        self.output_activation = config.output_activation
        width = 2 * config.hidden_size if config.output_activation == "glu" else config.hidden_size
        self.output_linear = nn.Linear(config.num_ssms, width)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """SSM parameters (see `S4Kernel`), D standard normal (as state-spaces), Kaiming-uniform output layer."""
        self.kernel.reset_ssm_parameters()
        init.normal_(self.D)
        init.kaiming_uniform_(self.output_linear.weight, a=math.sqrt(5))
        init.zeros_(self.output_linear.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: (batch, seqlen, hidden_size); attention_mask: (batch, ≥ seqlen), 1 for real tokens, its last
        `seqlen` columns apply. Padding is skipped wherever it is: each real token sees the real tokens before it
        (and the cached state), as if the padding were not there; outputs at padded positions are meaningless.
        Returns (batch, seqlen, hidden_size)."""
        with loaded_weights(self.kernel):  # its parameters are read through methods, not a call
            return self._forward(hidden_states, cache_params, attention_mask)

    def _forward(self, hidden_states: torch.Tensor, cache_params: Cache | None,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seqlen, _ = hidden_states.shape
        mask = attention_mask[:, -seqlen:].bool() if attention_mask is not None else None
        u = hidden_states.transpose(1, 2).to(self.kernel.real_dtype())
        if self.copies > 1:
            u = u.repeat(1, self.copies, 1)                                # (batch, S, seqlen)
        if mask is not None:
            u = u * mask[:, None, :]
        state = _read_state(cache_params, self.layer_idx)

        if seqlen == 0:
            y, new_state = u, None
        elif state is not None and seqlen == 1:
            y, new_state = self.kernel.step(u[..., 0], state)
            if mask is not None:  # a padded decoding step leaves the state alone
                new_state = torch.where(mask[:, :1, None], new_state, state)
            y = y.unsqueeze(-1)
        else:
            y, new_state = self._sequence(u, state, mask, want_state=cache_params is not None)
        if cache_params is not None and new_state is not None:
            _write_state(cache_params, self.layer_idx, new_state)

        y = y + self.D.to(y.dtype)[:, None] * u
        y = self.dropout(self.act(y.transpose(1, 2).to(hidden_states.dtype)))
        y = self.output_linear(y)
        if self.output_activation == "glu":
            y = F.glu(y, dim=-1)
        elif self.output_activation == "gelu":
            y = F.gelu(y)
        return y

    def _sequence(self, u: torch.Tensor, state: torch.Tensor | None, mask: torch.Tensor | None, want_state: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Convolution view over a chunk u (b, S, L), continuing from `state` if given. Returns (y, final state)."""
        length = u.shape[-1]
        if mask is None or bool(mask.all()):
            y = ops.fft_conv(u, self.kernel.convolution_kernel(length))
            if state is not None:
                y = y + self.kernel.state_output(state, length)
            return y, self.kernel.final_state(u, state, None) if want_state else None

        # Padding: move each row's real tokens to the front (order kept) for the outputs, so that they follow the
        # initial state directly, and to the end for the final state, so that no padding comes after them.
        real = mask
        steps = real.sum(1)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)   # (b, L): real positions first
        index = order.unsqueeze(1).expand_as(u)
        front = u.gather(2, index)
        y = ops.fft_conv(front, self.kernel.convolution_kernel(length))
        if state is not None:
            y = y + self.kernel.state_output(state, length)
        y = torch.empty_like(y).scatter_(2, index, y)
        if not want_state:
            return y, None
        shift = torch.arange(length, device=u.device) - (length - steps)[:, None]        # (b, L)
        back = front.gather(2, shift.clamp(min=0).unsqueeze(1).expand_as(u)) * (shift >= 0).unsqueeze(1)
        return y, self.kernel.final_state(back, state, steps)


__all__ = ["S4Kernel", "S4Mixer"]
