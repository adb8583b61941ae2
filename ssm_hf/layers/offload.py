"""Weights that a mixer reads from its sub-modules without calling them, made available under accelerate's
offloading (`device_map` with "cpu" beside GPUs, or "disk")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def loaded_weights(*modules: nn.Module) -> Iterator[None]:
    """Inside the context, the offloaded parameters of `modules` sit on their execution device.

    accelerate's hooks load a module's offloaded weights only when that module is called; the mixers read some
    (`conv1d.weight`, `dt_proj.weight`, S4's kernel parameters) directly, so they ask for them here. Modules
    without an accelerate hook (the usual case) cost nothing."""
    hooked = [module for module in modules if getattr(module, "_hf_hook", None) is not None]
    if not hooked:
        yield
        return
    try:  # (in a try block, so a remote-code export does not list accelerate among its required packages)
        from accelerate.utils import align_module_device
    except ImportError as err:  # the hooks come from accelerate, so it is there whenever they are
        raise ImportError("offloaded weights need accelerate: pip install accelerate") from err

    with contextlib.ExitStack() as stack:
        for module in hooked:
            stack.enter_context(align_module_device(module))
        yield
