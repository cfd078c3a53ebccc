"""Checkpoint I/O (docs/architecture.md §9): `tensorfile` (safetensors), `checkpoint` (HF layout and
names), `official` + `quant` (DeepSeek's FP8/FP4 release), `restore` (`load_model`: any form, straight
into sharded arrays), `convert` (`python -m v4jax.io.convert`), `safe_io` (staged, verified writes)."""
