"""The names the cache travels under between transformers and a model.

transformers 5.24 calls it `cache` everywhere: the keyword `generate()` passes to `forward`, the output field it
reads back, the key of `generate()`'s model kwargs. Before 5.24 it was `past_key_values`, and `cache_params` for
models named like Mamba. ssm-hf models take all three keywords on every version; their outputs and `generate()`
hooks use the installed version's names, which is all transformers' own code looks for.
"""

from __future__ import annotations

import dataclasses
import functools

from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils import ModelOutput

# True on transformers >= 5.24, whose output classes (and generate()) name the cache `cache`
CACHE_IS_NAMED_CACHE: bool = "cache" in {field.name for field in dataclasses.fields(MoeModelOutputWithPast)}
# transformers' name for the cache: the keyword generate() passes it under, its key in generate()'s model kwargs,
# and the field of transformers' own output classes (ours too from 5.24; before, ours are Mamba's `cache_params`)
CACHE_NAME: str = "cache" if CACHE_IS_NAMED_CACHE else "past_key_values"


def pick_cache(*given: Cache | None) -> Cache | None:
    """The one cache passed to a forward under any of its names (`cache`, `cache_params`, `past_key_values`)."""
    caches = [cache for cache in given if cache is not None]
    if any(cache is not caches[0] for cache in caches[1:]):
        raise ValueError("Two different caches were passed (as `cache`, `cache_params` or `past_key_values`): pass "
                         "one, under one name.")
    return caches[0] if caches else None


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache a model output holds, whatever its class calls it on the installed transformers."""
    for name in ("cache",) if CACHE_IS_NAMED_CACHE else ("cache_params", "past_key_values"):
        if output.get(name) is not None:
            return output[name]
    return None


def with_installed_cache_name(cls: type[ModelOutput]) -> type[ModelOutput]:
    """Class decorator for an output dataclass with a `cache` field. Before transformers 5.24, `generate()` finds
    the cache in an output only under `cache_params` or `past_key_values`: there the field is renamed
    `cache_params` (transformers' Mamba's name), `cache` and `past_key_values` read it, and the constructor takes
    it as `cache=` too. From 5.24 the class is returned as it is (transformers' `ModelOutput` takes and reads the
    two old names itself)."""
    if CACHE_IS_NAMED_CACHE:
        return cls
    fields = [("cache_params" if field.name == "cache" else field.name, field.type, dataclasses.field(default=None))
              for field in dataclasses.fields(cls)]

    def alias(name: str) -> property:
        return property(lambda self: self.cache_params, lambda self, value: setattr(self, "cache_params", value),
                        doc=f"The `cache_params` field, under the name `{name}`.")

    namespace = {"__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "cache": alias("cache"), "past_key_values": alias("past_key_values")}
    renamed = dataclasses.make_dataclass(cls.__name__, fields, bases=(ModelOutput,), namespace=namespace)
    dataclass_init = renamed.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args, cache: Cache | None = None, **kwargs) -> None:
        if cache is not None:
            if kwargs.get("cache_params") is not None:
                raise ValueError("Pass the cache as `cache` or `cache_params`, not both.")
            kwargs["cache_params"] = cache
        dataclass_init(self, *args, **kwargs)

    renamed.__init__ = __init__
    return renamed
