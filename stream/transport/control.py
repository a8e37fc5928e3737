"""Small messages between receivers and the scan coordinator, and on the live results channel.

A message is a msgpack map, optionally followed by raw array buffers described in the map's
``arrays`` list ({name, dtype, shape} each, in order). Reports are small (frame ranges,
counters); live snapshots carry partial images, never events.
"""

from __future__ import annotations

import msgpack
import numpy as np

from stream.transport.compact import Narrowed


def encode(header: dict, arrays: dict[str, np.ndarray | Narrowed] | None = None) -> list:
    """The message's parts. An array given ``compact.narrow``ed travels in its narrow dtype
    (its spec's ``as``: the dtype ``decode`` gives back)."""
    arrays = arrays or {}
    specs, bufs = [], []
    for k, v in arrays.items():
        data = v.data if isinstance(v, Narrowed) else v
        specs.append({"name": k, "dtype": data.dtype.str, "shape": list(data.shape),
                      **({"as": v.dtype} if isinstance(v, Narrowed) else {})})
        bufs.append(np.ascontiguousarray(data))
    return [msgpack.packb(dict(header, arrays=specs), use_bin_type=True)] + bufs


def decode(parts, widen: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the arrays (read-only views of the parts). Narrowed arrays are given
    back in their own dtype (``widen``), else as they travelled, their own dtype in the
    header's ``widen`` map (name → dtype; for a caller that copies them into arrays of its
    own anyway). Raises ValueError for an ``as`` that is not an integer dtype."""
    header = msgpack.unpackb(getattr(parts[0], "buffer", parts[0]), raw=False)
    arrays, narrowed = {}, {}
    for spec, part in zip(header.pop("arrays", []), parts[1:]):
        buf = getattr(part, "buffer", part)
        value = np.frombuffer(buf, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        if "as" in spec and (np.dtype(spec["as"]).kind not in "iu" or np.dtype(spec["as"]).itemsize > 8):
            raise ValueError(f"array {spec['name']!r}: 'as' must be an integer dtype, not {spec['as']!r}")
        if "as" in spec and widen:
            value = value.astype(np.dtype(spec["as"]))
        elif "as" in spec:
            narrowed[spec["name"]] = spec["as"]
        arrays[spec["name"]] = value
    if narrowed:
        header["widen"] = narrowed
    return header, arrays
