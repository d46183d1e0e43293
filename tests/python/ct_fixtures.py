"""compressed-tensors checkpoints made by compressed-tensors itself, for tests/it/compressed.rs.

    python ct_fixtures.py OUT

For every case of CASES, writes
- OUT/<case>/: a small Qwen3-named model of nn.Linear layers (bf16 or f32), quantized by
  compressed-tensors' `apply_quantization_config`, its scales and zero points computed by
  its own `calculate_qparams` (`generate_gparam` for NVFP4's global scale) from the
  weights' min/max (round to nearest, no calibration), compressed by
  `ModelCompressor.compress_model` and saved with `update_config`'s quantization_config;
  `lm_head` is in the `ignore` list and stays as stored;
- OUT/<case>_ref/model.safetensors: the same model after compressed-tensors'
  `ModelCompressor.decompress_model`, every tensor as f32 (the reference values).
OUT/base/: the unquantized bf16 model, for the quantization-error comparison;
OUT/other/: another bf16 model of the same shapes (another seed), whose error against the
quants of OUT/base in quantization steps is far above 0.5.

    python ct_fixtures.py OUT --lora

writes OUT/lora-base/ and OUT/lora-ft/: LORA_SHAPES in bf16, W and W + B·A (a merged LoRA
of rank LORA_RANK on every module), each quantized by compressed-tensors as pack-quantized
INT4, symmetric, group 32 (round to nearest, as above): the fine-tune's delta is rank
LORA_RANK plus the two sides' INT4 rounding.

    python ct_fixtures.py OUT --bad

writes only bad inputs, each beside its reference OUT/<case>_ref/ (decompressed before the
damage):
- OUT/bad-pack/: pack-quantized INT4 (group 32) of BAD_SHAPES with `ignore` ["lm_head",
  "re:.*v_proj$"] (compressed-tensors writes the names it matched), then damaged: q_proj's
  `weight_packed` one int32 column short, k_proj's `weight_scale` one group short,
  down_proj's `weight_scale` missing, up_proj's `weight_shape` [192, 2^62]; and the
  ignored v_proj (bf16, as compressed-tensors leaves it) given a `weight_scale` of 2.0,
  which must not be applied;
- OUT/bad-int/: int-quantized INT8 per channel with q_proj's `weight_scale` missing (its
  I8 codes must not pass for its values).
"""

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant
from safetensors.torch import save_file

# (out, in): ragged sizes where the formats allow them (blocks; packed int4 rows whose
# bit stream ends inside an int32; an odd row count for the packed zero points).
SHAPES = {
    "model.layers.0.self_attn.q_proj": (96, 128),
    "model.layers.0.self_attn.k_proj": (37, 128),
    "model.layers.0.mlp.down_proj": (64, 192),
    "lm_head": (50, 64),
}
# The block cases use shapes that do not divide into blocks (padded by the reference).
BLOCK_SHAPES = {
    "model.layers.0.self_attn.q_proj": (100, 130),
    "model.layers.0.self_attn.k_proj": (37, 64),
    "model.layers.0.mlp.down_proj": (64, 192),
    "lm_head": (50, 64),
}

# name: (format, weights args, model dtype)
def cases():
    c = {}
    for fmt, typ, bits in [("int-quantized", "int", 8), ("float-quantized", "float", 8),
                           ("naive-quantized", "int", 8), ("pack-quantized", "int", 4),
                           ("pack-quantized", "int", 8)]:
        for strat in ["tensor", "channel", "group", "block"]:
            for sym in [True, False]:
                if typ == "float" and not sym:
                    continue  # compressed-tensors quantizes FP8 symmetrically only
                args = {"num_bits": bits, "type": typ, "symmetric": sym, "strategy": strat}
                if strat == "group":
                    args["group_size"] = 32
                if strat == "block":
                    args["block_structure"] = [32, 64]
                name = f"{fmt}-{bits}-{strat}-{'sym' if sym else 'asym'}"
                c[name] = (fmt, args, torch.bfloat16)
    # Scales in f32 (an f32 model) and in f16.
    c["int-quantized-8-channel-sym-f32"] = ("int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, torch.float32)
    c["pack-quantized-4-group-asym-f16"] = ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}, torch.float16)
    c["nvfp4-pack-quantized"] = ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16, "scale_dtype": torch.float8_e4m3fn}, torch.bfloat16)
    c["nvfp4-pack-quantized-f32"] = ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16, "scale_dtype": torch.float8_e4m3fn}, torch.float32)
    return c


