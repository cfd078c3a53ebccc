"""Generation on the model's own forward: `generate` (prefill / decode wrappers, sampling, the
Generator, MTP speculation) and `cache_size` (the KV-cache size calculator)."""
