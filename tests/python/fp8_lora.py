"""A merged LoRA under FP8 quantization, and PEFT's check of an adapter extracted from it,
for tests/it/fp8_lora.rs.

    python fp8_lora.py make OUT
        OUT/base_fp8, OUT/ft_fp8: a tiny Qwen3 (transformers' own Qwen3Config and
        model class, random init) and its fine-tune W + B·A (rank 4 on q_proj, v_proj and
        up_proj of every layer), each quantized as the DeepSeek-V3 / Qwen3-FP8 releases
        are (F8_E4M3 codes, F32 `*_scale_inv` per 128 x 128 tile; embedding, lm_head and
        norms kept in bf16); OUT/base_deq, OUT/ft_deq: torch's dequantization of each, as
        f32 models transformers loads; OUT/true_delta.safetensors: the B·A merged.
    python fp8_lora.py check OUT ADAPTER
        loads OUT/base_deq with transformers, applies ADAPTER with PEFT
        (PeftModel.from_pretrained) and prints JSON: the adapter's error against the true
        B·A per module and the logits' distance to OUT/ft_deq, with and without it.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
RANK = 4
TARGETS = ("q_proj", "v_proj", "up_proj")


def quantize(w):
    rows, cols = w.shape
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    x = torch.nn.functional.pad(w.float(), (0, gc * BLOCK - cols, 0, gr * BLOCK - rows))
    tiles = x.reshape(gr, BLOCK, gc, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    codes = (tiles / scale[:, None, :, None]).reshape(gr * BLOCK, gc * BLOCK)[:rows, :cols]
    return codes.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize(codes, scale):
    rows, cols = codes.shape
    s = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return codes.to(torch.float32) * s


def is_quantized(name, t):
    return t.dim() == 2 and "embed" not in name and "lm_head" not in name


def write(sd, config, fp8_dir, deq_dir):
    fp8, deq = {}, {}
    for n, t in sd.items():
        if is_quantized(n, t):
            codes, scale = quantize(t)
            fp8[n], fp8[n + "_scale_inv"] = codes, scale
            deq[n] = dequantize(codes, scale)
        else:
            fp8[n] = t.to(torch.bfloat16)
            deq[n] = t.to(torch.bfloat16).float()
    for d in (fp8_dir, deq_dir):
        d.mkdir(parents=True, exist_ok=True)
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [BLOCK, BLOCK]}
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    (deq_dir / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))


def make(out):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(20261202)
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    base = {n: t.detach().to(torch.bfloat16).float() for n, t in model.state_dict().items()}
    ft, delta = dict(base), {}
    for n, w in base.items():
        if w.dim() == 2 and any(f".{t}." in n for t in TARGETS):
            m, k = w.shape
            # A LoRA whose singular values stand well above FP8's rounding noise.
            b = torch.randn(m, RANK) * 0.05
            a = torch.randn(RANK, k) * 0.05
            delta[n] = b @ a
            ft[n] = w + delta[n]
    config = json.loads(cfg.to_json_string())
    config["architectures"] = ["Qwen3ForCausalLM"]
    write(base, config, out / "base_fp8", out / "base_deq")
    write(ft, config, out / "ft_fp8", out / "ft_deq")
    save_file(delta, str(out / "true_delta.safetensors"))


def check(out, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(out / "base_deq", dtype=torch.float32)
        ft = AutoModelForCausalLM.from_pretrained(out / "ft_deq", dtype=torch.float32)
        want = ft(ids).logits
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged = {n: t.float() for n, t in peft.state_dict().items()}
        got = peft(ids).logits
    true = load_file(str(out / "true_delta.safetensors"))
    deq_base = load_file(str(out / "base_deq" / "model.safetensors"))
    errors = {n: float((merged[n] - deq_base[n] - d).norm() / d.norm()) for n, d in true.items()}
    print(json.dumps({
        "module_errors": errors,
        "logits_error_with_adapter": float((got - want).norm() / want.norm()),
        "logits_error_without": float((plain - want).norm() / want.norm()),
        "adapter_dtypes": sorted({str(t.dtype) for t in load_file(str(Path(adapter) / "adapter_model.safetensors")).values()}),
    }))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        check(Path(sys.argv[2]), Path(sys.argv[3]))
