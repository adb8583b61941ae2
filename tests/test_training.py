"""Fine-tuning with transformers' Trainer: plain, activation (gradient) checkpointing, bf16, a PEFT LoRA adapter."""

import math

import pytest
import torch
from conftest import causal_lm_class, tiny_config
from transformers import Trainer, TrainingArguments

from ssm_hf.data import causal_lm_blocks

# LoRA targets per family: the linear layers of the mixer
LORA_TARGETS = {"mamba": ["in_proj", "x_proj", "out_proj"], "mamba2": ["in_proj", "out_proj"]}


@pytest.fixture(scope="module")
def blocks(tokenizer, stdlib_text):
    return causal_lm_blocks(tokenizer, stdlib_text, block_size=64)[:64]


def _eval_loss(model, blocks) -> float:
    model.eval()
    ids = torch.stack([b["input_ids"] for b in blocks[:16]])
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _train(model, blocks, tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=5e-3, num_train_epochs=2,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    args.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=blocks)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("family,activation_checkpointing", [("mamba", False), ("mamba", True), ("mamba2", False),
                                                              ("mamba2", True)])
def test_trainer_lowers_the_loss(blocks, tmp_path, tokenizer, family, activation_checkpointing):
    torch.manual_seed(0)
    model = causal_lm_class(family)(tiny_config(family, vocab_size=len(tokenizer)))
    before = _eval_loss(model, blocks)
    losses = _train(model, blocks, tmp_path, activation_checkpointing=activation_checkpointing)
    assert all(block.gradient_checkpointing == activation_checkpointing for block in model.backbone.layers)
    after = _eval_loss(model, blocks)
    assert all(math.isfinite(loss) for loss in losses)
    assert after < before - 0.5, (before, after)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_gradient_checkpointing_gives_the_same_gradients(blocks, tokenizer, family):
    torch.manual_seed(0)
    model = causal_lm_class(family)(tiny_config(family, vocab_size=len(tokenizer))).train()
    ids = torch.stack([b["input_ids"] for b in blocks[:4]])
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.backbone.layers)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_trainer_bf16(blocks, tmp_path, tokenizer, family):
    torch.manual_seed(0)
    model = causal_lm_class(family)(tiny_config(family, vocab_size=len(tokenizer)))
    before = _eval_loss(model, blocks)
    losses = _train(model, blocks, tmp_path, bf16=True, num_train_epochs=1)
    assert all(math.isfinite(loss) for loss in losses)
    assert _eval_loss(model, blocks) < before


@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_peft_lora_trains_only_the_adapter(blocks, tmp_path, tokenizer, family):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = causal_lm_class(family)(tiny_config(family, vocab_size=len(tokenizer)))
    frozen_before = base.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    targets = LORA_TARGETS[family]
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for target in targets:  # lora_A and lora_B in every layer
        assert sum(f".{target}." in n for n in trainable) == 2 * base.config.num_hidden_layers, target
    before = _eval_loss(model, blocks)
    _train(model, blocks, tmp_path, learning_rate=1e-2)
    assert _eval_loss(model, blocks) < before - 0.2
    torch.testing.assert_close(base.backbone.layers[0].mixer.in_proj.base_layer.weight, frozen_before)
    merged = model.merge_and_unload()
    assert type(merged) is causal_lm_class(family)
