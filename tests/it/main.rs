//! Integration tests, built as one binary (faster linking). Modules:
//! - `common`: fixture writers (raw safetensors bytes, synthetic pairs) and the CLI helper
//! - `kernels`: fast kernel vs reference on every dtype, awkward lengths, NaN/Inf
//! - `metrics`: hand-computable tensors against the SPEC §3 definitions
//! - `mutations`: proptest over mutated checkpoints: clean errors or unchanged results
//! - `layouts`: one file, shards with index, shards without index give the same numbers
//! - `pairing`: only-in, shape and dtype mismatches, prefix alignment
//! - `bad_inputs`: the catalogue of malformed files, each a clean error naming the file
//! - `outputs`: every report exists, parses, and matches the builder's ground truth
//! - `lora`: rank detection, verdicts, extraction fidelity, PEFT keys, determinism
//! - `reliability`: files changing mid-run, resume after SIGTERM/SIGKILL, locks, full disk, symlinks
//! - `shards`: `compare --shard I/N` + `merge` equal a single run; bad part sets refused
//! - `trajectory`: several fine-tuned models against one base
//! - `html`: report.html's content, `weightdiff report`, headless Chromium
//! - `conventions`: help examples, completions, --json, -v/-vv, NO_COLOR
//! - `honest`: issue 16: unrelated pairs, resize rules, stale outputs, closed pipes, messages
//! - `torch_bin`: pytorch_model.bin (zip, legacy, sharded) against torch-written fixtures
//! - `hub`: hub ids through a cache tree, offline refusal, downloads from a loopback hub
//! - `interop`: Python's safetensors/numpy recompute our metrics independently
//! - `peft`: the architecture matrix: adapters of tiny transformers models loaded by real PEFT
//! - `fp8_lora`: a LoRA merged under FP8: detected, extracted as bf16, loaded by PEFT
//! - `mxfp4`: gpt-oss MXFP4 experts against transformers' own dequantization; bad blocks and scales
//! - `gguf`: GGUF reader, dequantizers and name map against files gguf-py writes; hostile GGUFs

mod architecture;
mod bad_inputs;
mod common;
mod compressed;
mod conventions;
mod fp8_lora;
mod gguf;
mod honest;
mod html;
mod hub;
mod interop;
mod kernels;
mod layouts;
mod lora;
mod metrics;
mod mutations;
mod mxfp4;
mod outputs;
mod pairing;
mod peft;
mod quantized;
mod reliability;
mod shards;
mod torch_bin;
mod trajectory;
