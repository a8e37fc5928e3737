"""Small messages between receivers and the scan coordinator, and on the live results channel.

A message is a msgpack map, optionally followed by raw array buffers described in the map's
``arrays`` list ({name, dtype, shape} each, in order). Reports are small (frame ranges,
counters); live snapshots carry partial images, never events.
"""

from __future__ import annotations

import msgpack
import numpy as np


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    arrays = arrays or {}
    header = dict(header, arrays=[{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)}
                                  for k, v in arrays.items()])
    return [msgpack.packb(header, use_bin_type=True)] + [np.ascontiguousarray(v) for v in arrays.values()]


def decode(parts) -> tuple[dict, dict[str, np.ndarray]]:
    header = msgpack.unpackb(getattr(parts[0], "buffer", parts[0]), raw=False)
    arrays = {}
    for spec, part in zip(header.pop("arrays", []), parts[1:]):
        buf = getattr(part, "buffer", part)
        arrays[spec["name"]] = np.frombuffer(buf, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return header, arrays
