"""A replica's speed, as measured on llmopt's engine: prefill tokens/s, total decode
tokens/s by batch size (a continuous-batching step decodes one token per sequence, so
a step at batch b takes b / throughput(b)), and the time to load a model.

A calibration file (scripts/fleet_calibration.json holds the default, with its
source) gives all of it; output of `llmopt bench MODEL --offline --json` (one file per
--batch) then overrides what that run measured.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import UsageError


@dataclass(frozen=True)
class Calibration:
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float]  # batch size -> tokens/s over the whole batch
    load_s: float  # a cold start: loading a model's weights
    source: str

    @property
    def max_batch(self) -> int:
        return max(self.decode_tokens_per_s)

    def step_s(self, batch: int) -> float:
        """Seconds for one decode step of `batch` sequences; throughput is interpolated
        linearly between the measured batch sizes."""
        sizes = sorted(self.decode_tokens_per_s)
        rates = [self.decode_tokens_per_s[b] for b in sizes]
        i = bisect.bisect_left(sizes, batch)
        if i == 0:
            rate = rates[0]
        elif i == len(sizes):
            rate = rates[-1]
        else:
            lo, hi = sizes[i - 1], sizes[i]
            rate = rates[i - 1] + (rates[i] - rates[i - 1]) * (batch - lo) / (hi - lo)
        return max(batch, 1) / rate

    @classmethod
    def load(cls, paths: list[Path]) -> Calibration:
        """The calibration of the first file, overridden by each later one: a file of
        the same shape, or `llmopt bench --offline --json` output."""
        cal: Calibration | None = None
        for p in paths:
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"cannot read calibration {p}: {e}") from None
            if "decode_tokens_per_s" in data:
                cal = cls._from_dict(data, str(p))
            elif cal is None:
                raise UsageError(f"{p}: a bench result only overrides a full calibration file")
            else:
                cal = cal._bench(data, p)
        if cal is None:
            raise UsageError("no calibration file given")
        return cal

    @classmethod
    def _from_dict(cls, d: dict, where: str) -> Calibration:
        return cls(
            float(d["prefill_tokens_per_s"]),
            {int(b): float(r) for b, r in d["decode_tokens_per_s"].items()},
            float(d["load_s"]),
            f"{where}: {d.get('source', '')}",
        )

    def _bench(self, d: dict, path: Path) -> Calibration:
        decode = dict(self.decode_tokens_per_s)
        prefill = self.prefill_tokens_per_s
        found = False
        for key, value in d.items():
            rate = value["mean"] if isinstance(value, dict) and "mean" in value else None
            if rate is None:
                continue
            if re.fullmatch(r"pp\d+_tokens_per_s", key):
                prefill, found = rate, True
            elif re.fullmatch(r"tg\d+_tokens_per_s", key):
                decode[1], found = rate, True
            elif m := re.fullmatch(r"batch(\d+)_tg\d+_tokens_per_s", key):
                decode[int(m.group(1))], found = rate, True
        if not found:
            raise UsageError(f"{path} has no pp/tg/batch rates (llmopt bench --offline --json)")
        source = f"{self.source}; overridden by {path}"
        return Calibration(prefill, decode, self.load_s, source)
