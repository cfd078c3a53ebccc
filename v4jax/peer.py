"""The PyTorch peer: transformers' `DeepseekV4ForCausalLM`, set up for number-for-number comparison.

Used by the parity tests and benchmarks (needs the `test` extra: torch==2.13.0, transformers).
- `build_peer(cfg, seed)`: a peer model with *every* parameter and buffer random, including the ones
  transformers initialises to constants (sinks, position biases, mHC base/scale, norm weights,
  selection bias, hash table), so no mechanism is hidden behind a zero or a one.
- `stable_topk()`: makes torch's top-k break ties towards the lowest index, our documented rule
  (the indexer's ReLU scores tie exactly at zero; torch leaves the order unspecified).
- `run_peer(model, ids)`: logits, every layer's streams, and the top-k margins of every selection.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from v4jax.config import V4Config


def _torch():
    import torch
    import transformers  # noqa: F401

    return torch


def build_peer(cfg: V4Config, seed: int):
    torch = _torch()
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_cfg = DeepseekV4Config(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.n_activated_experts]
                        for _ in range(cfg.vocab_size)]
                t.copy_(torch.stack(rows))
            elif t.ndim >= 2 and not name.endswith(("position_bias", ".fn", "hc_fn")):
                fan_in = t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=g) * fan_in ** -0.5)
            elif name.endswith(("position_bias", ".fn", "hc_fn")):
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.ndim == 2 and "position" in name else 0.05))
            elif "norm" in name:
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("scale"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:  # sinks, mHC base, selection bias
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return model


@contextlib.contextmanager
def stable_topk():
    """Within the block, torch.topk / Tensor.topk pick equal values lowest index first."""
    torch = _torch()
    original_fn, original_method = torch.topk, torch.Tensor.topk

    def topk(x, k, dim=-1, largest=True, sorted=True):
        idx = torch.sort(x, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.return_types.topk((x.gather(dim, idx), idx))

    torch.topk = topk
    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.topk, torch.Tensor.topk = original_fn, original_method


class PeerRun(NamedTuple):
    logits: np.ndarray  # [B, S, V]
    hidden_states: np.ndarray  # [L+1, B, S, n_hc, d]
    final_hidden: np.ndarray  # [B, S, d]
    router_margin: float  # smallest gap between the k-th and (k+1)-th biased router score
    indexer_margin: float  # smallest non-zero gap at the indexer's top-k boundary (exact ties excluded)


def run_peer(model, cfg: V4Config, ids: np.ndarray) -> PeerRun:
    torch = _torch()
    hidden, router_scores, index_scores = [], [], []
    hooks = [model.model.layers[0].register_forward_pre_hook(lambda m, a, kw=None: hidden.append(a[0]), with_kwargs=False)]
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(lambda m, a, out: hidden.append(out)))
        gate = layer.mlp.gate
        if hasattr(gate, "e_score_correction_bias"):
            hooks.append(gate.register_forward_hook(
                lambda m, a, out: router_scores.append(m.score_fn(out[0]) + m.e_score_correction_bias)))
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            hooks.append(comp.indexer.scorer.register_forward_hook(lambda m, a, out: index_scores.append(out)))
    try:
        with torch.no_grad(), stable_topk():
            t_ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
            out = model(t_ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    k = cfg.n_activated_experts
    r_margin = min((float((s.topk(k + 1, dim=-1).values[..., k - 1] - s.topk(k + 1, dim=-1).values[..., k]).min())
                    for s in router_scores if s.shape[-1] > k), default=float("inf"))
    i_margin = float("inf")
    S = ids.shape[1]
    visible_count = (np.arange(S) + 1) // cfg.csa_ratio
    for s in index_scores:
        s = s.float().numpy()  # [B, S, N]
        for t in range(S):
            v = visible_count[t]
            if v <= cfg.index_topk:
                continue  # every visible entry is selected: no boundary
            top = -np.sort(-s[:, t, :v], axis=-1)
            gap = top[:, cfg.index_topk - 1] - top[:, cfg.index_topk]
            gap = gap[gap != 0]  # exact ties are resolved identically (stable_topk)
            if gap.size:
                i_margin = min(i_margin, float(gap.min()))
    streams = np.stack([h.float().numpy() for h in hidden])
    return PeerRun(out.logits.float().numpy(), streams, out.hidden_states[-1].float().numpy(), r_margin, i_margin)


def save_peer(model, directory: str) -> None:
    model.save_pretrained(directory, safe_serialization=True)
