#!/usr/bin/env bash
# Builds the seed corpus of the compare_files fuzz target from valid files: shards of the
# demo pair, alone and joined with their index ("|||" separates the files of one input).
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
cargo run --quiet --release --manifest-path ../Cargo.toml -- demo -o "$tmp/demo" --quiet > /dev/null
corpus=corpus/compare_files
mkdir -p "$corpus"
i=0
for f in "$tmp"/demo/pair/base/*.safetensors "$tmp"/demo/pair/finetuned/*.safetensors; do
  cp "$f" "$corpus/shard$i"
  { cat "$f"; printf '|||'; cat "$tmp/demo/pair/base/model.safetensors.index.json"; } > "$corpus/indexed$i"
  i=$((i + 1))
done
cp "$tmp/demo/reports/lora_adapter/adapter_model.safetensors" "$corpus/adapter"
rm -rf "$tmp"
echo "$(ls "$corpus" | wc -l) seeds in fuzz/$corpus"
# Small seeds mutate faster than the 100 KB shards: one F32 tensor, and the same with an
# index that names it.
small='{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
{ printf '\x36\0\0\0\0\0\0\0%s' "$small"; printf '\0\0\x80\x3f\0\0\0\x40'; } > "$corpus/small"
{ cat "$corpus/small"; printf '|||{"weight_map":{"w":"model-00001-of-00002.safetensors"}}'; } > "$corpus/small-indexed"
echo "plus 2 small seeds"

# torch_file: the committed PyTorch fixtures (zip and legacy formats, shards, training
# state, the malicious pickle), all written by torch.
corpus=corpus/torch_file
mkdir -p "$corpus"
i=0
for f in $(find ../tests/fixtures/torch -name '*.bin' -o -name '*.pt' -o -name '*.pth' | sort); do
  cp "$f" "$corpus/torch$i"
  i=$((i + 1))
done
echo "$i seeds in fuzz/$corpus"

# gguf_file: small GGUF files written by gguf-py (tests/python/gguf_fixtures.py, with the
# test suite's Python: $WEIGHTDIFF_PYTHON, else target/test-venv): the hostile-test base,
# tiny llama / gemma3 / qwen3moe conversions, and one tensor of every decodable type.
corpus=corpus/gguf_file
mkdir -p "$corpus"
tmp=$(mktemp -d)
python=${WEIGHTDIFF_PYTHON:-../target/test-venv/bin/python}
for command in hostile models quants; do
  "$python" ../tests/python/gguf_fixtures.py "$command" "$tmp"
done
for f in "$tmp"/*.gguf; do
  cp "$f" "$corpus/$(basename "$f" .gguf)"
done
rm -rf "$tmp"
echo "$(ls "$corpus" | wc -l) seeds in fuzz/$corpus"
