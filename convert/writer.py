"""gguf-py's GGUFWriter with a fast path for large metadata arrays.

gguf-py 0.19 packs array items one ``struct.pack`` call at a time; a 50k-token vocabulary with its
merges then costs about a second, more than streaming the weights of a 135M model. The bytes
written here are the same, packed in bulk.
"""

from __future__ import annotations

import struct
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType
_NUMPY = {VT.INT32: "<i4", VT.UINT32: "<u4", VT.FLOAT32: "<f4", VT.INT64: "<i8", VT.UINT64: "<u8"}


class GGUFWriter(gguf.GGUFWriter):
    def _pack_val(
        self,
        val: Any,
        vtype: gguf.GGUFValueType,
        add_vtype: bool,
        sub_type: gguf.GGUFValueType | None = None,
    ) -> bytes:
        if (
            vtype != VT.ARRAY
            or self.endianess != gguf.GGUFEndian.LITTLE
            or isinstance(val, (bytes, str))
            or not val
        ):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type
        if ltype is None:
            if len(set(map(type, val))) != 1:  # mixed: let gguf-py decide and complain
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = VT.get_type(val[0])
        if ltype == VT.STRING:
            enc = (
                [v.encode("utf-8") for v in val] if type(val[0]) is str else [bytes(v) for v in val]
            )
            lens = np.fromiter(map(len, enc), dtype="<u8", count=len(enc)).tobytes()
            parts: list[bytes] = [b""] * (2 * len(enc))
            parts[0::2] = [lens[i : i + 8] for i in range(0, len(lens), 8)]
            parts[1::2] = enc
            body = b"".join(parts)
        elif ltype in _NUMPY:
            body = np.asarray(val, dtype=_NUMPY[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        return head + struct.pack("<IQ", ltype, len(val)) + body
