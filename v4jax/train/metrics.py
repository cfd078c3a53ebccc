"""Training metrics: strict-JSON lines, TensorBoard event files, the progress line, the loss curve PNG,
and the chips' peak FLOP/s for MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import time



# --------------------------------------------------------------------------------------------------
# Metrics: JSONL, TensorBoard event files, progress bar, PNG curve

class TensorBoardWriter:
    """Scalars to a TensorBoard event file (tensorboard's own writer; no TensorFlow needed)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._w = EventFileWriter(logdir)

    def scalars(self, step: int, values: dict[str, float]):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self):
        self._w.close()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, enabled: bool, every: int):
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tps: float, eta: float, note: str = ""):
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        width = 24
        done = int(width * step / max(1, self.total))
        bar = "=" * done + (">" if done < width else "") + " " * max(0, width - done - 1)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:7.4f} | "
                f"{tps / 1e3:7.2f}k tok/s | ETA {_fmt_time(eta)}{note}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def read_metrics(path: str) -> dict[int, dict]:
    """{step: last record} of a metrics JSONL (a resumed run repeats steps after its checkpoint)."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[r["step"]] = r
    return out


def plot_loss(metrics_path: str, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = sorted(read_metrics(metrics_path).items())
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "mtp"):
        pts = [(s, r[key]) for s, r in recs if r.get("ok", True) and r.get(key) is not None]  # skipped steps left out
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops(device) -> float:
    kind = getattr(device, "device_kind", "")
    for k in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(k):
            return PEAK_FLOPS[k]
    return 0.0


def json_line(rec: dict) -> str:
    """One strict-JSON metrics line: non-finite floats become null (bare NaN/Infinity are not JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(rec), allow_nan=False)


def last_loss(metrics_path: str, upto: int) -> dict | None:
    """The last step <= upto whose update was kept (ok), from a metrics file; None when there is none."""
    recs = read_metrics(metrics_path)
    good = [s for s, r in recs.items() if s <= upto and r.get("ok", True) and r.get("loss") is not None]
    return recs[max(good)] if good else None
