"""v4jax: the DeepSeek-V4 architecture in JAX/Flax NNX."""

from v4jax.config import AttentionKind, ConfigError, RouterKind, RunOptions, V4Config
from v4jax.model.transformer import ModelOutput, Transformer

__all__ = ["AttentionKind", "ConfigError", "RouterKind", "RunOptions", "V4Config", "ModelOutput", "Transformer"]
