"""The DeepSeek-V4 model (docs/architecture.md §2-§7), one module per concept in data-flow order:
`layers` (parameters with logical axes, Linear, RMSNorm, Embed) -> `rope` -> `mhc` (hyper-connections)
-> `compressor` -> `indexer` -> `attention` (SWA / CSA / HCA) -> `moe` -> `transformer` (Block, Stage,
MTPBlock, Transformer). `cache` is the state the attention layers own; `kernels` is the one place the
Pallas kernel or its pure-JAX twin is chosen. One forward for training, prefill and decode."""
