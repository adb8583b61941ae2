"""Feed-forward layers of hybrids: a gated MLP, and a top-k mixture of experts with a load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)); names as in transformers' Jamba/Llama MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Linear scores of each token for each expert. weight: (num_experts, hidden_size)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """Gated-MLP experts stored as 3-D tensors: gate_up_proj (experts, 2 * intermediate, hidden) and
    down_proj (experts, hidden, intermediate), the layout of transformers' Jamba/Mixtral experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, hidden_act: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden); expert_index, expert_weight: (tokens, top_k). Each token's output is the weighted
        sum of its experts' outputs; only the experts that received tokens run."""
        out = torch.zeros_like(x)
        for expert in expert_index.unique().tolist():
            token, slot = torch.where(expert_index == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])
            # index_put_ with accumulate: the same sum as index_add_ (a token picks an expert at most once), and
            # far cheaper on a busy multi-threaded CPU, where index_add_ was measured at tens of ms per call
            out.index_put_((token,), (y * expert_weight[token, slot, None]).to(out.dtype), accumulate=True)
        return out


class MoE(nn.Module):
    """Top-k mixture of gated-MLP experts. The k selected softmax probabilities weight the experts' outputs
    (not renormalised, as in Jamba). `forward` returns the output and the router logits (tokens, num_experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__()
        self.top_k = top_k
        self.router = Router(hidden_size, num_experts)
        self.experts = Experts(hidden_size, intermediate_size, num_experts, hidden_act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_logits = self.router(tokens)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        return self.experts(tokens, index, weight.to(x.dtype)).view(shape), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers: num_experts * Σ_e f_e · p_e, with f_e the share
    of (token, slot) assignments sent to expert e and p_e the mean router probability of e; equal to top_k when the
    routing is uniform. router_logits: one (batch * seqlen, num_experts) tensor per MoE layer; attention_mask
    (batch, seqlen) excludes padding."""
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)      # (layers * tokens, experts)
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).float()  # (rows, k, experts)
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = attention_mask.reshape(-1).to(logits.device, torch.float32).repeat(len(router_logits))
    total = weights.sum().clamp_min(1.0)
    assigned = (chosen * weights[:, None, None]).sum(dim=(0, 1)) / total            # (experts,)
    mean_prob = (probs * weights[:, None]).sum(dim=0) / total
    return num_experts * (assigned * mean_prob).sum()
