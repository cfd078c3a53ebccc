"""benchmarks.hlo_costs: FLOPs and HBM bytes of a compiled program by source line (no TPU needed)."""

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.hlo_costs import async_overlaps, breakdown, by_function, collective_bytes
from v4jax.model.layers import Linear


def test_breakdown_counts_loops_by_trip_count_and_names_the_source_line():
    lin = Linear(64, 64, ("embed", "mlp"), param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    def f(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(lin(c)), None), x, None, length=7)[0]

    rows = by_function(breakdown(jax.jit(f).lower(jnp.ones((16, 64))).compile().as_text()))
    assert rows[0].source == "v4jax/model/layers.py Linear.__call__"
    assert rows[0].flops == 7 * 2 * 16 * 64 * 64  # the loop body's matmul, seven times
    assert rows[0].bytes >= 7 * 4 * (16 * 64 + 64 * 64)  # its operands read from memory each time


def test_breakdown_costs_convolutions_and_kernel_estimates():
    hlo = """HloModule m

FileNames
1 "/repo/v4jax/model/moe.py"

FunctionNames
1 "Experts.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=42 end_line=42 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%fused (p0: bf16[8,32], p1: bf16[32,16]) -> bf16[8,16] {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %conv = bf16[8,16]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf, metadata={op_name="x/dot_general" stack_frame_id=1}
}

ENTRY %main (a: bf16[8,32], b: bf16[32,16]) -> bf16[8,16] {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %f = bf16[8,16]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
  ROOT %k = bf16[8,16]{1,0} custom-call(%f), custom_call_target="tpu_custom_call", backend_config={"cost_estimate": {"flops": "1000"}}, metadata={op_name="y/pallas_call" stack_frame_id=1}
}
"""
    (row,) = breakdown(hlo)
    assert row.source == "v4jax/model/moe.py:42 (Experts.__call__)"
    assert row.flops == 2 * 8 * 16 * 32 + 1000  # the fused convolution, then the kernel's own estimate
    assert row.bytes == 2 * (8 * 32 + 32 * 16 + 8 * 16) + 2 * (8 * 16 + 8 * 16)  # fusion in + out, kernel in + out


def test_breakdown_counts_in_place_updates_and_slices_by_what_they_touch():
    hlo = """HloModule m

%upd (p0: f32[1000,64], p1: f32[1,64], p2: s32[]) -> f32[1000,64] {
  %p0 = f32[1000,64]{1,0} parameter(0)
  %p1 = f32[1,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = f32[1000,64]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)
}

%read (q0: f32[1000,64], q1: s32[]) -> f32[1,64] {
  %q0 = f32[1000,64]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %s = f32[1,64]{1,0} dynamic-slice(%q0, %q1, %z), dynamic_slice_sizes={1,64}
  ROOT %e = f32[1,64]{1,0} exponential(%s)
}

ENTRY %main (a: f32[1000,64], b: f32[1,64], i: s32[]) -> f32[1000,64] {
  %a = f32[1000,64]{1,0} parameter(0)
  %b = f32[1,64]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %u = f32[1000,64]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%upd, metadata={op_name="w/dynamic_update_slice"}
  ROOT %r = f32[1,64]{1,0} fusion(%u, %i), kind=kLoop, calls=%read, metadata={op_name="w/exp"}
}
"""
    costs = {c.source: c.bytes for c in breakdown(hlo)}
    assert costs["dynamic_update_slice"] == 4 * 64 * 2 + 4  # the update in, the updated row out, the index
    assert costs["exp"] == 4 * 64 * 2 + 4  # the row read, the result written, the index


