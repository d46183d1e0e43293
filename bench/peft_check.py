#!/usr/bin/env python3
"""Loads a weightdiff adapter with PEFT and checks base + adapter ~= fine-tuned.

usage: peft_check.py BASE_DIR FT_DIR ADAPTER_DIR
Needs torch, transformers, peft, safetensors (../shared/bench/setup.sh makes such a venv).
Loads BASE with transformers, PeftModel.from_pretrained(base, ADAPTER_DIR), merges the
adapter, and reports per changed tensor ||merged - ft|| / ||ft - base||; also runs one
forward pass through the adapted model and the fine-tuned model and compares logits.
Not part of `cargo test` (torch is a 4 GB install); its output goes in the issue notes.
"""
import glob
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_dir(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def main():
    base_dir, ft_dir, adapter_dir = sys.argv[1:4]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ft_model = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.arange(0, 64).unsqueeze(0) % base.config.vocab_size
    with torch.no_grad():
        out_peft = peft(ids).logits
        out_ft = ft_model(ids).logits
    merged = peft.merge_and_unload().state_dict()
    b = load_dir(base_dir)
    f = load_dir(ft_dir)
    worst = 0.0
    changed = 0
    for name, w1 in f.items():
        w0 = b[name].float()
        w1 = w1.float()
        d = (w1 - w0).norm().item()
        if d == 0:
            continue
        changed += 1
        err = (merged[name].float() - w1).norm().item() / d
        worst = max(worst, err)
    logit_rel = ((out_peft - out_ft).norm() / out_ft.norm()).item()
    print(f"PEFT loaded {adapter_dir}: {changed} changed tensors, worst ||merged - ft|| / ||ft - base|| = {worst:.4e}")
    print(f"logits of base+adapter vs fine-tuned: relative difference {logit_rel:.3e}")


if __name__ == "__main__":
    main()
