"""Expert parallelism: routed experts split over the mesh axes the rules give `experts`; dropless.

Inside one `shard_map` over the whole mesh each device holds its tokens' rows (split over the batch /
sequence axes) and E/ep experts. Two dispatches, chosen by how many tokens the expert group holds
(the ep devices that split the experts; `gather_tokens` is the most for the second):

* all-to-all (many tokens, training and long prefill chunks; tokens split over the expert axes):
  each device sorts its (token, choice) rows by expert, sends every row to the device holding its
  expert with one all-to-all, runs its local experts on what it received (grouped SwiGLU on
  expert-sorted rows), and sends the results back with a second all-to-all; the combine happens
  where the token lives.
* gather (few tokens: decode, short prefill chunks; or tokens replicated over the expert axes): every
  device of the group takes all N of the group's tokens (one all-gather when they were split), runs
  its local experts on the rows routed to them, and the partial outputs are summed over the expert
  axes (a reduce-scatter back to the tokens' devices, or a psum when they were replicated). With very
  few tokens (`dense_tokens`: decode) each device runs its local experts densely on all of them.

Dropless both ways: no row is ever dropped, and no buffer is sized for the worst case. The tokens go
through the all-to-all in rounds of `chunk` per device (a scan); inside a round the rows travel in
passes: each device receives at most `capacity` rows per pass (`receive_capacity`: 1.25 x the mean load
by default, whatever the EP width), filled sender by sender in rank order from the rows still waiting
for it, so a device routed R rows is done after ceil(R / capacity) passes; the passes run two per
iteration of a `while_loop` (each with half the capacity: the rows of one travel while the experts run
on the other's, given an asynchronous all-to-all, `sharding.mesh.compiler_options`) until no device has
rows left (`_exchange`). A routing that fits the capacity costs one iteration. On TPU/GPU the rows
travel with `ragged_all_to_all` (only real rows are sent); XLA:CPU has no ragged all-to-all, so there
the same exchange goes through `all_to_all` of fixed-size per-destination blocks. The gather dispatch
has no worst-case buffer either: its local rows, sorted by expert, go through the grouped SwiGLU in
windows of `window` rows (about 1.25 x the mean load N x k / ep), in a `while_loop` of as many windows
as the device's rows fill (`_local_experts`). The local grouped matmul only computes the real rows'
groups (rows past the last group give zeros). Tensor parallelism inside an expert (the `expert_mlp`
columns over axes that do not split the tokens) adds one psum of the combined output.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.moe_dispatch_reference import unpermute_combine
from sharding.rules import AxisRules, ShardingError

CAPACITY_FACTOR = 1.25  # all-to-all passes receive this times the mean rows per device
PIPELINED_PASSES = 2  # passes per loop iteration, each with 1/2 the capacity: one's exchange, the other's experts
# (xs, sizes, w1, w3, w2, row_weights, expected_rows=) -> [M, d] in xs.dtype; expected_rows: how many of
# the M rows a routing at the mean load fills, for a kernel's static cost estimate (moe_dispatch.gmm)
GroupedFFN = Callable[..., jax.Array]


def expert_axes(mesh: jax.sharding.Mesh, rules: AxisRules) -> tuple[str, ...]:
    return tuple(a for a in rules.mesh_axes("experts") if a in mesh.shape and mesh.shape[a] > 1)


def _flat(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w1: jax.Array, w3: jax.Array,
                        w2: jax.Array, ffn: GroupedFFN, mesh: jax.sharding.Mesh, rules: AxisRules,
                        chunk: int = 1024, gather_tokens: int = 1024, window: int | None = None,
                        capacity_factor: float = CAPACITY_FACTOR, check_vma: bool = True,
                        dense: Callable | None = None, dense_tokens: int = 0) -> jax.Array:
    """sum_k w_k FFN_{e_k}(x) with the experts split over the mesh. x [B, T, d]; experts, weights
    [B, T, k]; w1, w3 [E, d, I]; w2 [E, I, d]. Returns [B, T, d] fp32. `chunk`: tokens per device per
    all-to-all round. `capacity_factor`: rows a device receives per all-to-all pass, as a multiple of the
    chunk x k rows each device sends (`receive_capacity`; more rows take more passes, none is dropped;
    0: one pass with the worst case's ep x chunk x k rows). `gather_tokens`: the
    gather dispatch runs when the expert group holds at most this many tokens (always when the tokens
    are replicated over the expert axes); `window`: its rows per window (default `gather_window`).
    `dense` (x [N, d], combine [N, E_loc] fp32, w1, w3, w2) -> [N, d] fp32, e.g. `dense_swiglu`: with
    the group at most `dense_tokens` tokens the gather dispatch runs every local expert on every token
    of the group instead of the windows (decode: E_loc times the rows' FLOPs, but plain dots that read a
    layer's slice of stacked weights in place, where the windows' loop gets it copied).
    check_vma=False for an `ffn` that cannot run on values typed as varying over the mesh axes (the
    Pallas interpreter, moe_impl=pallas on CPU): the shard_map then differentiates by its untyped rule
    (cotangents of inputs psum-ed over the axes they are whole on), which gives the same gradients
    here because every output is complete per device (tests/test_kernel_sharding.py)."""
    B, T, d = x.shape
    E = w1.shape[0]
    ep_axes = expert_axes(mesh, rules)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    if E % ep:
        raise ShardingError(f"{E} routed experts do not divide over mesh axes {ep_axes} of size {ep}")
    token_spec = rules.spec(("batch", "seq", None), x.shape, mesh)
    token_axes = tuple(a for entry in token_spec for a in ((entry,) if isinstance(entry, str) else (entry or ())))
    split_tokens = all(a in token_axes for a in ep_axes)
    if not split_tokens and any(a in token_axes for a in ep_axes):
        raise ShardingError(f"tokens are split over only some of the expert axes {ep_axes} (token axes "
                            f"{token_axes}); split them over all or none")
    tp_axes = tuple(a for a in rules.mesh_axes("expert_mlp")
                    if a in mesh.shape and mesh.shape[a] > 1 and a not in token_axes and a not in ep_axes)
    if w1.shape[2] % math.prod(mesh.shape[a] for a in tp_axes):
        raise ShardingError(f"moe_inter_dim {w1.shape[2]} does not divide over tensor axes {tp_axes}")
    ragged = mesh.devices.flat[0].platform in ("tpu", "gpu", "cuda", "rocm")
    w_in = P(_flat(ep_axes), None, _flat(tp_axes))
    w_out = P(_flat(ep_axes), _flat(tp_axes), None)
    tok = P(*token_spec)
    E_loc = E // ep

    def local(x, experts, weights, w1, w3, w2):
        b, t, _ = x.shape
        n, k = b * t, experts.shape[-1]
        x, experts, weights = x.reshape(n, d), experts.reshape(n, k), weights.reshape(n, k)
        group = n * ep if split_tokens else n  # tokens of the expert group
        rank = jax.lax.axis_index(ep_axes)
        if group <= gather_tokens or not split_tokens:  # gather dispatch
            if split_tokens:  # few tokens: every device of the group takes all of them
                x, experts, weights = (jax.lax.all_gather(a, ep_axes, tiled=True) for a in (x, experts, weights))
            else:  # mark the replicated inputs as per-device values explicitly, so their gradients are
                # summed over the expert axes (the transpose of this cast is a psum)
                x, weights = (jax.lax.pcast(a, ep_axes, to="varying") for a in (x, weights))
            if dense is not None and group <= dense_tokens:  # every local expert on every token
                local = experts - rank * E_loc  # [group, k]: local expert ids, others out of range
                combine = jnp.sum(jnp.where(local[..., None] == jnp.arange(E_loc), weights[..., None], 0.0),
                                  axis=1)  # [group, E_loc] fp32
                out = dense(x, combine, w1, w3, w2)  # [group, d] fp32
            else:  # the rows routed here, sorted by expert, through `ffn` in windows
                rows = window or gather_window(group, k, ep)
                mean = -(-group * k // ep)  # rows a device holds at the mean load
                out = _local_experts(x, experts, weights, w1, w3, w2, ffn, rank * E_loc, E_loc, rows, mean)
            if split_tokens:  # the partial sums of my tokens, summed over the group
                out = jax.lax.psum_scatter(out, ep_axes, tiled=True)
            reduce = tp_axes + (() if split_tokens else ep_axes)
        else:  # all-to-all dispatch in rounds of at most `chunk` tokens, each in passes of `capacity` rows
            nc = min(chunk, n)
            rounds = -(-n // nc)
            pad = rounds * nc - n
            xc = jnp.pad(x, ((0, pad), (0, 0))).reshape(rounds, nc, d)
            ec = jnp.concatenate([experts, jnp.broadcast_to(jnp.arange(k, dtype=experts.dtype), (pad, k))]
                                 ).reshape(rounds, nc, k)
            wc = jnp.pad(weights, ((0, pad), (0, 0))).reshape(rounds, nc, k)  # padded rows weigh 0

            # the factor's rows in PIPELINED_PASSES passes, so that XLA can send one pass's rows while
            # the experts run on another's (0: the worst case in one pass)
            pipelined = PIPELINED_PASSES if capacity_factor > 0 else 1
            capacity = receive_capacity(nc * k, ep, capacity_factor / pipelined)
            # the expert weights typed as varying like the rows, so each device's weight gradient is its
            # own and the cast's transpose sums them over the axes the weights are replicated on (once
            # per layer, outside the rounds: the rounds' residuals are the rows only)
            rows_axes = tuple(sorted(_varying_axes(x) | _varying_axes(weights) | set(ep_axes)))
            ew = tuple(_varying_like(w, w, rows_axes) for w in (w1, w3, w2))

            def one_round(_, args):
                xr, er, wr = args
                y_sorted, order = _exchange(xr, er.reshape(-1), wr.reshape(-1), *ew, ffn, ep_axes,
                                            tuple(mesh.axis_names), ep, E_loc, ragged, capacity, pipelined)
                return None, unpermute_combine(y_sorted, order, nc, k)  # each token's k rows summed in fp32

            _, out = jax.lax.scan(one_round, None, (xc, ec, wc))
            out = out.reshape(rounds * nc, d)[:n]
            reduce = tp_axes
        if reduce:
            out = jax.lax.psum(out, reduce)
        return out.reshape(b, t, d)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                       check_vma=check_vma)
    return fn(x, experts, weights, w1, w3, w2)


WINDOW_SLACK = 1.25  # gather windows hold this times the mean rows per device


def gather_window(tokens: int, k: int, ep: int) -> int:
    """Rows per window of the gather dispatch: 1.25 x the mean rows per device (tokens x k / ep),
    a multiple of 8 (sublanes; XLA:TPU costs a ragged dot of fewer rows as one dense dot per group)."""
    return max(8, -(-math.ceil(tokens * k / ep * WINDOW_SLACK) // 8) * 8)


def _local_experts(x, experts, weights, w1, w3, w2, ffn, first, E_loc: int, window: int, mean: int):
    """This device's experts (ids first .. first + E_loc - 1) on the (token, choice) rows routed to
    them. x [N, d]; experts, weights [N, k]. Returns [N, d] fp32, zero for tokens with no local expert.

    The rows, sorted by local expert (other devices' rows last), go through `ffn` in windows of
    `window` rows, in a `while_loop` that runs ceil(local rows / window) windows: the work follows
    the real routing (one window for a device routed at most `window` rows) and nothing is dropped.
    The trip count differs per device, so nothing collective runs inside. The backward pass is a loop
    of the same windows (`custom_vjp`: each window's experts recomputed, cotangents gathered and
    scattered by the same rows), so no window keeps residuals. XLA's cost analysis counts one window,
    as the all-to-all's passes count one pass, and `ffn` is told to expect the `mean` load's rows in
    it (at most a window)."""
    N, d = x.shape
    k = experts.shape[-1]
    # One type for every input of the loops: each is cast to varying over the axes any of them varies
    # over, so the casts' transposes sum the gradients over the axes an input was replicated on
    axes = tuple(sorted(frozenset().union(*(_varying_axes(a) for a in (x, experts, weights, w1, w3, w2)))))
    x, row_w, w1, w3, w2 = (_varying_like(a, a, axes) for a in (x, weights.reshape(-1), w1, w3, w2))
    # nothing collective may move into the loop, whose trip count differs per device (XLA could sink
    # e.g. the weights' FSDP all-gather towards the matmuls that use them: a deadlock)
    x, row_w, w1, w3, w2 = jax.lax.optimization_barrier((x, row_w, w1, w3, w2))
    local = experts.reshape(-1) - first
    key = jnp.where((local >= 0) & (local < E_loc), local, E_loc)  # [N*k]
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=E_loc + 1)[:E_loc].astype(jnp.int32)  # rows per local expert
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    n_win = -(-N * k // window)  # the most windows any routing needs
    expected = min(window, mean)
    order = jnp.pad(order, (0, n_win * window - N * k))  # padded slots lie past the local rows: zeros

    def rows_of(i, order, starts, ends):  # window i's rows (of the N*k) and each local expert's rows in it
        s = i * window
        rows = jax.lax.dynamic_slice(order, (s,), (window,))
        return rows, jnp.clip(ends - s, 0, window) - jnp.clip(starts - s, 0, window)

    def more(ends):  # the loops' condition: ceil(local rows / window) windows on this device
        n = -(-ends[-1] // window)
        return lambda c: c[0] < n

    def zeros(shape, like):
        return _varying_like(jnp.zeros(shape, jnp.float32), like, axes)

    @jax.custom_vjp
    def run(x, row_w, w1, w3, w2, order, starts, ends):
        def body(carry):
            i, out = carry
            rows, w_sizes = rows_of(i, order, starts, ends)
            y = ffn(x[rows // k], w_sizes, w1, w3, w2, row_w[rows], expected_rows=expected)  # [window, d] x.dtype
            return i + 1, out.at[rows // k].add(y.astype(jnp.float32))  # a token's choices summed in fp32

        return jax.lax.while_loop(more(ends), body, (jnp.int32(0), zeros((N, d), x)))[1]

    def run_fwd(*args):
        return run(*args), args

    def run_bwd(args, g):  # g [N, d] fp32: each window's rows take their tokens' cotangents
        x, row_w, w1, w3, w2, order, starts, ends = args

        def body(carry):
            i, gx, gr, grads = carry
            rows, w_sizes = rows_of(i, order, starts, ends)
            y, vjp = jax.vjp(lambda xr, wr, *ws: ffn(xr, w_sizes, *ws, wr, expected_rows=expected),
                             x[rows // k], row_w[rows], w1, w3, w2)
            dx, dr, *dws = vjp(g[rows // k].astype(y.dtype))
            grads = tuple(a + b.astype(jnp.float32) for a, b in zip(grads, dws))
            return i + 1, gx.at[rows // k].add(dx.astype(jnp.float32)), gr.at[rows].add(dr.astype(jnp.float32)), grads

        init = (jnp.int32(0), zeros(x.shape, x), zeros(row_w.shape, row_w),
                tuple(zeros(w.shape, w) for w in (w1, w3, w2)))
        _, gx, gr, grads = jax.lax.while_loop(more(ends), body, init)
        return (gx.astype(x.dtype), gr.astype(row_w.dtype), *(a.astype(w.dtype) for a, w in zip(grads, (w1, w3, w2))),
                None, None, None)

    run.defvjp(run_fwd, run_bwd)
    return run(x, row_w, w1, w3, w2, order, starts, ends)


ROW_TILE = 512  # the largest row tile of a grouped-matmul kernel (pallas_kernels.moe_dispatch)


def receive_capacity(rows: int, ep: int, factor: float) -> int:
    """Rows a device receives per all-to-all pass when each of the ep devices sends `rows`: `factor` x
    the mean load (`rows`), a multiple of 8, and of ROW_TILE from 8 x ROW_TILE rows on (at most 1/8
    more rows, and the grouped matmul tiles the buffer without a padded copy of its rows or a sliced
    copy of its results); at least 8 and at most the worst case ep x rows (every row of every sender
    routed to this device). factor 0: the worst case (one pass always)."""
    if factor <= 0:
        return ep * rows
    want = math.ceil(rows * factor)
    align = ROW_TILE if want >= 8 * ROW_TILE else 8
    return min(ep * rows, max(8, -(-want // align) * align))


def _exchange(x, flat, row_w, w1, w3, w2, ffn, axes, everywhere, ep: int, E_loc: int, ragged: bool,
              capacity: int, pipelined: int = 1):
    """All-to-all dispatch of this device's rows to their experts' devices and back, in passes of at
    most `capacity` received rows per device. Returns (outputs of the sorted rows [n*k, d] in x.dtype,
    the sort order of the rows).

    Each pass, every receiver fills its `capacity` slots from the rows its senders still hold, sender
    by sender in rank order (a prefix fill: a receiver with r rows left takes min(r, capacity) of
    them), runs its local experts on them and sends the results back. So a receiver routed R rows in
    all is done after ceil(R / capacity) passes. The passes run `pipelined` at a time in a `while_loop`
    until the most any device needs (a mesh-wide max, the same on every device): no row is ever
    dropped, and a routing that fits `pipelined` x `capacity` rows costs one iteration. Inside an
    iteration nothing of pass p + 1's exchange waits for pass p's experts, so XLA can send the one
    while the other computes (an asynchronous all-to-all: `sharding.mesh.compiler_options`). The
    backward pass is a loop of the same passes (`custom_vjp`: the rows' cotangents travel with the rows
    and the expert weights' gradients accumulate in the loop's carry), so no pass keeps residuals: the
    residuals are the inputs. The weights come typed as varying like the rows (the caller casts them
    once). XLA's cost analysis counts one iteration, and each pass's `ffn` is told the rows it receives
    when every device is routed the mean load (n*k: the first pass min(capacity, n*k), the second the
    rest), for the Pallas kernels' static cost estimates. The rows travel in x.dtype both ways (the experts'
    results come in that dtype, `grouped_swiglu`; the caller sums a token's rows in fp32), and so do
    their cotangents."""
    n, d = x.shape
    nk = flat.shape[0]
    order = jnp.argsort(flat, stable=True)  # by expert = by destination, then local expert
    s_exp = flat[order]
    dest = s_exp // E_loc
    send_sizes = jnp.sum(jax.nn.one_hot(dest, ep, dtype=jnp.int32), axis=0)  # [ep] my rows for each device
    offsets = jnp.cumsum(send_sizes) - send_sizes  # where each destination's rows start in the sorted rows
    # the travelling rows are [rows, 1, d]: the shape XLA:TPU's ragged all-to-all works in, so producers
    # write and consumers read that layout directly instead of a relayout copy on each side
    xs, ws, le = x[order // (nk // n), None], row_w[order], (s_exp % E_loc).astype(jnp.int32)  # xs [nk, 1, d]

    def a2a(a):  # block j of a goes to device j; block j of the result came from device j
        return jax.lax.all_to_all(a, axes, 0, 0, tiled=True)

    def send(a, out, in_off, sizes, land, recv):
        """Rows a[in_off[j] : in_off[j] + sizes[j]] to device j, landing at land[j] in its copy of `out`
        (`recv[i]`: the rows device i sends me): `ragged_all_to_all`, or on XLA:CPU, which has none, the
        same through an `all_to_all` of fixed blocks of the most rows a pair can exchange."""
        if ragged:
            return jax.lax.ragged_all_to_all(a, out, in_off, sizes, land, recv, axis_name=axes)
        block = min(a.shape[0], out.shape[0])
        slot = jnp.arange(block)
        rows = jnp.clip(in_off[:, None] + slot, 0, a.shape[0] - 1)  # [ep, block]
        got = a2a(jnp.where((slot < sizes[:, None]).reshape((ep, block) + (1,) * (a.ndim - 1)), a[rows], 0))
        at = jnp.where(slot < recv[:, None], a2a(land)[:, None] + slot, out.shape[0])  # past the end: dropped
        return out.at[at.reshape(-1)].set(got.reshape((ep * block,) + a.shape[1:]), mode="drop")

    def plan(send_sizes, offsets, sent):
        """This pass: which rows each device sends where (the receivers' prefix fill of their capacity)."""
        incoming = a2a(send_sizes - sent)  # [ep] rows each device still has for me
        before = jnp.cumsum(incoming) - incoming
        grant = jnp.clip(capacity - before, 0, incoming)  # rows I take from each device
        land = jnp.cumsum(grant) - grant  # where they go in my receive buffer
        allowed = a2a(grant)  # [ep] rows I may send each device
        start = offsets + sent

        def to_experts(a, fill):  # my rows -> their experts' devices: [capacity, ...]
            buf = _varying_like(jnp.full((capacity,) + a.shape[1:], fill, a.dtype), a, axes)
            return send(a, buf, start, allowed, a2a(land), grant)

        def from_experts(y, acc):  # the received rows' results -> where the rows came from, written into
            # acc [nk, ...]: each row comes back once, in its pass, so the passes' results never overlap
            # and the accumulator needs no add (nor a fresh zero buffer per pass)
            return send(y, acc, land, grant, a2a(start), allowed)

        return to_experts, from_experts, sent + allowed

    def n_passes(send_sizes):  # every device's ceil(rows routed to it / capacity); the most on the mesh
        return jax.lax.pmax(-(-jnp.sum(a2a(send_sizes)) // capacity), everywhere)

    def expected(j):  # rows pass j of an iteration receives when every device is routed the mean load
        return min(capacity, max(0, nk - j * capacity))

    def experts_fn(le, j):  # the grouped SwiGLU on received rows in any order, results in the same order
        o2 = jnp.argsort(le, stable=True)  # by local expert; empty slots (E_loc) last
        sizes = jnp.sum(jax.nn.one_hot(le, E_loc + 1, dtype=jnp.int32), axis=0)[:E_loc]

        back = jnp.argsort(o2)  # the inverse permutation: a gather puts the results back (no scatter)

        def f(xr, wr, w1, w3, w2):  # xr [capacity, 1, d] -> [capacity, 1, d] in xr.dtype
            return ffn(xr[o2, 0], sizes, w1, w3, w2, wr[o2], expected_rows=expected(j))[back, None]
        return f

    def passes(body, carry, total):  # `pipelined` passes per loop iteration, while any device has rows
        def group(carry):
            for j in range(pipelined):
                carry = body(carry, j)
            return carry
        return jax.lax.while_loop(lambda c: c[0] < total, group, carry)

    @jax.custom_vjp
    def moved(xs, ws, w1, w3, w2, le, send_sizes, offsets):
        def body(carry, j):
            p, out, sent = carry
            to_experts, from_experts, sent = plan(send_sizes, offsets, sent)
            y = experts_fn(to_experts(le, E_loc), j)(to_experts(xs, 0), to_experts(ws, 0), w1, w3, w2)
            return p + 1, from_experts(y.astype(xs.dtype), out), sent

        out = _varying_like(jnp.zeros((nk, 1, d), xs.dtype), xs, tuple(sorted(_varying_axes(w1) | set(axes))))
        total = n_passes(send_sizes)
        _, out, _ = passes(body, (jnp.int32(0), out, jnp.zeros_like(send_sizes)), total)
        return out

    def moved_fwd(*args):
        return moved(*args), args

    def moved_bwd(args, g_out):  # the same passes; cotangents ride with the rows
        xs, ws, w1, w3, w2, le, send_sizes, offsets = args

        def body(carry, j):
            p, sent, gx, gw, grads = carry
            to_experts, from_experts, sent = plan(send_sizes, offsets, sent)
            _, vjp = jax.vjp(experts_fn(to_experts(le, E_loc), j), to_experts(xs, 0), to_experts(ws, 0), w1, w3, w2)
            dx, dw, *dws = vjp(to_experts(g_out, 0))
            grads = tuple(g + dg.astype(jnp.float32) for g, dg in zip(grads, dws))
            # each row's cotangents come back once, so they travel in the rows' own dtypes (no sum here)
            return (p + 1, sent, from_experts(dx.astype(xs.dtype), gx), from_experts(dw.astype(ws.dtype), gw),
                    grads)

        zeros = lambda a, dtype=jnp.float32: _varying_like(jnp.zeros(a.shape, dtype), a, axes)  # noqa: E731
        total = n_passes(send_sizes)
        init = (jnp.int32(0), jnp.zeros_like(send_sizes), zeros(xs, xs.dtype), zeros(ws, ws.dtype),
                tuple(zeros(w) for w in (w1, w3, w2)))
        _, _, gx, gw, grads = passes(body, init, total)
        return (gx.astype(xs.dtype), gw.astype(ws.dtype), *(g.astype(w.dtype) for g, w in zip(grads, (w1, w3, w2))),
                None, None, None)

    moved.defvjp(moved_fwd, moved_bwd)
    return moved(xs, ws, w1, w3, w2, le, send_sizes, offsets)[:, 0], order


def _varying_axes(x) -> frozenset:
    """The manual mesh axes x is typed as varying over (`manual_axis_type` in jax 0.10, `vma` before)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _varying_like(buf, like, axes):
    """A fresh (invariant) buffer typed as varying over the axes `like` varies over and `axes`.
    `ragged_all_to_all` types its result as its output buffer, and what a device receives differs
    per device: left invariant, AD would treat the received rows as replicated (a custom VJP such as
    the Pallas gmm's refuses the type mismatch; elsewhere gradients would be summed over devices)."""
    missing = tuple(sorted((_varying_axes(like) | set(axes)) - _varying_axes(buf)))
    return jax.lax.pcast(buf, missing, to="varying") if missing else buf