def build(shapes, dtype):
    # A module tree with the checkpoint's own names.
    root = torch.nn.Module()
    for n, (o, i) in shapes.items():
        parent = root
        parts = n.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        lin = torch.nn.Linear(i, o, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_((torch.randn(o, i) * 0.05 + 0.01).to(dtype))
        parent.add_module(parts[-1], lin)
    root.model.register_parameter("norm_weight", torch.nn.Parameter(torch.randn(64).to(dtype)))
    return root


def min_max(w, args):
    s = getattr(args.strategy, "value", args.strategy)
    if s == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if s == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if s in ("group", "tensor_group"):
        g = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        return g.amin(-1), g.amax(-1)
    bh, bw = args.block_structure
    p = maybe_pad_tensor_for_block_quant(w, tuple(args.block_structure))
    b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2)
    return b.amin((-1, -2)), b.amax((-1, -2))


def quantize(root, fmt, wargs, ignore=("lm_head",)):
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs), format=fmt)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format=fmt)
    apply_quantization_config(root, qc)
    for name, m in root.named_modules():
        if not hasattr(m, "quantization_scheme") or m.quantization_scheme is None:
            continue
        args = m.quantization_scheme.weights
        w = m.weight.data
        global_scale = None
        if hasattr(m, "weight_global_scale"):
            global_scale = generate_gparam(w.amin(), w.amax())
            m.weight_global_scale.data.copy_(global_scale)
        lo, hi = min_max(w, args)
        scale, zp = calculate_qparams(lo, hi, args, global_scale=global_scale)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(root, quantization_format=fmt)
    comp.compress_model(root)
    return comp


def save(out, case, root, comp, config, tamper=lambda sd: sd):
    """OUT/<case>/ (the compressed model, its state dict through `tamper`) and OUT/<case>_ref/."""
    d = out / case
    d.mkdir(parents=True, exist_ok=True)
    sd = tamper({k: v.contiguous() for k, v in root.state_dict().items()})
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    comp.update_config(str(d))
    comp.decompress_model(root)
    r = out / f"{case}_ref"
    r.mkdir(parents=True, exist_ok=True)
    ref = {k: v.float().contiguous() for k, v in root.state_dict().items()
           if not k.endswith(("_scale", "_zero_point", "_global_scale", "_shape"))}
    save_file(ref, str(r / "model.safetensors"), metadata={"format": "pt"})
    (r / "config.json").write_text(json.dumps(config))


# The bad inputs: more modules, so that every bad one has good ones beside it.
BAD_SHAPES = {
    "model.layers.0.self_attn.q_proj": (96, 128),
    "model.layers.0.self_attn.k_proj": (37, 128),
    "model.layers.0.self_attn.v_proj": (37, 128),
    "model.layers.0.self_attn.o_proj": (128, 96),
    "model.layers.0.mlp.up_proj": (192, 64),
    "model.layers.0.mlp.down_proj": (64, 192),
    "lm_head": (50, 64),
}


