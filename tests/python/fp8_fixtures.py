"""FP8 checkpoints in the DeepSeek-V3 / Qwen3-FP8 layout, for tests/it/quantized.rs.

    python fp8_fixtures.py OUT

writes
- OUT/base/model.safetensors: a small model in bf16 (2-D weights with ragged 128-tiles);
- OUT/fp8/: the same model quantized the way those releases are: each 2-D weight as
  F8_E4M3 codes (torch.float8_e4m3fn) with `<name>_scale_inv` [ceil(r/128), ceil(c/128)]
  F32 tile scales, 1-D tensors kept in bf16, a `quantization_config` of quant_method fp8
  with weight_block_size [128, 128], sharded so that some scales sit in another shard
  than their weight (through model.safetensors.index.json);
- OUT/reference/model.safetensors: torch's dequantization of OUT/fp8, f32 codes times
  the tile scale expanded over its tile (the reference the values must equal exactly);
- OUT/unknown/: OUT/fp8 with quant_method `some_future_method` (not dequantized);
- OUT/noisy/: OUT/base plus N(0, 1e-3) noise, bf16 (another model than the one OUT/fp8
  quantizes: its error in quantization steps is far above 0.5);
- OUT/fp8_e8m0/ and OUT/reference_e8m0/: the same with power-of-two scales stored as
  F8_E8M0 (`scale_fmt: ue8m0`, torch.float8_e8m0fnu), as DeepSeek-V3.1 ships them.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.manual_seed(20261202)
BLOCK = 128
SHAPES = {
    "model.embed_tokens.weight": (300, 64),
    "model.layers.0.self_attn.q_proj.weight": (200, 300),
    "model.layers.0.self_attn.k_proj.weight": (64, 300),
    "model.layers.0.mlp.down_proj.weight": (300, 129),
    "model.layers.0.input_layernorm.weight": (300,),
    "model.norm.weight": (300,),
}


def quantize(w, e8m0=False):
    rows, cols = w.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    scale = torch.zeros(gr, gc, dtype=torch.float32)
    codes = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            tile = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            if e8m0:
                s = torch.exp2(torch.ceil(torch.log2(s)))
            scale[i, j] = s
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (tile / s).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize(codes, scale):
    rows, cols = codes.shape
    s = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return codes.to(torch.float32) * s


def main():
    out = Path(sys.argv[1])
    for d in ["base", "fp8", "reference"]:
        (out / d).mkdir(parents=True, exist_ok=True)
    base = {n: (torch.randn(*s) * 0.05).to(torch.bfloat16) for n, s in SHAPES.items()}
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    save_file(base, str(out / "base/model.safetensors"), metadata={"format": "pt"})
    (out / "base/config.json").write_text(json.dumps(config))
    shards = [{}, {}]
    reference = {}
    for i, (n, w) in enumerate(base.items()):
        if w.dim() == 2:
            codes, scale = quantize(w)
            shards[0][n] = codes
            # Every other scale in the other shard than its weight.
            shards[i % 2][n + "_scale_inv"] = scale
            reference[n] = dequantize(codes, scale)
        else:
            shards[1][n] = w
            reference[n] = w.float()
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        save_file(shard, str(out / "fp8" / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
    (out / "fp8/model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    qc = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
          "activation_scheme": "dynamic", "fmt": "e4m3"}
    (out / "fp8/config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    save_file(reference, str(out / "reference/model.safetensors"), metadata={"format": "pt"})
    (out / "reference/config.json").write_text(json.dumps(config))
    for d in ["fp8_e8m0", "reference_e8m0"]:
        (out / d).mkdir(parents=True, exist_ok=True)
    e8, ref8 = {}, {}
    for n, w in base.items():
        if w.dim() == 2:
            codes, scale = quantize(w, e8m0=True)
            e8[n] = codes
            e8[n + "_scale_inv"] = scale.to(torch.float8_e8m0fnu)
            ref8[n] = dequantize(codes, e8[n + "_scale_inv"].to(torch.float32))
        else:
            e8[n] = w
            ref8[n] = w.float()
    save_file(e8, str(out / "fp8_e8m0/model.safetensors"), metadata={"format": "pt"})
    qc8 = {**qc, "scale_fmt": "ue8m0"}
    (out / "fp8_e8m0/config.json").write_text(json.dumps({**config, "quantization_config": qc8}))
    save_file(ref8, str(out / "reference_e8m0/model.safetensors"), metadata={"format": "pt"})
    (out / "reference_e8m0/config.json").write_text(json.dumps(config))
    (out / "noisy").mkdir(parents=True, exist_ok=True)
    noisy = {n: (w.float() + torch.randn(w.shape) * 1e-3).to(torch.bfloat16) for n, w in base.items()}
    save_file(noisy, str(out / "noisy/model.safetensors"), metadata={"format": "pt"})
    (out / "noisy/config.json").write_text(json.dumps(config))
    shutil.copytree(out / "fp8", out / "unknown", dirs_exist_ok=True)
    qc_unknown = {**qc, "quant_method": "some_future_method"}
    (out / "unknown/config.json").write_text(json.dumps({**config, "quantization_config": qc_unknown}))


if __name__ == "__main__":
    main()
