#!/usr/bin/env python3
"""Helpers of bench/torch_bin.sh.

  torch_bin.py convert SRC_DIR DST_DIR [--legacy]
      writes SRC_DIR's safetensors tensors as DST_DIR/pytorch_model.bin with torch.save
      (zip format, or the pre-1.6 format with --legacy), plus config.json.
  torch_bin.py compare BASE.bin FT.bin
      the Python route for .bin checkpoints: torch.load(weights_only=True, mmap=True) on
      both files, then per tensor the metrics seed_compare.py computes with torch.
"""
import json
import os
import shutil
import sys
import time

import torch


def convert(src, dst, legacy):
    from safetensors.torch import load_file

    os.makedirs(dst, exist_ok=True)
    sd = {}
    index = os.path.join(src, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for f in files:
        sd.update(load_file(os.path.join(src, f)))
    torch.save(sd, os.path.join(dst, "pytorch_model.bin"), _use_new_zipfile_serialization=not legacy)
    if os.path.exists(os.path.join(src, "config.json")):
        shutil.copy(os.path.join(src, "config.json"), dst)


def compare(base_path, ft_path, threshold=1e-6):
    t0 = time.perf_counter()
    base = torch.load(base_path, weights_only=True, mmap=True)
    ft = torch.load(ft_path, weights_only=True, mmap=True)
    out = {}
    for name, a in base.items():
        b = ft.get(name)
        if b is None or b.shape != a.shape:
            continue
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        d = b32 - a32
        bn = torch.linalg.norm(a32).item()
        dn = torch.linalg.norm(d).item()
        out[name] = {
            "mean_abs_diff": d.abs().mean().item() if d.numel() else 0.0,
            "max_abs_diff": d.abs().max().item() if d.numel() else 0.0,
            "l2_diff": dn,
            "relative_diff": dn / bn if bn > 0 else None,
            "changed_ratio": (d.abs() > threshold).float().mean().item() if d.numel() else 0.0,
        }
    print(f"{len(out)} tensors in {time.perf_counter() - t0:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3], "--legacy" in sys.argv)
    else:
        compare(sys.argv[2], sys.argv[3])
