"""Per-chip figures of TPU generations for the dry run's memory check and roofline.

Source: Google Cloud TPU documentation, system architecture pages for v5e, v5p, v6e and TPU7x
(docs.cloud.google.com/tpu/docs/{v5e,v5p,v6e,tpu7x}; the TPU7x page tabulates v5p, v6e and TPU7x side
by side). ICI is the bidirectional inter-chip bandwidth per chip. v5p and TPU7x chips have two
TensorCores; JAX shows a v5p chip as one device (megacore) and a TPU7x chip as two devices.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # per chip
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bytes/s per chip, bidirectional
    devices_per_chip: int  # JAX devices per chip

    @property
    def hbm_per_device(self) -> float:
        return self.hbm_bytes / self.devices_per_chip

    def roofline(self, flops: float, hbm_bytes: float, collective_bytes: float | None = None) -> tuple[float, str]:
        """(seconds, bound) of one device's step: the longest of its FLOPs at peak, its HBM traffic at full
        bandwidth and (when known) its collective bytes at full ICI bandwidth; bound is "compute",
        "memory" or "collectives"."""
        per = self.devices_per_chip
        times = {"compute": flops / (self.bf16_flops / per), "memory": hbm_bytes / (self.hbm_bandwidth / per),
                 **({} if collective_bytes is None else {"collectives": collective_bytes / (self.ici_bandwidth / per)})}
        bound = max(times, key=times.get)
        return times[bound], bound


CHIPS = {
    "v5e": Chip("TPU v5e", 16 * GB, 197e12, 819 * GB, 400 * GB, 1),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765 * GB, 1200 * GB, 1),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GB, 918e12, 1638 * GB, 800 * GB, 1),
    "tpu7x": Chip("TPU7x (Ironwood)", 192 * GiB, 2307e12, 7380 * GB, 1200 * GB, 2),
}


def chip_for(topology: str) -> Chip:
    gen = topology.split(":", 1)[0].lower()
    if gen not in CHIPS:
        raise ValueError(f"no chip figures for TPU generation {gen!r} (topology {topology!r}); "
                         f"known: {sorted(CHIPS)}")
    return CHIPS[gen]


def table() -> str:
    rows = ["| chip | HBM / chip | peak bf16 / chip | HBM bandwidth | ICI (bidir.) | JAX devices / chip |",
            "|---|---|---|---|---|---|"]
    for c in CHIPS.values():
        rows.append(f"| {c.name} | {c.hbm_bytes / GiB:.0f} GiB | {c.bf16_flops / 1e12:.0f} TFLOP/s | "
                    f"{c.hbm_bandwidth / GB:.0f} GB/s | {c.ici_bandwidth / GB:.0f} GB/s | {c.devices_per_chip} |")
    return "\n".join(rows)
