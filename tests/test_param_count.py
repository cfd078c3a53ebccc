"""Parameter counts of the released sizes, built abstractly, against the spec's tensor inventory (architecture.md §9.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import AttentionKind, RouterKind, V4Config
from v4jax.model.layers import Buffer
from v4jax.model.transformer import Transformer


def inventory_count(cfg: V4Config, with_mtp: bool) -> tuple[int, int]:
    """(total, routed-expert) floating parameters, written from the spec's inventory table (architecture.md §9.4)."""
    d, n, V = cfg.dim, cfg.hc_mult, cfg.vocab_size
    H, c, dc, g, dg = cfg.n_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    E, I = cfg.n_routed_experts, cfg.moe_inter_dim
    mix = (2 + n) * n

    def block(kind: AttentionKind, router: RouterKind) -> tuple[int, int]:
        p = 2 * d  # attn_norm, ffn_norm
        p += 2 * (mix * n * d + mix + 3)  # hc_attn_*, hc_ffn_*
        p += dc * d + dc + H * c * dc + c * d + c + (g * dg) * (H * c // g) + d * g * dg + H
        m = cfg.compress_ratio(kind)
        if m:
            kappa = 2 if kind is AttentionKind.CSA else 1
            p += 2 * kappa * c * d + m * kappa * c + c
        if kind is AttentionKind.CSA:
            nI, cI = cfg.index_n_heads, cfg.index_head_dim
            p += nI * cI * dc + nI * d + 2 * (2 * cI) * d + cfg.csa_ratio * 2 * cI + cI
        p += E * d + (E if router is RouterKind.LEARNED else 0)  # gate weight (+ selection bias)
        routed = E * 3 * I * d
        return p + routed + 3 * I * d, routed

    total = 2 * V * d + d + n * n * d + n + 1  # embed, head, norm, hc_head_fn/base/scale
    routed = 0
    for kind, router in zip(cfg.layer_types, cfg.router_types):
        p, r = block(kind, router)
        total, routed = total + p, routed + r
    if with_mtp:
        p, r = block(AttentionKind.SLIDING, RouterKind.LEARNED)
        total += p + 2 * d * d + 3 * d + n * n * d + n + 1
        routed += r
    return total, routed


def active_per_token(cfg: V4Config) -> int:
    """Parameters a token computes with: all but the routed experts, plus k of E of them; the input
    embedding is a lookup, not counted (Flash 13.27B, Pro 48.85B; 13.80B / 49.78B with it)."""
    total, routed = inventory_count(cfg, with_mtp=False)
    return total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts - cfg.vocab_size * cfg.dim


def floating_count(module) -> int:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param)) + jax.tree.leaves(nnx.state(module, Buffer))
    return sum(int(np.prod(x.shape)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_abstract_model_parameter_count_equals_spec_inventory_with_and_without_mtp(name):
    cfg = V4Config.preset(name)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no memory allocated
    with_mtp = floating_count(model)
    assert with_mtp == inventory_count(cfg, with_mtp=True)[0]
    assert with_mtp - floating_count(model.mtp) == inventory_count(cfg, with_mtp=False)[0]


def test_flash_totals_match_published_284b_and_13b_active():
    cfg = V4Config.preset("v4-flash")
    total, routed = inventory_count(cfg, with_mtp=False)
    assert 283.5e9 < total < 285.0e9  # published: 284B
    assert 12.9e9 < active_per_token(cfg) < 13.5e9  # published: 13B activated


def test_pro_totals_match_published_1_6t_and_49b_active():
    cfg = V4Config.preset("v4-pro")
    total, routed = inventory_count(cfg, with_mtp=False)
    assert 1.55e12 < total < 1.60e12  # 1.57T by the inventory, published rounded as 1.6T
    assert 48.5e9 < active_per_token(cfg) < 49.5e9  # published: 49B activated
