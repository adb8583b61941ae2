"""What the Mamba and Mamba-2 configs share: a mixer width derived from `expand`, one recurrent cache layer per
block."""

from __future__ import annotations


class ExpandedRecurrentLayers:
    """Mixin for configs with `expand`, `hidden_size` and `num_hidden_layers` whose every block is recurrent."""

    @property
    def intermediate_size(self) -> int | float:
        """Width of the mixer (`d_inner`): expand * hidden_size, always derived, so it cannot go stale."""
        width = self.expand * self.hidden_size
        return int(width) if float(width).is_integer() else width

    @property
    def layer_types(self) -> list[str]:
        """Cache layer type per layer: each block keeps a conv state and a recurrent state."""
        return ["linear_attention"] * self.num_hidden_layers
