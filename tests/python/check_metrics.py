#!/usr/bin/env python3
"""Recomputes weightdiff's per-tensor metrics with numpy from the safetensors files.

usage: check_metrics.py BASE_DIR FT_DIR weight_differences.json
Exits non-zero, naming the tensor and metric, on any disagreement.
"""
import glob
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def load_dir(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def main():
    base, ft = load_dir(sys.argv[1]), load_dir(sys.argv[2])
    report = json.load(open(sys.argv[3]))
    diffs = report["all_differences"]
    thr = report["threshold"]
    assert set(diffs) == set(base) & set(ft), "compared set differs from the common names"
    bad = 0
    for name, m in diffs.items():
        a = base[name].astype(np.float64)
        b = ft[name].astype(np.float64)
        d = b - a
        expect = {
            "mean_abs_diff": np.abs(d).mean(),
            "max_abs_diff": np.abs(d).max(),
            "rms_diff": np.sqrt((d * d).mean()),
            "l2_diff": np.linalg.norm(d),
            "base_l2": np.linalg.norm(a),
            "finetuned_l2": np.linalg.norm(b),
            "relative_diff": np.linalg.norm(d) / np.linalg.norm(a),
            "cosine_similarity": (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)),
            "changed_ratio": (np.abs(d).astype(np.float32) > thr).mean(),
        }
        for k, v in expect.items():
            got = m[k]
            if not np.isclose(got, v, rtol=1e-6, atol=1e-12):
                print(f"{name}: {k}: weightdiff {got!r} vs numpy {v!r}")
                bad += 1
        if m["identical"] != bool(base[name].tobytes() == ft[name].tobytes()):
            print(f"{name}: identical flag wrong")
            bad += 1
        if list(m["shape"]) != list(base[name].shape):
            print(f"{name}: shape wrong")
            bad += 1
    modified = sorted(n for n, m in diffs.items() if m["changed_ratio"] > 0)
    if sorted(report["modified_layers"]) != modified:
        print("modified_layers does not match changed_ratio > 0")
        bad += 1
    print(f"checked {len(diffs)} tensors: {bad} disagreements")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
