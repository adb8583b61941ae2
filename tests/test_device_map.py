"""Placement for model parallelism: `_no_split_modules` names our real blocks (what `device_map="auto"` and FSDP
wrap whole), and a model loaded with an explicit `device_map` (accelerate's hooks, one layer offloaded to disk)
generates the same greedy tokens with its recurrent cache as the plain model. Splits over several GPUs run in
`bench/multi_gpu.py`."""

import pytest
import torch
from conftest import tiny_lm
from transformers import AutoModelForCausalLM

PRESETS = ["mamba-tiny", "mamba2-tiny", "s4-tiny", "s4d-tiny", "hybrid-tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_no_split_modules_are_the_blocks(preset):
    model = tiny_lm(preset)
    classes = {type(module).__name__ for module in model.modules()}
    block_classes = {type(block).__name__ for block in model.base_model.layers}
    assert model._no_split_modules, "no _no_split_modules: device_map='auto' could split a block across devices"
    assert set(model._no_split_modules) <= classes, f"{model._no_split_modules} not among {sorted(classes)}"
    assert block_classes <= set(model._no_split_modules)


# offload: the last block goes to "disk", so accelerate's hooks load its weights for each forward; the mixers read
# some sub-module weights without calling them (layers/offload.py makes those available too)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("preset", ["mamba-tiny", "mamba2-tiny", "s4-tiny", "hybrid-tiny"])
def test_explicit_device_map_generates_with_cache(tmp_path, preset, offload, one_thread):
    model = tiny_lm(preset)
    model.save_pretrained(tmp_path)
    layers = model.config.num_hidden_layers
    device_map = {"backbone.embeddings": "cpu", "backbone.norm_f": "cpu", "lm_head": "cpu"}
    device_map.update({f"backbone.layers.{i}": "cpu" for i in range(layers)})
    if offload:
        device_map[f"backbone.layers.{layers - 1}"] = "disk"  # accelerate's hooks load it for each forward
    placed = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off")
    placed.eval()
    if offload:
        assert placed.hf_device_map == device_map
    else:  # one device: transformers loads in place, without hooks
        assert {p.device.type for p in placed.parameters()} == {"cpu"}

    prompt = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    expected = model.generate(prompt, **settings)
    torch.testing.assert_close(placed.generate(prompt, **settings), expected, rtol=0, atol=0)
