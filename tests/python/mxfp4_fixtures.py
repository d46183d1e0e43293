"""gpt-oss MXFP4 checkpoints dequantized by transformers itself, for tests/it/mxfp4.rs.

    python mxfp4_fixtures.py OUT

writes
- OUT/mxfp4/: a tiny gpt-oss checkpoint in the layout the gpt-oss releases ship: a
  config.json from transformers' own `GptOssConfig` with a `quantization_config` of
  quant_method mxfp4 (and the releases' `modules_to_not_convert`), the expert weights
  `model.layers.N.mlp.experts.{gate_up_proj,down_proj}` as `*_blocks` U8 [E, R, G, 16]
  and `*_scales` U8 [E, R, G], every other tensor in bf16, in two shards with an index
  (some scales in the other shard than their blocks). The codes are random bytes (all 16
  nibbles), the exponents random in 110..135, and expert 0 of layer 0 holds the edge
  codes: a group of every nibble under exponent 0 (2^-127: subnormal results) and one
  under 254 (2^127: results up to ±inf), and a group of the finite nibbles under 254;
- OUT/reference/: the checkpoint transformers loads from OUT/mxfp4 when it dequantizes
  (`from_pretrained` with `Mxfp4Config(dequantize=True)`, on CPU: its `Mxfp4Dequantize`
  calls `convert_moe_packed_tensors`, dtype bf16), its state dict saved under the names
  the bf16 gpt-oss checkpoints use (`…experts.gate_up_proj` [E, H, 2I], `…down_proj`
  [E, I, H], bf16), and no quantization_config; the script checks that those tensors
  equal `convert_moe_packed_tensors` called directly on the stored blocks and scales;
- OUT/perturbed/: OUT/mxfp4 with one nibble of `model.layers.1.mlp.experts.down_proj`
  changed; OUT/perturbed.json: that tensor's name, and its max |difference| from the
  reference and the number of elements that differ, both by transformers' decoding;
- OUT/broken/: OUT/mxfp4 with three bad expert weights: layer 0's `down_proj_scales`
  missing, layer 1's `gate_up_proj_blocks` of the wrong shape [E, R, G, 8], and an
  exponent byte 255 in layer 1's `down_proj_scales`; OUT/broken.json: which is which.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

E, H, I, LAYERS = 4, 64, 96, 2  # I != H: the transposes are not squares
PROJ = {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}  # stored rows, logical rows
# gpt-oss-20b's quantization_config.
QC = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def config():
    return GptOssConfig(
        num_hidden_layers=LAYERS,
        num_local_experts=E,
        num_experts_per_tok=2,
        hidden_size=H,
        intermediate_size=I,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        dtype="bfloat16",
        architectures=["GptOssForCausalLM"],
    )


def packed(rows, k, gen):
    g = k // 32
    blocks = torch.randint(0, 256, (E, rows, g, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 136, (E, rows, g), dtype=torch.uint8, generator=gen)
    return blocks, scales


def write(d, tensors, cfg):
    """Two shards with an index; every other scale in the other shard than its blocks."""
    d.mkdir(parents=True, exist_ok=True)
    shards = [{}, {}]
    at = {}
    for i, n in enumerate(sorted(t for t in tensors if not t.endswith("_scales"))):
        shards[i % 2][n] = tensors[n]
        at[n] = i % 2
    for i, n in enumerate(sorted(t for t in tensors if t.endswith("_scales"))):
        blocks = at.get(n[: -len("_scales")] + "_blocks", 0)
        shards[(blocks + i) % 2][n] = tensors[n]
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for f, s in zip(files, shards):
        save_file({k: v.contiguous() for k, v in s.items()}, str(d / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in s})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(20261202)
    gen = torch.Generator().manual_seed(20261202)
    cfg = config()
    # The other tensors: a real GptOssForCausalLM's, in bf16.
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors = {}
    for k, v in sd.items():
        proj = k.rsplit(".", 1)[-1]
        if ".mlp.experts." in k and proj in PROJ:
            continue
        tensors[k] = (torch.randn(v.shape) * 0.05).to(torch.bfloat16) if v.is_floating_point() else v
    for layer in range(LAYERS):
        for proj, (rows, k) in PROJ.items():
            b, s = packed(rows, k, gen)
            p = f"model.layers.{layer}.mlp.experts.{proj}"
            tensors[p + "_blocks"], tensors[p + "_scales"] = b, s
    # Edge codes in expert 0 of layer 0's gate_up_proj.
    p = "model.layers.0.mlp.experts.gate_up_proj"
    every = torch.tensor([(15 - n) << 4 | n for n in range(16)], dtype=torch.uint8)
    tensors[p + "_blocks"][0, 0, 0] = every
    tensors[p + "_scales"][0, 0, 0] = 0
    tensors[p + "_blocks"][0, 1, 0] = every
    tensors[p + "_scales"][0, 1, 0] = 254
    small = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11], dtype=torch.uint8)  # |v| <= 1.5
    tensors[p + "_blocks"][0, 2, 1] = small.repeat(2) << 4 | small.flip(0).repeat(2)
    tensors[p + "_scales"][0, 2, 1] = 254
    tensors[p + "_scales"][1, 3, 1] = 0
    qcfg = cfg.to_dict()
    qcfg["quantization_config"] = QC
    write(out / "mxfp4", tensors, qcfg)

    # transformers' own load of it, dequantized.
    loaded = GptOssForCausalLM.from_pretrained(
        str(out / "mxfp4"), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16, device_map="cpu"
    )
    ref = {k: v.detach().contiguous() for k, v in loaded.state_dict().items()}
    for layer in range(LAYERS):
        for proj, (rows, k) in PROJ.items():
            p = f"model.layers.{layer}.mlp.experts.{proj}"
            direct = convert_moe_packed_tensors(tensors[p + "_blocks"], tensors[p + "_scales"])
            r = ref[p]
            assert r.dtype == torch.bfloat16 and r.shape == (E, k, rows), (p, r.dtype, r.shape)
            assert torch.equal(r.view(torch.int16), direct.view(torch.int16)), p
    for k, v in tensors.items():
        if not k.endswith(("_blocks", "_scales")):
            assert torch.equal(ref[k], v), k
    assert set(ref) == {k for k in tensors if not k.endswith(("_blocks", "_scales"))} | {
        f"model.layers.{l}.mlp.experts.{p}" for l in range(LAYERS) for p in PROJ
    }, sorted(ref)
    edge = ref["model.layers.0.mlp.experts.gate_up_proj"][0]
    assert edge[:32, 1].isinf().sum() == 16 and (edge[:32, 0] != 0).sum() == 28, "edge codes"
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file(ref, str(out / "reference/model.safetensors"), metadata={"format": "pt"})
    (out / "reference/config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # One nibble changed.
    p = "model.layers.1.mlp.experts.down_proj"
    pert = dict(tensors)
    b = pert[p + "_blocks"].clone()
    b[2, 5, 1, 7] ^= 0x30  # the high nibble of byte 7: element 15 of group 1, row 5
    pert[p + "_blocks"] = b
    write(out / "perturbed", pert, qcfg)
    d = convert_moe_packed_tensors(b, pert[p + "_scales"]).float() - ref[p].float()
    (out / "perturbed.json").write_text(json.dumps({
        "tensor": p,
        "max_abs_diff": d.abs().max().item(),
        "changed": int((d != 0).sum().item()),
    }))

    # Bad expert weights.
    bad = dict(tensors)
    del bad["model.layers.0.mlp.experts.down_proj_scales"]
    bad["model.layers.1.mlp.experts.gate_up_proj_blocks"] = bad["model.layers.1.mlp.experts.gate_up_proj_blocks"][..., :8].contiguous()
    s = bad["model.layers.1.mlp.experts.down_proj_scales"].clone()
    s[3, 10, 2] = 255
    bad["model.layers.1.mlp.experts.down_proj_scales"] = s
    write(out / "broken", bad, qcfg)
    index = json.loads((out / "broken/model.safetensors.index.json").read_text())["weight_map"]
    (out / "broken.json").write_text(json.dumps({
        "model.layers.0.mlp.experts.down_proj": {
            "file": index["model.layers.0.mlp.experts.down_proj_blocks"],
            "tensor": "model.layers.0.mlp.experts.down_proj_scales",
            "says": "missing",
        },
        "model.layers.1.mlp.experts.gate_up_proj": {
            "file": index["model.layers.1.mlp.experts.gate_up_proj_blocks"],
            "tensor": "model.layers.1.mlp.experts.gate_up_proj_blocks",
            "says": "[4, 192, 2, 8]",
        },
        "model.layers.1.mlp.experts.down_proj": {
            "file": index["model.layers.1.mlp.experts.down_proj_scales"],
            "tensor": "model.layers.1.mlp.experts.down_proj_scales",
            "says": "[3, 10, 2]",
        },
    }, indent=2))


if __name__ == "__main__":
    main()
