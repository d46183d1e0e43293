"""GGUF fixtures for tests/it/gguf.rs, written by gguf-py (llama.cpp's `gguf` package).

    python gguf_fixtures.py quants  OUT   # OUT/quants.gguf + OUT/expected.gguf
    python gguf_fixtures.py models  OUT   # OUT/{llama,gemma3,qwen3moe,llama_q8,llama_q4_0,llama_q5_0}.gguf + OUT/*.safetensors
    python gguf_fixtures.py hostile OUT   # OUT/base.gguf + OUT/offsets.json

quants: for every type, blocks written as raw bytes (`raw_dtype`) into quants.gguf, and
gguf-py's own dequantization of the same bytes (`gguf.quants.dequantize`) as F32 tensors
of the same names in expected.gguf. Types gguf-py can quantize get a tensor quantized from
random normal data (`<TYPE>.quantized`); every type gets random bytes (`<TYPE>.random`),
with its f16 scale fields replaced by random finite f16 values so that no product is
NaN/Inf by accident (F32/F16/BF16 keep all their random bits: NaNs and infinities too).
gguf-py has no Q8_K dequantizer: its expected values are computed here from the layout
(`d: f32` times the int8 quants), in numpy float32.

models: tiny models named the way llama.cpp's converter names them, each with its
Hugging Face original (safetensors): a llama whose Q/K rows are permuted as
convert_hf_to_gguf.py's `LlamaModel.permute` does; a gemma3 whose norms are stored + 1;
a qwen3moe whose experts are stacked into 3-D tensors.

hostile: a small valid file with alignment 64, and the byte offsets of its header fields,
which the Rust tests patch into hostile files.
"""

import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import save_file

RNG = np.random.default_rng(20261202)

# Byte offsets of the f16 scale fields in one block of each type.
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.TQ1_0: [52], Q.TQ2_0: [64],
    Q.MXFP4: [], Q.NVFP4: [],
}
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
               Q.TQ1_0, Q.TQ2_0, Q.MXFP4]
RANDOM_ONLY = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K, Q.IQ4_NL, Q.IQ4_XS, Q.NVFP4]
ROWS = 8  # rows per tensor


def blocks_per_row(qtype):
    """4 blocks a row; 1024 elements for the one-element "blocks" of F32/F16/BF16, so that
    their random bits include NaNs, infinities and subnormals."""
    return 1024 if GGML_QUANT_SIZES[qtype][0] == 1 else 4


def finite_f16(n):
    """n random finite f16 values, as raw uint16: normal values of both signs, some
    subnormals and zeros."""
    v = (RNG.standard_normal(n) * 10.0 ** RNG.integers(-6, 3, n)).astype(np.float16)
    v[~np.isfinite(v)] = np.float16(1.0)
    return v.view(np.uint16)


