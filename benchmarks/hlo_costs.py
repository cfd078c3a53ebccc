"""Costs read from a compiled XLA program's optimized HLO text (a TPU AOT compile on a host without TPUs,
or any backend): bytes moved by collectives, and where the FLOPs and HBM bytes come from, by the
source line that emitted each op.

XLA's `cost_analysis()` gives one total and counts a while-loop body once. `breakdown` walks the
module instead: every computation runs as many times as its callers say (a while body its trip count
when the condition compares against one constant; a loop whose count is only known at run time, such
as the expert-parallel passes, counts once), each dot / convolution costs 2 x output elements x
contracted elements, elementwise arithmetic one "vector" FLOP per result element and a reduce one per
input element (kept apart: a matrix-vector product, which XLA rewrites as a multiply and a reduce, is
vector work, as is most of a decode step's), each custom call (a Pallas kernel) the FLOPs of its cost
estimate when it carries one, and each top-level instruction (a fusion, a copy, a collective...) the bytes of its
operands and result: roughly the HBM traffic, since fusions keep their insides on chip (an async start as its
synchronous form: its tuple's copies of the operands are aliases; a ragged all-to-all twice the smaller of its
input and its output buffer, which it updates in place). Each cost
goes to the innermost stack frame in this repository (the line of v4jax/, sharding/ or
pallas_kernels/ that traced the op), so a step's excess over the model's FLOPs, or its HBM traffic,
reads as a list of source lines (docs/sharding.md, Dry runs; `python -m benchmarks.dryrun --breakdown N`).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"ragged-all-to-all)(-start)?\(")
_SHAPE = re.compile(r"(bf16|f32|f16|s32|u32|s8|u8|pred|f8e4m3fn|f8e5m2|s64|u64|f64|s16|u16|s4|u4|f4e2m1fn)"
                    r"\[([0-9,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1,
          "f8e5m2": 1, "s64": 8, "u64": 8, "f64": 8, "s16": 2, "u16": 2, "s4": 0.5, "u4": 0.5, "f4e2m1fn": 0.5}
PROJECT_DIRS = ("v4jax/", "sharding/", "pallas_kernels/")
# one FLOP per result element, as XLA's cost analysis counts them (a reduce: one per input element)
_VECTOR = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select",
           "clamp", "exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "tanh", "rsqrt",
           "sqrt", "power", "remainder", "erf", "sine", "cosine"}
# no data moves: tuple plumbing, control flow and calls (their bodies are counted; an asynchronous
# `call-start`, as XLA:TPU wraps work it offloads to TPU7x's SparseCores, runs its computation, which is
# costed where it is), aliases and constants
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
         "call-start", "after-all", "partition-id", "replica-id", "iota", "opt-barrier"}


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        total += _BYTES[dtype] * (math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return total


def collective_bytes(hlo_text: str) -> float:
    """Bytes produced by collective ops in a compiled (per-device) HLO module, loop bodies counted
    once per known trip count. A ragged all-to-all counts the smaller of its input and output buffers:
    it sends at most its input's rows and writes at most its output buffer's, which may be much larger
    (the expert exchange's return trip writes one pass's rows into the [n*k, 1, d] accumulator)."""
    comps = split_computations(hlo_text)
    trips = trip_counts(comps)
    shapes, _ = _instructions(comps)
    total = 0.0
    for name, body in comps.items():
        mult = trips.get(name, 1)
        for m in _COLLECTIVE.finditer(body):
            if m.group(2) == "ragged-all-to-all":
                if m.group(3):  # ((input, output, offsets and sizes...), result)
                    buffers = [_shape_bytes(f"{d}[{s}]") for d, s in _SHAPE.findall(m.group(1))][:2]
                else:  # the result is the output buffer; the input is the first operand
                    first = _operands("(" + body[m.end():])[0]
                    buffers = [_shape_bytes(m.group(1)), _shape_bytes(shapes.get(first, m.group(1)))]
                total += mult * min(buffers)
            elif m.group(3):  # async start: its tuple holds the operand and the result; count the result
                total += mult * max((_shape_bytes(f"{d}[{s}]") for d, s in _SHAPE.findall(m.group(1))), default=0)
            else:
                total += mult * _shape_bytes(m.group(1))
    return total


def split_computations(hlo_text: str) -> dict[str, str]:
    """Computation name -> its instruction lines."""
    comps, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            if name:
                comps[name] = "\n".join(lines)
            name, lines = m.group(2), []
        elif name and line.startswith(" "):
            lines.append(line)
    if name:
        comps[name] = "\n".join(lines)
    return comps


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([a-z][a-z0-9\-]*)\((.*)$")


class Overlap(NamedTuple):
    computation: str
    collective: str  # the async start instruction
    compute: tuple[str, ...]  # matmul-like instructions scheduled between its start and its done


def async_overlaps(hlo_text: str, kind: str = "ragged-all-to-all") -> list[Overlap]:
    """For each asynchronous collective of `kind` in a scheduled module (a compiled program's HLO lists
    each computation's instructions in their run order), the matmul-like instructions placed between
    its start and its done: custom calls (Pallas kernels), convolutions, dots and the fusions that hold
    them. An empty tuple: the transfer hides nothing. A collective of `kind` that is not split into a
    start and a done (a synchronous one) is listed too, with compute None. A `call-start` / `call-done`
    pair around a computation that holds the collective (XLA:TPU's SparseCore offload on TPU7x) counts
    as its start and done."""
    comps = split_computations(hlo_text)
    holds = {c for c, body in comps.items() if any((m := _INSTR.match(line)) and m.group(2) == kind
                                                    for line in body.splitlines())}
    called_async = {c for body in comps.values()
                    for c in re.findall(r"call-start\(.*?to_apply=%?([\w.\-]+)", body)}
    out = []
    for comp, body in comps.items():
        open_: dict[str, list[str]] = {}
        for line in body.splitlines():
            m = _INSTR.match(line)
            if not m:
                continue
            name, op, rest = m.groups()
            called = re.search(r"to_apply=%?([\w.\-]+)", rest) if op == "call-start" else None
            if op == kind and comp not in called_async:
                out.append(Overlap(comp, name, None))
            elif op == kind + "-start" or (called and called.group(1) in holds):
                open_[name] = []
            elif op in (kind + "-done", "call-done"):
                start = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
                if start in open_:
                    out.append(Overlap(comp, start, tuple(open_.pop(start))))
            elif op in ("custom-call", "convolution", "dot") or (op == "fusion" and "kind=kOutput" in rest):
                for names in open_.values():
                    names.append(name)
    return out


def trip_counts(comps: dict[str, str]) -> dict[str, int]:
    """Computation name -> how many times it runs per step: while bodies run their trip count (the
    s32 constant their condition compares against), called computations inherit their caller's."""
    calls: dict[str, list[tuple[str, int]]] = {}
    for parent, body in comps.items():
        for line in body.splitlines():
            w = re.search(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)", line)
            if w:
                consts = re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", comps.get(w.group(1), ""))
                n = int(consts[0]) if len(consts) == 1 else 1
                calls.setdefault(parent, []).extend([(w.group(2), n), (w.group(1), n)])
                continue
            for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                calls.setdefault(parent, []).append((callee, 1))
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                calls.setdefault(parent, []).extend((b.strip().lstrip("%"), 1) for b in branches.group(1).split(","))
    mult: dict[str, int] = {}
    called = {c for v in calls.values() for c, _ in v}

    def visit(comp, factor, depth=0):
        for child, n in calls.get(comp, []):
            mult[child] = mult.get(child, 0) + factor * n
            if depth < 50:
                visit(child, factor * n, depth + 1)

    for root in comps:
        if root not in called:
            mult[root] = 1
            visit(root, 1)
    return mult


class Cost(NamedTuple):
    source: str  # "v4jax/model/attention.py:123 (function)", or the op name where no frame is in the repo
    flops: float  # matmuls (dots, convolutions) and kernels' estimates
    bytes: float
    vector_flops: float = 0.0  # elementwise arithmetic (one per result element) and reductions (one per input)


def _frames(hlo_text: str) -> dict[int, str]:
    """stack_frame_id -> the innermost frame in this repository, "path:line (function)"."""
    section, files, funcs, locs, frames = None, {}, {}, {}, {}
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line or line.startswith(("%", "ENTRY", "HloModule", " ")):
            section = None if not line or not line[0].isdigit() else section
            continue
        parts = line.split(" ", 1)
        if section is None or len(parts) < 2 or not parts[0].isdigit():
            continue
        i, rest = int(parts[0]), parts[1]
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[i] = rest.strip('"')
        elif section == "FileLocations":
            f = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
            locs[i] = (f.get("file_name_id"), f.get("function_name_id"), f.get("line"))
        elif section == "StackFrames":
            f = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
            frames[i] = (f.get("file_location_id"), f.get("parent_frame_id"))

    def where(frame: int) -> str | None:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            file_id, func_id, line = locs.get(loc, (None, None, None))
            path = files.get(file_id, "")
            for d in PROJECT_DIRS:
                if d in path:
                    return f"{d}{path.split(d, 1)[1]}:{line} ({funcs.get(func_id, '?')})"
            frame = parent
        return None

    return {i: s for i in frames if (s := where(i)) is not None}


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, the rest); a tuple type may hold spaces and parentheses."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == " " and depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def _dims(type_text: str) -> list[int]:
    m = _SHAPE.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _operands(call: str) -> list[str]:
    """The operand names of 'opcode(%a, %b), attrs' (up to the closing parenthesis)."""
    depth, out = 0, []
    for i, ch in enumerate(call):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", call[:i])
    return out


def _matmul_flops(opcode: str, out_dims: list[int], call: str, shapes: dict[str, str]) -> float:
    ops = _operands(call)
    lhs = _dims(shapes.get(ops[0], "")) if ops else []
    if not lhs:
        return 0.0
    if opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", call)
        contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
        return 2.0 * math.prod(out_dims) * contracted
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", call)  # convolution: b/f/0-9 on the lhs, i/o/0-9 on the rhs
    if not labels:
        return 0.0
    groups = int(m.group(1)) if (m := re.search(r"feature_group_count=(\d+)", call)) else 1
    features = lhs[labels.group(1).index("f")] // groups
    window = re.search(r"window=\{([^}]*)\}", call)
    field = lambda name: re.search(rf"\b{name}=(\S+)", window.group(1)) if window else None  # noqa: E731
    sizes = [int(v) for v in field("size").group(1).split("x")] if window and field("size") else []
    per_dim = lambda name, default: ([int(v) if name != "pad" else int(v.split("_")[0])  # noqa: E731
                                      for v in field(name).group(1).split("x")] if field(name) else [default] * len(sizes))
    strides, pads, lhs_d, rhs_d = per_dim("stride", 1), per_dim("pad", 0), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    rest, pairs = float(math.prod(out_dims)), 1.0
    for k, w in enumerate(sizes):  # spatial dim k: (output, tap) pairs that meet a real input element
        L, O = lhs[labels.group(1).index(str(k))], out_dims[labels.group(3).index(str(k))]
        rest /= O
        pairs *= _window_pairs(L, O, w, strides[k], pads[k], lhs_d[k], rhs_d[k])
    return 2.0 * rest * features * pairs


def _window_pairs(L: int, O: int, w: int, stride: int, pad: int, lhs_dilate: int, rhs_dilate: int) -> float:
    """(output position, window tap) pairs of one spatial dim that land on one of the L real inputs, not on
    padding or a dilation hole: a convolution's taps per output summed over the outputs. (XLA:TPU writes a
    batched matmul as a convolution whose window of n taps meets one input through an n-fold lhs dilation,
    and a sliding window as one padded on both sides.)"""
    if L * w > 4_000_000:  # too many to count: each output's taps over the dilation
        return float(O * -(-w // lhs_dilate))
    q = pad + lhs_dilate * np.arange(L)[:, None] - rhs_dilate * np.arange(w)[None, :]  # [L, w]: output x stride
    return float(np.sum((q >= 0) & (q % stride == 0) & (q // stride < O)))


def _sliced_read(comp: str, index: int, parsed: dict) -> float | None:
    """Bytes a fused computation reads of its parameter `index` when it reads it only through
    dynamic-slices (directly, through bitcasts and same-shape one-input fusions such as a layout
    change, which a fusion computes only where it is sliced, or through nested fusions that do): the
    slices' bytes; None when some use reads it whole."""
    rows = parsed.get(comp, [])
    name = next((inst for inst, _, op, c in rows if op == "parameter" and c.startswith(f"parameter({index})")), None)
    if name is None:
        return None
    total, frontier, seen = 0.0, [name], set()
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        shape = _dims(next(t for inst, t, _, _ in rows if inst == value))
        uses = [(inst, t, op, c, pos) for inst, t, op, c in rows for pos, o in enumerate(_operands(c)) if o == value]
        if not uses:
            return None
        for inst, t, op, c, pos in uses:
            callee = re.search(r"calls=%?([\w.\-]+)", c) if op == "fusion" else None
            if op == "dynamic-slice" and pos == 0:
                total += _shape_bytes(t)
            elif op == "bitcast":
                frontier.append(inst)
            elif callee and (inner := _sliced_read(callee.group(1), pos, parsed)) is not None:
                total += inner
            elif callee and len(_operands(c)) == 1 and _dims(t) == shape:
                frontier.append(inst)  # a same-shape fusion (a layout change) computed only where sliced
            else:
                return None
    return total


def _traffic(opcode: str, type_text: str, call: str, shapes: dict[str, str], parsed: dict) -> float:
    """HBM bytes of one top-level instruction: its operands and result, except where it works in
    place: a dynamic-slice reads only its slice, a dynamic-update-slice writes only its update (also
    inside a fusion: a fused parameter read only through dynamic-slices, at any depth of nested
    fusions, costs the slices; a fused in-place update target and the result it aliases cost the
    update)."""
    ops = _operands(call)
    sizes = [_shape_bytes(shapes.get(o, "")) for o in ops]
    out = _shape_bytes(type_text)
    if opcode in ("ragged-all-to-all", "ragged-all-to-all-start") and len(sizes) > 2:
        # rows read from the input and written into the output buffer (updated in place, not read): at
        # most the smaller of the two buffers each way (the counts travel beside them)
        return 2 * min(sizes[0], sizes[1]) + sum(sizes[2:])
    if opcode.endswith("-start") and type_text.startswith("(") and out > sum(sizes):
        out -= sum(sizes)  # an async start's tuple holds its operands (aliases) beside its result: as the sync op
    if opcode == "dynamic-slice":
        return 2 * out
    if opcode == "dynamic-update-slice" and len(sizes) > 1:
        return 2 * sizes[1]
    callee = re.search(r"calls=%?([\w.\-]+)", call) if opcode == "fusion" else None
    if callee and callee.group(1) in parsed:
        rows = parsed[callee.group(1)]
        params = {inst: int(m.group(1)) for inst, _, op, c in rows if op == "parameter"
                  and (m := re.match(r"parameter\((\d+)\)", c))}
        users: dict[str, list[tuple[str, int, str]]] = {}
        for inst, t, op, c in rows:
            for pos, o in enumerate(_operands(c)):
                users.setdefault(o, []).append((op, pos, t))
        by_name = {inst: (op, c) for inst, _, op, c in rows}
        for param, k in params.items():
            use = users.get(param, [])
            if k >= len(sizes) or not use:
                continue
            if all(op == "dynamic-update-slice" and pos == 0 for op, pos, _ in use):
                updates = [_shape_bytes(shapes.get(_operands(c)[1], "")) for inst, (op, c) in by_name.items()
                           if op == "dynamic-update-slice" and _operands(c)[:1] == [param]]
                sizes[k] = 0.0  # not read: the result aliases it and only the updates are written
                out -= sum(_shape_bytes(shapes.get(inst, "")) for inst, (op, c) in by_name.items()
                           if op == "dynamic-update-slice" and _operands(c)[:1] == [param]) - sum(updates)
            elif (sliced := _sliced_read(callee.group(1), k, parsed)) is not None:
                sizes[k] = min(sizes[k], sliced)
    return max(out, 0.0) + sum(sizes)


def _instructions(comps: dict[str, str]):
    """(instruction name -> its type text, computation -> its rows (name, type text, opcode, call text))."""
    shapes: dict[str, str] = {}
    parsed: dict[str, list[tuple[str, str, str, str]]] = {}
    for name, body in comps.items():
        rows = []
        for line in body.splitlines():
            m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$", line)
            if not m:
                continue
            type_text, call = _split_type(m.group(2))
            opcode = re.match(r"([\w\-]+)\(", call)
            if not opcode:
                continue
            shapes[m.group(1)] = type_text
            rows.append((m.group(1), type_text, opcode.group(1), call))
        parsed[name] = rows
    return shapes, parsed


def breakdown(hlo_text: str) -> list[Cost]:
    """FLOPs and bytes of a compiled HLO module by source line, biggest FLOPs first (see the module
    docstring for what is counted)."""
    comps = split_computations(hlo_text)
    mult = trip_counts(comps)
    frames = _frames(hlo_text)
    fused = {c for body in comps.values() for c in re.findall(r"\sfusion\(.*?calls=%?([\w.\-]+)", body)}
    # reducers and scatter combiners: their work is their caller's (a reduce counts its inputs)
    applied = {c for body in comps.values() for c in re.findall(r"to_apply=%?([\w.\-]+)", body)}
    shapes, parsed = _instructions(comps)
    root_source: dict[str, str] = {}  # a fused computation's first attributed op, for fusions without metadata
    costs: dict[str, list[float]] = {}

    def source_of(call: str, comp: str) -> str:
        m = re.search(r"stack_frame_id=(\d+)", call)
        if m and int(m.group(1)) in frames:
            return frames[int(m.group(1))]
        m = re.search(r'op_name="([^"]+)"', call)
        if m:
            return m.group(1).rsplit("/", 2)[-1] if "/" in m.group(1) else m.group(1)
        return root_source.get(comp, "(no source)")

    for name in comps:  # fused computations' sources first, so their fusions can borrow them
        if name in fused:
            for _, _, _, call in parsed[name]:
                s = source_of(call, "")
                if s != "(no source)" and not s.startswith("jit("):
                    root_source[name] = s
                    break
    for rows in parsed.values():  # a fused computation with no source of its own: its fusion's
        for _, _, opcode, call in rows:
            callee = re.search(r"calls=%?([\w.\-]+)", call) if opcode == "fusion" else None
            if callee and callee.group(1) not in root_source:
                s = source_of(call, "")
                if s != "(no source)":
                    root_source[callee.group(1)] = s
    for name, rows in parsed.items():
        n = mult.get(name, 1)
        for inst, type_text, opcode, call in rows:
            flops = traffic = vector = 0.0
            if opcode in ("dot", "convolution"):
                flops = _matmul_flops(opcode, _dims(type_text), call, shapes)
            elif opcode == "custom-call":
                m = re.search(r'"flops"\s*:\s*"?(\d+)', call)
                flops = float(m.group(1)) if m else 0.0
            elif opcode in _VECTOR and name not in applied:
                vector = float(math.prod(_dims(type_text)))
            elif opcode == "reduce":
                ops = _operands(call)
                vector = float(math.prod(_dims(shapes.get(ops[0], "")))) if ops else 0.0
            if name not in fused and opcode not in _FREE and not opcode.endswith("-done"):
                traffic = _traffic(opcode, type_text, call, shapes, parsed)
            if flops or traffic or vector:
                callee = re.search(r"calls=%?([\w.\-]+)", call)
                key = source_of(call, callee.group(1) if callee else name)  # inside a fusion: the fusion's
                c = costs.setdefault(key, [0.0, 0.0, 0.0])
                c[0] += n * flops
                c[1] += n * traffic
                c[2] += n * vector
    return sorted((Cost(k, *v) for k, v in costs.items()), key=lambda c: (-c.flops, -c.bytes))


def by_function(costs: list[Cost]) -> list[Cost]:
    """The per-line costs summed per file and function."""
    out: dict[str, list[float]] = {}
    for c in costs:
        m = re.match(r"(.*?):\d+ \((.*)\)$", c.source)
        key = f"{m.group(1)} {m.group(2)}" if m else c.source
        acc = out.setdefault(key, [0.0, 0.0, 0.0])
        acc[0] += c.flops
        acc[1] += c.bytes
        acc[2] += c.vector_flops
    return sorted((Cost(k, *v) for k, v in out.items()), key=lambda c: (-c.flops, -c.bytes))


def format_table(costs: list[Cost], top: int, totals: tuple[float, ...] | None = None) -> str:
    """The top rows by matmul FLOPs, by vector FLOPs (when there are any) and by bytes, each with its
    share of the module's total (`totals`: FLOPs, bytes[, vector FLOPs]; default the sums of `costs`)."""
    sums = (sum(c.flops for c in costs), sum(c.bytes for c in costs), sum(c.vector_flops for c in costs))
    flops, traffic, vector = (*(totals or sums), *sums[len(totals or sums):])
    flops, traffic, vector = flops or 1.0, traffic or 1.0, vector or 1.0
    lines = [f"{'FLOPs':>10} {'share':>6}  source (top {top} by matmul FLOPs)"]
    lines += [f"{c.flops:10.3e} {c.flops / flops:6.1%}  {c.source}" for c in costs[:top] if c.flops]
    if any(c.vector_flops for c in costs):
        lines += ["", f"{'FLOPs':>10} {'share':>6}  source (top {top} by vector FLOPs: elementwise, reductions)"]
        lines += [f"{c.vector_flops:10.3e} {c.vector_flops / vector:6.1%}  {c.source}"
                  for c in sorted(costs, key=lambda c: -c.vector_flops)[:top] if c.vector_flops]
    lines += ["", f"{'bytes':>10} {'share':>6}  source (top {top} by HBM bytes)"]
    lines += [f"{c.bytes:10.3e} {c.bytes / traffic:6.1%}  {c.source}"
              for c in sorted(costs, key=lambda c: -c.bytes)[:top] if c.bytes]
    return "\n".join(lines)