def bad(out, config):
    torch.manual_seed(20261202)
    root = build(BAD_SHAPES, torch.bfloat16)
    wargs = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    comp = quantize(root, "pack-quantized", wargs, ignore=["lm_head", "re:.*v_proj$"])

    def broken(sd):
        a, m = "model.layers.0.self_attn.", "model.layers.0.mlp."
        # Truncated codes: the last int32 word of every row gone ([96, 15] for [96, 16]).
        sd[a + "q_proj.weight_packed"] = sd[a + "q_proj.weight_packed"][:, :-1].contiguous()
        # A scale grid short of one group ([37, 3] for [37, 4]).
        sd[a + "k_proj.weight_scale"] = sd[a + "k_proj.weight_scale"][:, :-1].contiguous()
        del sd[m + "down_proj.weight_scale"]
        # A shape that no packed tensor can hold.
        sd[m + "up_proj.weight_shape"] = torch.tensor([192, 2**62], dtype=sd[m + "up_proj.weight_shape"].dtype)
        # The ignored module, bf16 as stored, given a scale: it must stay as stored.
        assert sd[a + "v_proj.weight"].dtype == torch.bfloat16
        sd[a + "v_proj.weight_scale"] = torch.full((37, 4), 2.0, dtype=torch.bfloat16)
        return sd

    save(out, "bad-pack", root, comp, config, broken)
    torch.manual_seed(20261202)
    root = build(SHAPES, torch.bfloat16)
    wargs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    comp = quantize(root, "int-quantized", wargs)

    def no_scale(sd):
        del sd["model.layers.0.self_attn.q_proj.weight_scale"]
        return sd

    save(out, "bad-int", root, comp, config, no_scale)


LORA_SHAPES = {
    "model.layers.0.self_attn.q_proj": (256, 256),
    "model.layers.0.self_attn.v_proj": (128, 256),
    "model.layers.0.mlp.down_proj": (256, 384),
}
LORA_RANK = 4


def lora(out, config):
    torch.manual_seed(20261203)
    root = build(LORA_SHAPES, torch.bfloat16)
    deltas = {}
    for n, (o, i) in LORA_SHAPES.items():
        # B·A with singular values ~ 1 (entries ~ 1/sqrt(o·i)·r): well above the INT4
        # rounding's floor (~ step/sqrt(12)·(sqrt(o) + sqrt(i)) ≈ 0.2), each column of
        # B a different size so the spectrum has no ties.
        b = torch.randn(o, LORA_RANK) * torch.linspace(1.5, 3.0, LORA_RANK) / o ** 0.5
        a = torch.randn(LORA_RANK, i) / i ** 0.5
        deltas[n] = b @ a
    ft = build(LORA_SHAPES, torch.bfloat16)
    ft.load_state_dict(root.state_dict())
    with torch.no_grad():
        for n, m in ft.named_modules():
            if n in deltas:
                m.weight.copy_((m.weight.float() + deltas[n]).to(torch.bfloat16))
    wargs = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    for name, model in [("lora-base", root), ("lora-ft", ft)]:
        comp = quantize(model, "pack-quantized", wargs)
        save(out, name, model, comp, config)


def main():
    out = Path(sys.argv[1])
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    if sys.argv[2:] == ["--bad"]:
        bad(out, config)
        return
    if sys.argv[2:] == ["--lora"]:
        lora(out, config)
        return
    for case, (fmt, wargs, dtype) in cases().items():
        torch.manual_seed(20261202)
        shapes = BLOCK_SHAPES if wargs["strategy"] == "block" else SHAPES
        root = build(shapes, dtype)
        if case == "int-quantized-8-channel-sym-f32":
            torch.manual_seed(20261202)
            base = build(shapes, torch.bfloat16)
            (out / "base").mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(out / "base/model.safetensors"), metadata={"format": "pt"})
            (out / "base/config.json").write_text(json.dumps(config))
            torch.manual_seed(20261203)
            other = build(shapes, torch.bfloat16)
            (out / "other").mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(out / "other/model.safetensors"), metadata={"format": "pt"})
            (out / "other/config.json").write_text(json.dumps(config))
        comp = quantize(root, fmt, wargs)
        save(out, case, root, comp, config)


if __name__ == "__main__":
    main()
