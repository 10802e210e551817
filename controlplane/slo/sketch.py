"""A mergeable log-bucket latency histogram (DDSketch-style) with a stated relative accuracy.

Why: quantiles over 30 days of requests cannot come from a full scan in under a second, and
percentiles of per-minute percentiles are wrong. Log buckets merge by addition and bound the
relative error of every quantile by construction: a value x > MIN_VALUE_S lands in bucket
k = ceil(log_gamma x), covering (gamma^(k-1), gamma^k], and is represented by 2 gamma^k / (gamma + 1),
which is within RELATIVE_ACCURACY of every value of the bucket. Values <= MIN_VALUE_S (1 us) share a
zero bucket represented by 0 (absolute error <= 1 us). Hand-written because the DDSketch libraries'
wire formats are not what we want in a SQL blob, and the mapping is a dozen lines of numpy.

Quantiles use the "inverted CDF" definition (numpy method="inverted_cdf"): the q-quantile is the
smallest value v such that at least a fraction q of the values are <= v. That is the definition an SLO
"p99 <= T" needs (p99 <= T exactly when at least 99% of requests took <= T).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

RELATIVE_ACCURACY = 0.005  # half the 1% the issue allows: headroom for float rounding at bucket edges
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE_S = 1e-6
ZERO_KEY = -32768  # keys are int16: |log_gamma(1e-6 .. 1e6)| < 1400, far inside the range
MAX_KEY = 32767
_OFFSET = 32768
_SIZE = 65536
_FORMAT = 1  # first byte of a blob, so the layout can change later without guessing

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def keys_of(values: FloatArray) -> IntArray:
    """Bucket keys of (non-NaN) values."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        k = np.ceil(np.log(np.maximum(v, MIN_VALUE_S)) / _LOG_GAMMA)
    keys: IntArray = np.clip(k, ZERO_KEY + 1, MAX_KEY).astype(np.int64)
    keys[v <= MIN_VALUE_S] = ZERO_KEY
    return keys


def key_of(value: float) -> int:
    return int(keys_of(np.array([value]))[0])


def value_of(key: int) -> float:
    """The representative value of a bucket (0 for the zero bucket)."""
    return 0.0 if key == ZERO_KEY else 2.0 * GAMMA**key / (GAMMA + 1.0)


class LogSketch:
    """Counts per bucket key, dense over the int16 key space (512 KiB; merging is one vector add)."""

    __slots__ = ("counts",)

    def __init__(self, counts: IntArray | None = None) -> None:
        self.counts: IntArray = np.zeros(_SIZE, dtype=np.int64) if counts is None else counts

    @classmethod
    def of(cls, values: Iterable[float] | FloatArray) -> LogSketch:
        sketch = cls()
        sketch.add(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64))
        return sketch

    @classmethod
    def merged(cls, blobs: Iterable[bytes]) -> LogSketch:
        """One sketch from many stored blobs (a single bincount over all of them)."""
        keys: list[IntArray] = []
        counts: list[IntArray] = []
        for blob in blobs:
            k, c = decode(blob)
            keys.append(k)
            counts.append(c)
        if not keys:
            return cls()
        all_keys = np.concatenate(keys) + _OFFSET
        all_counts = np.concatenate(counts)
        return cls(np.bincount(all_keys, weights=all_counts, minlength=_SIZE).astype(np.int64))

    def add(self, values: FloatArray) -> None:
        """Add values; NaN (unknown) values are ignored."""
        v = values[~np.isnan(values)]
        if v.size:
            self.counts += np.bincount(keys_of(v) + _OFFSET, minlength=_SIZE)

    def merge(self, other: LogSketch) -> None:
        self.counts += other.counts

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """The q-quantile (inverted CDF), None when the sketch is empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q!r}")
        n = self.count
        if n == 0:
            return None
        rank = max(1, math.ceil(q * n - 1e-9))  # 1-based rank; the epsilon absorbs q*n rounding up
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        return value_of(idx - _OFFSET)

    def count_le(self, threshold_s: float) -> tuple[int, int]:
        """Bounds (low, high) on how many values are <= threshold_s.

        Every bucket below the threshold's own bucket is entirely <= threshold, every bucket above
        it entirely >, so the only uncertainty is the threshold's bucket (relative width ~1%).
        """
        at = key_of(threshold_s) + _OFFSET
        low = int(self.counts[:at].sum())
        return low, low + int(self.counts[at])

    def to_blob(self) -> bytes:
        nz = np.flatnonzero(self.counts)
        return encode(nz - _OFFSET, self.counts[nz])


def encode(keys: IntArray, counts: IntArray) -> bytes:
    """Blob: format byte, uint32 n, n int16 keys, n uint32 counts (little-endian)."""
    if counts.size and int(counts.max()) >= 2**32:
        raise OverflowError("a sketch bucket holds 2^32 or more values; the blob format cannot store it")
    return header(keys.size) + keys.astype("<i2").tobytes() + counts.astype("<u4").tobytes()


def header(n: int) -> bytes:
    """The blob header of n buckets."""
    return struct.pack("<BI", _FORMAT, n)


def decode(blob: bytes) -> tuple[IntArray, IntArray]:
    fmt, n = struct.unpack_from("<BI", blob)
    if fmt != _FORMAT:
        raise ValueError(f"unknown sketch blob format {fmt} (this code reads format {_FORMAT})")
    keys = np.frombuffer(blob, dtype="<i2", count=n, offset=5).astype(np.int64)
    counts = np.frombuffer(blob, dtype="<u4", count=n, offset=5 + 2 * n).astype(np.int64)
    return keys, counts
