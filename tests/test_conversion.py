"""Checkpoint conversion (`ssm-hf convert`, `ssm_hf.conversion`): mamba_ssm and transformers' in-tree checkpoints
into ssm-hf and back.

Each import is checked against an independent implementation of the same weights: transformers' in-tree models
(Mamba, FalconMamba, Mamba2, Jamba, and Bamba for mamba_ssm's Mamba2 + attention hybrids), filled through mappings
written here from the formats' documented names, not through the library's converters; for a Mamba1 + attention
hybrid without MLPs, a stack assembled here from transformers' Mamba mixer and Bamba attention modules. mamba_ssm
checkpoints are random tensors laid out here by mamba_ssm's parameter names and shapes.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_close_to_scale, spread_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import ssm_hf
from ssm_hf.cli import main
from ssm_hf.conversion import ConversionError, convert_checkpoint, mamba_ssm_config_to_ssm_hf

# --------------------------------------------------------------------------------------------------------------
# mamba_ssm checkpoints, laid out by mamba_ssm's module names (mixer_seq_simple, mamba_simple, mamba2, mha, mlp)


def mamba_ssm_config(**overrides) -> dict:
    config = dict(d_model=32, d_intermediate=0, n_layer=2, vocab_size=50, ssm_cfg={}, attn_layer_idx=[], attn_cfg={},
                  rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
                  tie_embeddings=True)
    config.update(overrides)
    return config


def mamba_ssm_state_dict(config: dict, seed: int = 0) -> dict:
    """Random tensors with the names and shapes of mamba_ssm's MambaLMHeadModel for `config`."""
    g = torch.Generator().manual_seed(seed)

    def linear(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def near_one(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    def small(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    d = config["d_model"]
    multiple = config["pad_vocab_size_multiple"]
    vocab = -(-config["vocab_size"] // multiple) * multiple
    ssm = dict(config["ssm_cfg"])
    layer = ssm.pop("layer", "Mamba1")
    sd = {"backbone.embedding.weight": torch.randn(vocab, d, generator=g), "backbone.norm_f.weight": near_one(d)}
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = near_one(d)
        if i in config["attn_layer_idx"]:
            attn = config["attn_cfg"]
            heads = attn["num_heads"]
            kv_heads = attn.get("num_heads_kv") or heads
            head_dim = attn.get("head_dim") or d // heads
            sd[p + "mixer.in_proj.weight"] = linear(head_dim * (heads + 2 * kv_heads), d)
            if attn.get("qkv_proj_bias", True):
                sd[p + "mixer.in_proj.bias"] = small(head_dim * (heads + 2 * kv_heads))
            sd[p + "mixer.out_proj.weight"] = linear(d, heads * head_dim)
            if attn.get("out_proj_bias", True):
                sd[p + "mixer.out_proj.bias"] = small(d)
        elif layer == "Mamba1":
            inner, n, k = ssm.get("expand", 2) * d, ssm.get("d_state", 16), ssm.get("d_conv", 4)
            rank = ssm.get("dt_rank", "auto")
            rank = math.ceil(d / 16) if rank == "auto" else rank
            sd[p + "mixer.in_proj.weight"] = linear(2 * inner, d)
            sd[p + "mixer.conv1d.weight"] = torch.randn(inner, 1, k, generator=g) / math.sqrt(k)
            sd[p + "mixer.conv1d.bias"] = small(inner)
            sd[p + "mixer.x_proj.weight"] = linear(rank + 2 * n, inner)
            sd[p + "mixer.dt_proj.weight"] = linear(inner, rank)
            sd[p + "mixer.dt_proj.bias"] = torch.log(torch.expm1(torch.empty(inner).uniform_(0.01, 0.1, generator=g)))
            sd[p + "mixer.A_log"] = torch.log(torch.arange(1, n + 1).float()).expand(inner, n) + small(inner, n)
            sd[p + "mixer.D"] = near_one(inner)
            sd[p + "mixer.out_proj.weight"] = linear(d, inner)
        else:
            inner, n, k = ssm.get("expand", 2) * d, ssm.get("d_state", 128), ssm.get("d_conv", 4)
            heads, groups = inner // ssm.get("headdim", 64), ssm.get("ngroups", 1)
            conv_dim = inner + 2 * groups * n
            sd[p + "mixer.in_proj.weight"] = linear(2 * inner + 2 * groups * n + heads, d)
            sd[p + "mixer.conv1d.weight"] = torch.randn(conv_dim, 1, k, generator=g) / math.sqrt(k)
            sd[p + "mixer.conv1d.bias"] = small(conv_dim)
            sd[p + "mixer.dt_bias"] = torch.log(torch.expm1(torch.empty(heads).uniform_(0.01, 0.1, generator=g)))
            sd[p + "mixer.A_log"] = torch.log(torch.empty(heads).uniform_(1, 16, generator=g))
            sd[p + "mixer.D"] = near_one(heads)
            sd[p + "mixer.norm.weight"] = near_one(inner)
            sd[p + "mixer.out_proj.weight"] = linear(d, inner)
        if config["d_intermediate"]:
            width = -(-config["d_intermediate"] // 128) * 128  # GatedMLP rounds up to multiple_of=128
            sd[p + "norm2.weight"] = near_one(d)
            sd[p + "mlp.fc1.weight"] = linear(2 * width, d)
            sd[p + "mlp.fc2.weight"] = linear(d, width)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if config["tie_embeddings"] else linear(vocab, d)
    return sd


def write_checkpoint(folder: Path, config: dict, state_dict: dict, layout: str) -> Path:
    """A checkpoint folder: config.json plus the tensors as one safetensors file, two safetensors shards with an
    index, pytorch_model.bin, or two .bin shards with an index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state_dict)
    halves = {f"part-{j}": names[j::2] for j in range(2)}
    if layout == "safetensors":
        save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
    elif layout in ("sharded", "sharded_bin"):
        ext = "safetensors" if layout == "sharded" else "bin"
        weight_map = {}
        for shard, shard_names in halves.items():
            file = f"model-{shard}.{ext}" if ext == "safetensors" else f"pytorch_model-{shard}.bin"
            tensors = {k: state_dict[k].clone().contiguous() for k in shard_names}
            if ext == "safetensors":
                save_file(tensors, folder / file, metadata={"format": "pt"})
            else:
                torch.save(tensors, folder / file)
            weight_map.update(dict.fromkeys(shard_names, file))
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)
    return folder


def read_safetensors_folder(folder: Path) -> dict:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def architecture(config) -> dict:
    """A config's fields without the bookkeeping ones save_pretrained fills in."""
    bookkeeping = ("dtype", "architectures", "transformers_version", "_name_or_path")
    return {k: v for k, v in config.to_dict().items() if k not in bookkeeping}


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def ids_for(vocab: int, seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# independent references for mamba_ssm checkpoints: transformers' models filled by mappings written here


def transformers_mamba_from_mamba_ssm(config: dict, sd: dict, vocab: int):
    ssm = config["ssm_cfg"]
    if ssm.get("layer") == "Mamba2":
        inner = ssm.get("expand", 2) * config["d_model"]
        theirs = transformers.Mamba2Config(
            vocab_size=vocab, hidden_size=config["d_model"], num_hidden_layers=config["n_layer"],
            state_size=ssm["d_state"], head_dim=ssm["headdim"], num_heads=inner // ssm["headdim"],
            n_groups=ssm.get("ngroups", 1), expand=ssm.get("expand", 2), chunk_size=ssm["chunk_size"],
            layer_norm_epsilon=1e-5, tie_word_embeddings=config["tie_embeddings"])
        model = transformers.Mamba2ForCausalLM(theirs)
    else:
        theirs = transformers.MambaConfig(
            vocab_size=vocab, hidden_size=config["d_model"], num_hidden_layers=config["n_layer"],
            state_size=ssm["d_state"], expand=ssm.get("expand", 2), layer_norm_epsilon=1e-5,
            tie_word_embeddings=config["tie_embeddings"])
        model = transformers.MambaForCausalLM(theirs)
    mapped = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def bamba_from_mamba_ssm(config: dict, sd: dict, vocab: int):
    """transformers' Bamba (Mamba2 + attention with rotary on half of each head, gated MLP in every layer)."""
    ssm, attn = config["ssm_cfg"], config["attn_cfg"]
    d, width = config["d_model"], -(-config["d_intermediate"] // 128) * 128
    heads = ssm.get("expand", 2) * d // ssm["headdim"]
    theirs = transformers.BambaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=width, num_hidden_layers=config["n_layer"],
        num_attention_heads=attn["num_heads"], num_key_value_heads=attn["num_heads_kv"],
        attn_layer_indices=config["attn_layer_idx"], mamba_n_heads=heads, mamba_d_head=ssm["headdim"],
        mamba_n_groups=ssm["ngroups"], mamba_d_state=ssm["d_state"], mamba_chunk_size=ssm["chunk_size"],
        rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=config["tie_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": attn["rotary_emb_base"]})
    assert theirs.rope_parameters["partial_rotary_factor"] * (d // attn["num_heads"]) == attn["rotary_emb_dim"]
    q = attn["num_heads"] * (d // attn["num_heads"])
    kv = attn["num_heads_kv"] * (d // attn["num_heads"])
    mapped = {"model.embed_tokens.weight": sd["backbone.embedding.weight"],
              "model.final_layernorm.weight": sd["backbone.norm_f.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(config["n_layer"]):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        mapped[dst + "input_layernorm.weight"] = sd[src + "norm.weight"]
        mapped[dst + "pre_ff_layernorm.weight"] = sd[src + "norm2.weight"]
        fc1 = sd[src + "mlp.fc1.weight"]
        mapped[dst + "feed_forward.up_proj.weight"] = fc1[:width]  # GatedMLP: y, gate = fc1(x).chunk(2)
        mapped[dst + "feed_forward.gate_proj.weight"] = fc1[width:]
        mapped[dst + "feed_forward.down_proj.weight"] = sd[src + "mlp.fc2.weight"]
        if i in config["attn_layer_idx"]:
            for kind in ("weight", "bias"):
                w = sd[f"{src}mixer.in_proj.{kind}"]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.split([q, kv, kv])):
                    mapped[f"{dst}self_attn.{proj}.{kind}"] = part
                mapped[f"{dst}self_attn.o_proj.{kind}"] = sd[f"{src}mixer.out_proj.{kind}"]
        else:
            for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                         "out_proj.weight"):
                mapped[f"{dst}mamba.{name}"] = sd[f"{src}mixer.{name}"]
    model = transformers.BambaForCausalLM(theirs)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


class Mamba1AttentionStack(torch.nn.Module):
    """A mamba_ssm Mamba1 + attention stack without MLPs (d_intermediate=0), from transformers' modules: its
    MambaMixer and RMS norms, and Bamba's attention with rotary embeddings on half of each head."""

    def __init__(self, config: dict, sd: dict, vocab: int):
        from transformers.models.bamba.modeling_bamba import BambaAttention, BambaRotaryEmbedding
        from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm

        super().__init__()
        ssm, attn, d = config["ssm_cfg"], config["attn_cfg"], config["d_model"]
        mamba = transformers.MambaConfig(hidden_size=d, state_size=ssm["d_state"], expand=ssm.get("expand", 2),
                                         num_hidden_layers=config["n_layer"])
        bamba = transformers.BambaConfig(
            hidden_size=d, num_attention_heads=attn["num_heads"], num_key_value_heads=attn["num_heads_kv"],
            mamba_n_heads=1, mamba_d_head=2 * d, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": attn["rotary_emb_base"]})
        self.attn_layers = set(config["attn_layer_idx"])
        self.embed = torch.nn.Embedding.from_pretrained(sd["backbone.embedding.weight"])
        self.rotary = BambaRotaryEmbedding(bamba)
        self.norms = torch.nn.ModuleList([MambaRMSNorm(d, eps=1e-5) for _ in range(config["n_layer"])])
        self.mixers = torch.nn.ModuleList([BambaAttention(bamba, i) if i in self.attn_layers else MambaMixer(mamba, i)
                                           for i in range(config["n_layer"])])
        self.norm_f = MambaRMSNorm(d, eps=1e-5)
        q = attn["num_heads"] * (d // attn["num_heads"])
        kv = attn["num_heads_kv"] * (d // attn["num_heads"])
        with torch.no_grad():
            for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
                src = f"backbone.layers.{i}."
                norm.weight.copy_(sd[src + "norm.weight"])
                if i in self.attn_layers:
                    q_w, k_w, v_w = sd[src + "mixer.in_proj.weight"].split([q, kv, kv])
                    weights = {"q_proj.weight": q_w, "k_proj.weight": k_w, "v_proj.weight": v_w,
                               "o_proj.weight": sd[src + "mixer.out_proj.weight"]}
                else:
                    weights = {k[len(src + "mixer."):]: v for k, v in sd.items() if k.startswith(src + "mixer.")}
                mixer.load_state_dict(weights, strict=True)
            self.norm_f.weight.copy_(sd["backbone.norm_f.weight"])
        self.lm_head = sd["lm_head.weight"]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        length = ids.shape[1]
        positions = torch.arange(length)[None]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            x = norm(hidden)
            if i in self.attn_layers:
                out = mixer(x, position_embeddings=self.rotary(x, positions), attention_mask=causal)[0]
            else:
                out = mixer(x)
            hidden = hidden + out
        return self.norm_f(hidden) @ self.lm_head.T


MAMBA_SSM_VARIANTS = {
    # name: (config overrides, layout, reference builder)
    "mamba1": (dict(ssm_cfg={"d_state": 8}, tie_embeddings=False), "bin", transformers_mamba_from_mamba_ssm),
    "mamba2": (dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}),
               "sharded_bin", transformers_mamba_from_mamba_ssm),
    "mamba2-attention-mlp": (
        dict(n_layer=3, d_intermediate=100, attn_layer_idx=[1],
             ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
             attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "rotary_emb_base": 500.0,
                       "causal": True}),
        "sharded", bamba_from_mamba_ssm),
    "mamba1-attention": (
        dict(n_layer=3, attn_layer_idx=[0, 2], ssm_cfg={"layer": "Mamba1", "d_state": 8},
             attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "rotary_emb_base": 1000.0,
                       "causal": True, "qkv_proj_bias": False, "out_proj_bias": False}),
        "safetensors", Mamba1AttentionStack),
}


@pytest.mark.parametrize("variant", sorted(MAMBA_SSM_VARIANTS))
def test_mamba_ssm_checkpoint_converts_with_equal_logits_and_exports_bit_exact(variant, tmp_path, capsys):
    overrides, layout, reference = MAMBA_SSM_VARIANTS[variant]
    config = mamba_ssm_config(**overrides)
    sd = mamba_ssm_state_dict(config)
    src = write_checkpoint(tmp_path / "src", config, sd, layout)

    assert convert("--from", "mamba_ssm", src, tmp_path / "ours") == 0
    assert "reading tensors" in capsys.readouterr().err  # the per-tensor progress bar
    assert (tmp_path / "ours" / "config.json").is_file() and list((tmp_path / "ours").glob("*.safetensors"))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    vocab = sd["backbone.embedding.weight"].shape[0]
    assert ours.config.vocab_size == vocab == 64  # 50 padded to a multiple of 16, padding rows kept
    expected_class = {"mamba1": ssm_hf.MambaForCausalLM, "mamba2": ssm_hf.Mamba2ForCausalLM}
    assert type(ours) is expected_class.get(variant, ssm_hf.HybridForCausalLM)

    ids = ids_for(config["vocab_size"])
    with torch.no_grad():
        expected = reference(config, sd, vocab)(ids)
        expected = getattr(expected, "logits", expected)
        assert_close_to_scale(ours(ids).logits, expected)

    assert convert("--to", "mamba_ssm", tmp_path / "ours", tmp_path / "back") == 0
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    assert_same_tensors(back, sd)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert architecture(mamba_ssm_config_to_ssm_hf(exported)) == architecture(ours.config)


def test_mamba_ssm_bfloat16_round_trip_keeps_dtypes(tmp_path):
    config = mamba_ssm_config(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8})
    sd = {k: v.to(torch.bfloat16) for k, v in mamba_ssm_state_dict(config).items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    sd["backbone.layers.0.mixer.A_log"] = sd["backbone.layers.0.mixer.A_log"].float()  # mixed, as often saved
    src = write_checkpoint(tmp_path / "src", config, sd, "bin")
    assert convert("--from", "mamba_ssm", src, tmp_path / "ours") == 0
    assert convert("--to", "mamba_ssm", tmp_path / "ours", tmp_path / "back") == 0
    assert_same_tensors(torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True), sd)


# --------------------------------------------------------------------------------------------------------------
# transformers' in-tree checkpoints


def _jamba():
    config = transformers.JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False)
    return transformers.JambaForCausalLM(config)


TRANSFORMERS_MODELS = {
    "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)),
    "falcon_mamba": lambda: transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, mixer_rms_eps=1e-2)),
    "mamba2": lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=16, n_groups=2,
        chunk_size=8)),
    "jamba": _jamba,
}


@pytest.mark.parametrize("family", sorted(TRANSFORMERS_MODELS))
def test_transformers_checkpoint_converts_with_equal_logits_and_exports_bit_exact(family, tmp_path):
    theirs = spread_weights(TRANSFORMERS_MODELS[family]().eval(), scale=0.1)
    # Jamba is saved in shards with an index, the others as one file
    theirs.save_pretrained(tmp_path / "src", max_shard_size="40KB" if family == "jamba" else "1GB")
    assert (family == "jamba") == (tmp_path / "src" / "model.safetensors.index.json").is_file()

    assert convert("--from", "transformers", tmp_path / "src", tmp_path / "ours") == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(ours).__module__.startswith("ssm_hf.")
    ids = ids_for(64)
    with torch.no_grad():
        assert_close_to_scale(ours(ids).logits, theirs(ids).logits)

    assert convert("--to", "transformers", tmp_path / "ours", tmp_path / "back") == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family
    assert_same_tensors(read_safetensors_folder(tmp_path / "back"), read_safetensors_folder(tmp_path / "src"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(theirs)


def test_falcon_mamba_inner_norm_eps_matters_and_learned_inner_norms_do_not_export(tmp_path):
    theirs = spread_weights(TRANSFORMERS_MODELS["falcon_mamba"]().eval(), scale=0.1)
    theirs.save_pretrained(tmp_path / "src")
    assert convert("--from", "transformers", tmp_path / "src", tmp_path / "ours") == 0
    ours = ssm_hf.MambaForCausalLM.from_pretrained(tmp_path / "ours")
    assert ours.config.inner_layernorms and ours.config.mixer_rms_eps == 1e-2
    ids = ids_for(64)
    with torch.no_grad():
        ours.config.mixer_rms_eps = None  # the block norms' 1e-5 instead: visibly different logits
        other = ssm_hf.MambaForCausalLM(ours.config)
        other.load_state_dict(ours.state_dict())
        assert not torch.allclose(other(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
        ours.backbone.layers[1].mixer.b_layernorm.weight.mul_(2)
    ours.save_pretrained(tmp_path / "learned")
    assert convert("--to", "transformers", tmp_path / "learned", tmp_path / "back") == 1
    assert not (tmp_path / "back").exists()


# --------------------------------------------------------------------------------------------------------------
# bad input


def _mamba_ssm_src(tmp_path, edit_config=None, edit_state=None, layout="safetensors"):
    config = mamba_ssm_config(ssm_cfg={"d_state": 8})
    sd = mamba_ssm_state_dict(config)
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(sd)
    return write_checkpoint(tmp_path / "src", config, sd, layout)


@pytest.mark.parametrize("edit_config, edit_state, message", [
    (None, lambda sd: sd.pop("backbone.layers.1.mixer.D"), "missing: backbone.layers.1.mixer.D"),
    (None, lambda sd: sd.update({"backbone.layers.0.mixer.extra": torch.zeros(2)}),
     "unexpected: backbone.layers.0.mixer.extra"),
    (None, lambda sd: sd.update({"backbone.layers.0.mixer.A_log": torch.zeros(64, 9)}),
     "mis-shaped: backbone.layers.0.mixer.A_log [64, 9] (expected [64, 8])"),
    (None, lambda sd: sd.update({"lm_head.weight": torch.zeros(64, 32)}), "lm_head.weight differs"),
    (lambda c: c["ssm_cfg"].update(layer="Mamba3"), None, "ssm_cfg.layer='Mamba3'"),
    (lambda c: c["ssm_cfg"].update(d_stat=8), None, "unknown mamba_ssm ssm_cfg (Mamba1) field(s) ['d_stat']"),
    (lambda c: c.update(rms_norm=False), None, "LayerNorm blocks (rms_norm=false)"),
    (lambda c: c.update(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "causal": True, "d_conv": 4}), None,
     "attn_cfg.d_conv=4"),
])
def test_bad_input_fails_naming_the_problem_and_writes_nothing(tmp_path, capsys, edit_config, edit_state, message):
    src = _mamba_ssm_src(tmp_path, edit_config, edit_state)
    assert convert("--from", "mamba_ssm", src, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssm-hf convert: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no temporary folder left behind


def test_non_empty_out_needs_overwrite_and_failures_leave_it_untouched(tmp_path, capsys, monkeypatch):
    src = _mamba_ssm_src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert("--from", "mamba_ssm", src, out) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # a failure midway (while writing) with --overwrite: OUT keeps its old content, no partial folder remains
    import ssm_hf.conversion.folders as folders

    def fail_midway(model_class, config, state_dict, folder, *args, **kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(folders, "save_pretrained_from_state_dict", fail_midway)
    assert convert("--from", "mamba_ssm", src, out, "--overwrite") == 1
    assert "disk full" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.undo()

    assert convert("--from", "mamba_ssm", src, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


class _NotATensor:
    pass


def test_bin_files_load_with_weights_only(tmp_path, capsys):
    config = mamba_ssm_config(ssm_cfg={"d_state": 8})
    sd = mamba_ssm_state_dict(config)
    src = write_checkpoint(tmp_path / "src", config, sd, "bin")
    torch.save({**sd, "payload": _NotATensor()}, src / "pytorch_model.bin")
    assert convert("--from", "mamba_ssm", src, tmp_path / "out") == 1
    assert "cannot be read with torch.load(weights_only=True)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_problems_are_named(tmp_path, capsys):
    src = _mamba_ssm_src(tmp_path, layout="sharded")
    assert convert("--from", "transformers", src, tmp_path / "out") == 1  # a mamba_ssm config has no model_type
    assert "model_type=None" in capsys.readouterr().err
    (src / "model-part-1.safetensors").unlink()
    assert convert("--from", "mamba_ssm", src, tmp_path / "out") == 1
    assert "lists shard(s) that are not in" in capsys.readouterr().err
    assert convert("--from", "mamba_ssm", tmp_path / "nowhere", tmp_path / "out") == 1
    assert "nowhere is not a folder" in capsys.readouterr().err
    assert convert("--from", "s4", src, tmp_path / "out") == 1  # a mamba_ssm config is no state-spaces S4 one
    assert "unknown state-spaces S4 config field(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --from and --to together
        main(["convert", "--from", "mamba_ssm", "--to", "transformers", str(src), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_exports_refuse_what_the_target_cannot_express(tmp_path, capsys):
    moe = ssm_hf.HybridForCausalLM(ssm_hf.preset_config("hybrid-tiny", rms_norm_eps=1e-5))
    moe.save_pretrained(tmp_path / "moe")
    assert convert("--to", "mamba_ssm", tmp_path / "moe", tmp_path / "out") == 1
    assert "layers_mlp_type" in capsys.readouterr().err
    rope = ssm_hf.HybridForCausalLM(ssm_hf.preset_config("hybrid-tiny", attention_rope_dim=4))
    rope.save_pretrained(tmp_path / "rope")
    assert convert("--to", "transformers", tmp_path / "rope", tmp_path / "out") == 1
    assert "attention_rope_dim=4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    mamba = ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-tiny"))
    mamba.save_pretrained(tmp_path / "mamba")
    convert_checkpoint(tmp_path / "mamba", tmp_path / "out", to_format="mamba_ssm")
    with pytest.raises(ConversionError, match="not an ssm-hf causal LM"):
        convert_checkpoint(tmp_path / "out", tmp_path / "again", to_format="mamba_ssm")  # already mamba_ssm
