"""Writes the FP8 copy of a Hugging Face bf16 model directory in the DeepSeek-V3 /
Qwen3-FP8 layout, shard by shard, for bench/fp8.sh:

    python fp8.py SRC DST

Every 2-D weight except the embedding and lm_head becomes F8_E4M3 codes
(torch.float8_e4m3fn) with `<name>_scale_inv` F32 [ceil(r/128), ceil(c/128)] tile scales
(amax / 448 per 128 x 128 tile, as those releases are made); everything else is copied.
config.json gains `quantization_config` {quant_method: fp8, weight_block_size: [128, 128]}.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
FP8_MAX = 448.0


def quantize(w):
    rows, cols = w.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    pr, pc = gr * BLOCK - rows, gc * BLOCK - cols
    x = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    tiles = x.reshape(gr, BLOCK, gc, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    codes = (tiles / scale[:, None, :, None]).reshape(gr * BLOCK, gc * BLOCK)
    return codes[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantized(name, t):
    return t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(str(src / shard)).items():
            if quantized(name, t):
                out[name], out[name + "_scale_inv"] = quantize(t)
                weight_map[name + "_scale_inv"] = shard
            else:
                out[name] = t
            weight_map[name] = shard
        save_file(out, str(dst / shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for side in ["generation_config.json"]:
        if (src / side).exists():
            shutil.copy(src / side, dst / side)


if __name__ == "__main__":
    main()