def test_a_stacked_weight_sliced_inside_a_nested_fusion_costs_the_slice():
    # XLA:TPU fuses a scan's per-layer (and a decode row's per-expert) slice of stacked weights into the
    # matmul that reads it, one fusion inside another: only the slice is read
    hlo = """HloModule m

%slice (p0: bf16[8,1000,64], p1: s32[], p2: s32[]) -> bf16[64] {
  %p0 = bf16[8,1000,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %s = bf16[1,1,64]{2,1,0} dynamic-slice(%p0, %p1, %p2, %z), dynamic_slice_sizes={1,1,64}
  ROOT %b = bf16[64]{0} bitcast(%s)
}

%outer (q0: bf16[8,1000,64], q1: s32[], q2: bf16[64]) -> bf16[64] {
  %q0 = bf16[8,1000,64]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = bf16[64]{0} parameter(2)
  %w = bf16[64]{0} fusion(%q0, %q1, %q1), kind=kLoop, calls=%slice
  ROOT %m = bf16[64]{0} multiply(%w, %q2)
}

%whole (r0: bf16[8,1000,64]) -> bf16[8,1000,64] {
  %r0 = bf16[8,1000,64]{2,1,0} parameter(0)
  ROOT %n = bf16[8,1000,64]{2,1,0} negate(%r0)
}

ENTRY %main (a: bf16[8,1000,64], i: s32[], x: bf16[64]) -> (bf16[64], bf16[8,1000,64]) {
  %a = bf16[8,1000,64]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = bf16[64]{0} parameter(2)
  %f = bf16[64]{0} fusion(%a, %i, %x), kind=kOutput, calls=%outer, metadata={op_name="w/sliced"}
  %g = bf16[8,1000,64]{2,1,0} fusion(%a), kind=kLoop, calls=%whole, metadata={op_name="w/whole"}
  ROOT %t = (bf16[64]{0}, bf16[8,1000,64]{2,1,0}) tuple(%f, %g)
}
"""
    costs = {c.source: c.bytes for c in breakdown(hlo)}
    assert costs["sliced"] == 64 * 2 + 4 + 64 * 2 + 64 * 2  # the slice, the index, x, the result
    assert costs["whole"] == 2 * 8 * 1000 * 64 * 2  # read whole, written whole
    # the stack's layout changed inside the fusion (XLA:TPU does this where the matmul wants another
    # tiling) before the slice: computed only where sliced, so still the slice
    relayout = hlo.replace("""  %w = bf16[64]{0} fusion(%q0, %q1, %q1), kind=kLoop, calls=%slice""",
                           """  %l = bf16[8,1000,64]{2,1,0} fusion(%q0), kind=kLoop, calls=%whole
  %w = bf16[64]{0} fusion(%l, %q1, %q1), kind=kLoop, calls=%slice""")
    assert {c.source: c.bytes for c in breakdown(relayout)}["sliced"] == costs["sliced"]


def test_a_batched_matmul_written_as_a_dilated_convolution_counts_one_tap():
    # XLA:TPU writes a batched matmul [t] x ([b, f] @ [f, o]) as a convolution over a spatial dim t whose
    # window of t taps meets one input through a t-fold lhs dilation
    hlo = """HloModule m

ENTRY %main (a: f32[4,6,8], b: f32[4,6,16]) -> f32[4,8,16] {
  %a = f32[4,6,8]{2,1,0} parameter(0)
  %b = f32[4,6,16]{2,1,0} parameter(1)
  ROOT %c = f32[4,8,16]{2,1,0} convolution(%a, %b), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0fb_0io->0bf, metadata={op_name="z/dot_general"}
}
"""
    (row,) = breakdown(hlo)
    assert row.flops == 2 * (4 * 8 * 16) * 6


def test_a_padded_window_counts_only_the_taps_that_meet_the_input():
    # one input position padded by 3 on each side, a window of 4: each of the 4 outputs meets it once
    hlo = """HloModule m

ENTRY %main (a: bf16[39,64,1], b: bf16[32,4,64]) -> f32[39,32,4] {
  %a = bf16[39,64,1]{2,1,0} parameter(0)
  %b = bf16[32,4,64]{2,1,0} parameter(1)
  ROOT %c = f32[39,32,4]{2,1,0} convolution(%a, %b), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_o0i->bf0, metadata={op_name="z/dot_general"}
}
"""
    (row,) = breakdown(hlo)
    assert row.flops == 2 * (39 * 32) * 64 * 4  # 4 (output, tap) pairs, not 4 outputs x 4 taps


