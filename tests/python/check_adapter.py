#!/usr/bin/env python3
"""Rebuilds the fine-tuned weights from base + a weightdiff PEFT adapter with numpy.

usage: check_adapter.py BASE_DIR FT_DIR ADAPTER_DIR lora_metadata.json
For every LoRA module: W_base + (alpha/r) * B @ A (embeddings: + (A^T @ B^T) * alpha/r),
with r and alpha from adapter_config.json (rank_pattern / alpha_pattern honoured, keys
matched as regexes the way PEFT does); the relative error against W_ft - W_base must equal
the residual_stored that lora_metadata.json reports. modules_to_save tensors must equal
the fine-tuned ones. Exits non-zero on any disagreement.
"""
import glob
import json
import os
import re
import sys

import numpy as np
from safetensors.numpy import load_file


def load_dir(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def pattern_value(patterns, module, default):
    for pat, v in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return v
    return default


def main():
    base, ft = load_dir(sys.argv[1]), load_dir(sys.argv[2])
    adapter = load_file(os.path.join(sys.argv[3], "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(sys.argv[3], "adapter_config.json")))
    meta = json.load(open(sys.argv[4]))
    prefix = "base_model.model."
    bad = 0
    seen = 0
    for key in sorted(adapter):
        assert key.startswith(prefix), key
        if key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"):
            emb = key.endswith(".lora_embedding_A")
            module = key[len(prefix):].rsplit(".lora_", 1)[0]
            r = pattern_value(cfg["rank_pattern"], module, cfg["r"])
            alpha = pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
            if emb:
                a = adapter[f"{prefix}{module}.lora_embedding_A"].astype(np.float64)
                b = adapter[f"{prefix}{module}.lora_embedding_B"].astype(np.float64)
                delta = (a.T @ b.T) * (alpha / r)
            else:
                a = adapter[f"{prefix}{module}.lora_A.weight"].astype(np.float64)
                b = adapter[f"{prefix}{module}.lora_B.weight"].astype(np.float64)
                delta = (b @ a) * (alpha / r)
            assert a.shape[0] == r, (module, a.shape, r)
            name = module + ".weight"
            w0 = base[name].astype(np.float64)
            w1 = ft[name].astype(np.float64)
            true = w1 - w0
            err = np.linalg.norm(w0 + delta - w1) / np.linalg.norm(true)
            reported = meta["modules"][module]["residual_stored"]
            seen += 1
            if not np.isclose(err, reported, rtol=1e-5, atol=1e-9):
                print(f"{module}: numpy error {err} vs reported {reported}")
                bad += 1
        elif ".lora_" not in key:
            name = key[len(prefix):]
            if not np.array_equal(adapter[key], ft[name]):
                print(f"{key}: modules_to_save tensor differs from the fine-tuned one")
                bad += 1
            seen += 1
    print(f"checked {seen} adapter entries: {bad} disagreements")
    sys.exit(1 if bad or seen == 0 else 0)


if __name__ == "__main__":
    main()