def random_blocks(qtype, rows):
    block, size = GGML_QUANT_SIZES[qtype]
    n = blocks_per_row(qtype)
    raw = RNG.integers(0, 256, (rows, n, size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        raw[:, :, at:at + 2] = finite_f16(rows * n).view(np.uint8).reshape(rows, n, 2)
    if qtype == Q.Q8_K:
        d = (RNG.standard_normal(rows * n) * 0.01).astype(np.float32)
        raw[:, :, 0:4] = d.view(np.uint8).reshape(rows, n, 4)
    return raw.reshape(rows, n * size)


def reference_dequantize(raw, qtype):
    if qtype == Q.Q8_K:
        blocks = raw.reshape(-1, 292)
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(raw.shape[0], -1)
    if qtype == Q.BF16:
        # gguf.quants.dequantize has no BF16 entry point of its own; its BF16 class does.
        return gguf.quants.BF16.dequantize(raw)
    return gguf.quants.dequantize(raw, qtype)


def writer(path, arch):
    return gguf.GGUFWriter(str(path), arch)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quants(out):
    np.seterr(over="ignore")  # MXFP4's largest random exponents overflow to inf, as in ggml
    qw, ew = writer(out / "quants.gguf", "test"), writer(out / "expected.gguf", "test")
    for qtype in QUANTIZABLE + RANDOM_ONLY:
        block, _ = GGML_QUANT_SIZES[qtype]
        cases = {"random": random_blocks(qtype, ROWS)}
        if qtype in QUANTIZABLE:
            data = RNG.standard_normal((ROWS, blocks_per_row(qtype) * block)).astype(np.float32)
            data[0, :block] = 0.0  # an all-zero block
            q = gguf.quants.quantize(data, qtype)
            cases["quantized"] = np.ascontiguousarray(q).view(np.uint8).reshape(ROWS, -1)
        for case, raw in cases.items():
            name = f"{qtype.name}.{case}"
            qw.add_tensor(name, raw, raw_dtype=qtype)
            expected = np.asarray(reference_dequantize(raw, qtype), dtype=np.float32)
            assert expected.shape == (ROWS, blocks_per_row(qtype) * block), (name, expected.shape)
            ew.add_tensor(name, np.ascontiguousarray(expected))
    finish(qw)
    finish(ew)


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, re-derived: within each head, rows
    (2, head_dim/2) are transposed to (head_dim/2, 2)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def llama(out):
    n_head, n_kv, hd, hidden, ff, vocab, layers = 4, 2, 4, 16, 24, 32, 2
    hf, w = {}, writer(out / "llama.gguf", "llama")
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)

    def put(hf_name, gguf_name, value, gguf_value=None):
        hf[hf_name] = value
        w.add_tensor(gguf_name, np.ascontiguousarray(value if gguf_value is None else gguf_value))

    put("model.embed_tokens.weight", "token_embd.weight", f32(vocab, hidden))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = f32(n_head * hd, hidden), f32(n_kv * hd, hidden)
        put(p + "self_attn.q_proj.weight", b + "attn_q.weight", q, permute(q, n_head))
        put(p + "self_attn.k_proj.weight", b + "attn_k.weight", k, permute(k, n_kv))
        put(p + "self_attn.v_proj.weight", b + "attn_v.weight", f32(n_kv * hd, hidden))
        put(p + "self_attn.o_proj.weight", b + "attn_output.weight", f32(hidden, n_head * hd))
        put(p + "input_layernorm.weight", b + "attn_norm.weight", f32(hidden))
        put(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", f32(hidden))
        put(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", f32(ff, hidden))
        put(p + "mlp.up_proj.weight", b + "ffn_up.weight", f32(ff, hidden))
        put(p + "mlp.down_proj.weight", b + "ffn_down.weight", f32(hidden, ff))
    put("model.norm.weight", "output_norm.weight", f32(hidden))
    put("lm_head.weight", "output.weight", f32(vocab, hidden))
    w.add_tensor("rope_freqs.weight", np.ones(hd // 2, dtype=np.float32))
    finish(w)
    save_file(hf, str(out / "llama.safetensors"))


def gemma3(out):
    hidden, vocab, gguf_vocab = 8, 20, 16
    hf, w = {}, writer(out / "gemma3.gguf", "gemma3")
    w.add_head_count(2)
    w.add_head_count_kv(1)
    # Multiples of 2^-10 in [-1, 1]: x + 1 and its inverse are exact in f32.
    norm = lambda: (RNG.integers(-1024, 1025, hidden) / 1024).astype(np.float32)  # noqa: E731
    emb = f32(vocab, hidden)
    hf["model.embed_tokens.weight"] = emb
    w.add_tensor("token_embd.weight", np.ascontiguousarray(emb[:gguf_vocab]))
    for hf_name, gguf_name in [
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
        ("model.layers.0.pre_feedforward_layernorm.weight", "blk.0.ffn_norm.weight"),
        ("model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight"),
        ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ]:
        v = norm()
        hf[hf_name] = v
        w.add_tensor(gguf_name, v + np.float32(1))
    q = f32(8, hidden)
    hf["model.layers.0.self_attn.q_proj.weight"] = q
    w.add_tensor("blk.0.attn_q.weight", q)  # gemma3 is not permuted
    finish(w)
    save_file(hf, str(out / "gemma3.safetensors"))


def qwen3moe(out):
    n_exp, hidden, ff = 4, 8, 6
    hf, w = {}, writer(out / "qwen3moe.gguf", "qwen3moe")
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_expert_count(n_exp)
    for proj, shape in [("gate_proj", (ff, hidden)), ("up_proj", (ff, hidden)),
                        ("down_proj", (hidden, ff))]:
        experts = [f32(*shape) for _ in range(n_exp)]
        for e, x in enumerate(experts):
            hf[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = x
        stem = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
        w.add_tensor(f"blk.0.{stem[proj]}.weight", np.stack(experts, axis=0))
    router = f32(n_exp, hidden)
    hf["model.layers.0.mlp.gate.weight"] = router
    w.add_tensor("blk.0.ffn_gate_inp.weight", router)
    q = f32(8, hidden)
    hf["model.layers.0.self_attn.q_proj.weight"] = q
    w.add_tensor("blk.0.attn_q.weight", q)  # qwen3moe is not permuted
    finish(w)
    save_file(hf, str(out / "qwen3moe.safetensors"))


def unpermute(w, n_head):
    """The inverse of `permute`: GGUF row order back to Hugging Face order."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_q8(out, qtype=Q.Q8_0, stem="llama_q8"):
    """A llama converted the way llama.cpp does (Q/K permuted) and quantized to `qtype`
    (Q8_0; also Q4_0 and Q5_0 as `llama_q4_0`, `llama_q5_0`) by gguf-py, with its HF
    original `STEM.safetensors` and gguf-py's own dequantization in HF order
    (`STEM_dequant.safetensors`): the GGUF read by weightdiff must equal the latter
    exactly, and differ from the former by the quantization's rounding."""
    n_head, n_kv, hd, hidden, ff, vocab = 4, 2, 8, 32, 64, 64
    hf, deq, w = {}, {}, writer(out / f"{stem}.gguf", "llama")
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_block_count(1)
    w.add_embedding_length(hidden)

    def put(hf_name, gguf_name, value, heads=None):
        hf[hf_name] = value
        stored = value if heads is None else permute(value, heads)
        if value.ndim == 2:
            q = gguf.quants.quantize(np.ascontiguousarray(stored), qtype)
            w.add_tensor(gguf_name, q, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).reshape(value.shape)
            deq[hf_name] = back if heads is None else unpermute(back, heads)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(stored))
            deq[hf_name] = value

    put("model.embed_tokens.weight", "token_embd.weight", f32(vocab, hidden))
    p, b = "model.layers.0.", "blk.0."
    put(p + "self_attn.q_proj.weight", b + "attn_q.weight", f32(n_head * hd, hidden), n_head)
    put(p + "self_attn.k_proj.weight", b + "attn_k.weight", f32(n_kv * hd, hidden), n_kv)
    put(p + "self_attn.v_proj.weight", b + "attn_v.weight", f32(n_kv * hd, hidden))
    put(p + "self_attn.o_proj.weight", b + "attn_output.weight", f32(hidden, n_head * hd))
    put(p + "input_layernorm.weight", b + "attn_norm.weight", f32(hidden))
    put(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", f32(hidden))
    put(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", f32(ff, hidden))
    put(p + "mlp.up_proj.weight", b + "ffn_up.weight", f32(ff, hidden))
    put(p + "mlp.down_proj.weight", b + "ffn_down.weight", f32(hidden, ff))
    put("model.norm.weight", "output_norm.weight", f32(hidden))
    put("lm_head.weight", "output.weight", f32(vocab, hidden))
    finish(w)
    save_file(hf, str(out / f"{stem}.safetensors"))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in deq.items()},
              str(out / f"{stem}_dequant.safetensors"))


def names(out):
    """gguf-py's own HF → GGUF name map for the HF names our map produces, per arch."""
    result = {}
    for arch_name in ["llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2",
                      "gemma3", "phi3"]:
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
        tmap = gguf.get_tensor_name_map(arch, 2)
        hf_names = json.loads((out / f"names_{arch_name}.json").read_text())
        result[arch_name] = {n: tmap.get_name(n, try_suffixes=(".weight", ".bias"))
                             for n in hf_names}
    (out / "names_gguf_py.json").write_text(json.dumps(result))


def hostile(out):
    w = writer(out / "base.gguf", "llama")
    w.add_custom_alignment(64)
    w.add_string("general.name", "hostile base")
    for name, shape in [("a.weight", (2, 32)), ("b.weight", (4, 32)), ("c.weight", (32,))]:
        w.add_tensor(name, f32(*shape))
    finish(w)
    reader = gguf.GGUFReader(str(out / "base.gguf"))
    first_key = next(f for f in reader.fields.values() if not f.name.startswith("GGUF."))
    align = reader.fields["general.alignment"]
    info = {
        "tensor_count": 8,
        "kv_count": 16,
        "first_key_len": first_key.offset,
        "alignment_value": int(align.offset + 8 + len("general.alignment") + 4),
        "data_offset": int(reader.data_offset),
        "tensors": [],
    }
    for t in reader.tensors:
        at = int(t.field.offset) + 8 + len(t.name)
        n_dims = len(t.shape)
        info["tensors"].append({
            "name": t.name,
            "n_dims": at,
            "dims": at + 4,
            "type": at + 4 + 8 * n_dims,
            "offset": at + 4 + 8 * n_dims + 4,
            "data_offset": int(t.data_offset),
            "nbytes": int(t.n_bytes),
        })
    (out / "offsets.json").write_text(json.dumps(info))


def main():
    command, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if command == "quants":
        quants(out)
    elif command == "models":
        llama(out)
        gemma3(out)
        qwen3moe(out)
        llama_q8(out)
        llama_q8(out, Q.Q4_0, "llama_q4_0")
        llama_q8(out, Q.Q5_0, "llama_q5_0")
    elif command == "names":
        names(out)
    elif command == "hostile":
        hostile(out)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
