"""Training (docs/architecture.md §8): `loop` (TrainConfig, the step train.py runs and the dry run
compiles, checkpoints, the run), `optim` (Muon + AdamW), `losses`, `data` (packing, tokenizers)."""