def test_elementwise_work_and_reductions_count_as_vector_flops_by_trip_count():
    """A matrix-vector product written as multiply + reduce (what XLA:TPU makes of a decode step's
    one-row matmuls) costs its 2 x elements as vector FLOPs, each loop trip counted."""
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%mv (p0: f32[64], p1: f32[64,32]) -> f32[32] {
  %p0 = f32[64]{0} parameter(0)
  %p1 = f32[64,32]{1,0} parameter(1)
  %bc = f32[64,32]{1,0} broadcast(%p0), dimensions={0}
  %m = f32[64,32]{1,0} multiply(%bc, %p1), metadata={op_name="jit(f)/mul"}
  %z = f32[] constant(0)
  ROOT %r = f32[32]{0} reduce(%m, %z), dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[64], f32[64,32])) -> (s32[], f32[64], f32[64,32]) {
  %t = (s32[], f32[64], f32[64,32]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[64]{0} get-tuple-element(%t), index=1
  %w = f32[64,32]{1,0} get-tuple-element(%t), index=2
  %y = f32[32]{0} fusion(%x, %w), kind=kLoop, calls=%mv, metadata={op_name="jit(f)/mv"}
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %o = (s32[], f32[64], f32[64,32]) tuple(%j, %x, %w)
}

%cond (t: (s32[], f32[64], f32[64,32])) -> pred[] {
  %t = (s32[], f32[64], f32[64,32]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[64], w: f32[64,32]) -> (s32[], f32[64], f32[64,32]) {
  %x = f32[64]{0} parameter(0)
  %w = f32[64,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64], f32[64,32]) tuple(%zero, %x, %w)
  ROOT %loop = (s32[], f32[64], f32[64,32]) while(%init), condition=%cond, body=%body
}
"""
    rows = breakdown(hlo)
    assert sum(c.flops for c in rows) == 0  # no dot anywhere
    vector = {c.source: c.vector_flops for c in rows}
    assert vector["mul"] == 5 * 64 * 32 * 2  # per trip: the multiply's results and the reduce's inputs
    assert sum(vector.values()) == vector["mul"] + 5 + 5  # the counter's add and the condition's compare


def test_async_overlaps_lists_the_matmuls_between_a_collective_start_and_its_done():
    hlo = """HloModule m, is_scheduled=true

ENTRY %main (a: bf16[8,1,128], w: bf16[128,128]) -> bf16[8,1,128] {
  %a = bf16[8,1,128]{2,1,0} parameter(0)
  %w = bf16[128,128]{1,0} parameter(1)
  %z = bf16[8,1,128]{2,1,0} broadcast(bf16[] constant(0)), dimensions={}
  %s = s32[2]{0} constant({4, 4})
  %ragged-all-to-all-start = ((bf16[8,1,128]{2,1,0}, bf16[8,1,128]{2,1,0}), bf16[8,1,128]{2,1,0}) ragged-all-to-all-start(%a, %z, %s, %s, %s, %s), replica_groups={{0,1}}
  %x = bf16[8,128]{1,0} bitcast(%a)
  %gmm = bf16[8,128]{1,0} custom-call(%x, %w), custom_call_target="tpu_custom_call"
  %ragged-all-to-all-done = bf16[8,1,128]{2,1,0} ragged-all-to-all-done(%ragged-all-to-all-start)
  %ragged_all_to_all.1 = bf16[8,1,128]{2,1,0} ragged-all-to-all(%ragged-all-to-all-done, %z, %s, %s, %s, %s), replica_groups={{0,1}}
  ROOT %r = bf16[8,1,128]{2,1,0} add(%ragged_all_to_all.1, %ragged-all-to-all-done)
}
"""
    got = async_overlaps(hlo)
    assert [(o.collective, o.compute) for o in got] == [("ragged-all-to-all-start", ("gmm",)),
                                                         ("ragged_all_to_all.1", None)]


def test_an_async_start_costs_what_its_sync_form_costs_and_a_ragged_all_to_all_moves_the_smaller_buffer():
    def hlo(op: str, result: str) -> str:
        return f"""HloModule m, is_scheduled=true

ENTRY %main (a: bf16[64,1,128], b: bf16[16,1,128], s: s32[4]) -> bf16[16,1,128] {{
  %a = bf16[64,1,128]{{2,1,0}} parameter(0)
  %b = bf16[16,1,128]{{2,1,0}} parameter(1)
  %s = s32[4]{{0}} parameter(2)
  %r = {result} {op}(%a, %b, %s, %s, %s, %s), replica_groups={{{{0,1,2,3}}}}
  ROOT %d = bf16[16,1,128]{{2,1,0}} {"ragged-all-to-all-done(%r)" if op.endswith("start") else "copy(%r)"}
}}
"""
    rows = 16 * 128 * 2  # the output buffer: 16 rows received, each read from the 64-row input
    sync = sum(c.bytes for c in breakdown(hlo("ragged-all-to-all", "bf16[16,1,128]{2,1,0}")))
    start = sum(c.bytes for c in breakdown(hlo(
        "ragged-all-to-all-start", "((bf16[64,1,128]{2,1,0}, bf16[16,1,128]{2,1,0}, s32[4]{0}, s32[4]{0}, "
        "s32[4]{0}, s32[4]{0}), bf16[16,1,128]{2,1,0})")))
    assert start == sync - 2 * rows  # the sync form's copy of its result: 2 x rows; the start's done is free
    assert sync - 2 * rows == 2 * rows + 4 * 16


def test_a_ragged_all_to_all_sends_at_most_the_smaller_of_its_buffers():
    # The exchange's dispatch reads a [64]-row input into a [16]-row receive buffer; its return trip sends
    # the 16 rows back into the [64]-row accumulator: each moves at most 16 rows over ICI, sync or async
    hlo = """HloModule m, is_scheduled=true

ENTRY %main (a: bf16[64,1,128], b: bf16[16,1,128], s: s32[4]) -> bf16[64,1,128] {
  %a = bf16[64,1,128]{2,1,0} parameter(0)
  %b = bf16[16,1,128]{2,1,0} parameter(1)
  %s = s32[4]{0} parameter(2)
  %go = bf16[16,1,128]{2,1,0} ragged-all-to-all(%a, %b, %s, %s, %s, %s), replica_groups={{0,1,2,3}}
  %back = ((bf16[16,1,128]{2,1,0}, bf16[64,1,128]{2,1,0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}), bf16[64,1,128]{2,1,0}) ragged-all-to-all-start(%go, %a, %s, %s, %s, %s), replica_groups={{0,1,2,3}}
  ROOT %d = bf16[64,1,128]{2,1,0} ragged-all-to-all-done(%back)
}
"""
    assert collective_bytes(hlo) == 2 * (16 * 128 * 2)


def test_a_sparsecore_offloaded_all_to_all_is_an_async_call_costed_once():
    # XLA:TPU on TPU7x wraps each ragged all-to-all in a computation that a `call-start` runs on the
    # SparseCores (async_execution_thread="sparsecore") and a `call-done` waits for: that pair is the
    # collective's start and done, and its bytes are the inner all-to-all's (the call moves nothing itself)
    hlo = """HloModule m, is_scheduled=true

%offloaded (p0: bf16[64,1,128], p1: bf16[16,1,128], p2: s32[4]) -> bf16[16,1,128] {
  %p0 = bf16[64,1,128]{2,1,0} parameter(0)
  %p1 = bf16[16,1,128]{2,1,0} parameter(1)
  %p2 = s32[4]{0} parameter(2)
  ROOT %ragged-all-to-all.1 = bf16[16,1,128]{2,1,0} ragged-all-to-all(%p0, %p1, %p2, %p2, %p2, %p2), replica_groups={{0,1,2,3}}
}

ENTRY %main (a: bf16[64,1,128], b: bf16[16,1,128], s: s32[4], w: bf16[128,128]) -> bf16[16,1,128] {
  %a = bf16[64,1,128]{2,1,0} parameter(0)
  %b = bf16[16,1,128]{2,1,0} parameter(1)
  %s = s32[4]{0} parameter(2)
  %w = bf16[128,128]{1,0} parameter(3)
  %go = ((bf16[64,1,128]{2,1,0}, bf16[16,1,128]{2,1,0}, s32[4]{0}), bf16[16,1,128]{2,1,0}) call-start(%a, %b, %s), async_execution_thread="sparsecore", to_apply=%offloaded
  %x = bf16[128,128]{1,0} bitcast(%w)
  %gmm = bf16[128,128]{1,0} custom-call(%x, %w), custom_call_target="tpu_custom_call"
  ROOT %done = bf16[16,1,128]{2,1,0} call-done(%go)
}
"""
    assert [(o.collective, o.compute) for o in async_overlaps(hlo)] == [("go", ("gmm",))]
    rows = 16 * 128 * 2
    kernel = 3 * 128 * 128 * 2  # the custom call's operands and result
    assert sum(c.bytes for c in breakdown(hlo)) == 2 * rows + 4 * 16 + kernel  # the inner op, once; the call free
    assert collective_bytes(hlo) == rows
