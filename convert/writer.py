"""gguf-py's GGUFWriter with a fast path for large metadata arrays, and tensor data in blocks.

gguf-py 0.19 packs array items one ``struct.pack`` call at a time; a 50k-token vocabulary with its
merges then costs about a second, more than streaming the weights of a 135M model. The bytes
written here are the same, packed in bulk.

``write_tensor_blocks`` writes one tensor's data from a sequence of blocks (what the conversion
casts block by block), so a cast tensor never exists whole in memory; the file is the same as
``write_tensor_data`` of the whole array.
"""

from __future__ import annotations

import collections
import struct
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType
# Blocks of tensor data queued or being written while the next one is made (write_tensor_blocks).
WRITE_AHEAD = 2
_NUMPY = {VT.INT32: "<i4", VT.UINT32: "<u4", VT.FLOAT32: "<f4", VT.INT64: "<i8", VT.UINT64: "<u8"}


class GGUFWriter(gguf.GGUFWriter):
    _pool: ThreadPoolExecutor | None = None

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

    def write_tensor_blocks(self, nbytes: int, blocks: Iterable[np.ndarray]) -> None:
        """The next tensor's data (``nbytes`` in all) from contiguous native-endian blocks, in
        order: ``write_tensor_data``'s bookkeeping and padding, each block written by a
        background thread while the next one is made (a cast in ggml and a write both release
        the GIL, so the two overlap on two cores). At most WRITE_AHEAD blocks are waiting or
        being written when the next is asked for: a producer may reuse a block's memory
        WRITE_AHEAD + 1 blocks later."""
        if self.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS):
            raise ValueError(
                f"Expected output file to contain tensor info or weights, got {self.state}"
            )
        native = gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE
        if self.endianess != native:
            raise ValueError("write_tensor_blocks writes native byte order only")
        file_id = next((i for i, t in enumerate(self.tensors) if t), -1)
        fout = self.fout[file_id]
        ti = self.tensors[file_id].pop(next(iter(self.tensors[file_id])))
        if ti.nbytes != nbytes:
            raise ValueError(f"tensor data of {nbytes} bytes for an entry of {ti.nbytes}")
        self.write_padding(fout, fout.tell())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gguf-write")
        pending: collections.deque[Future[Any]] = collections.deque()
        written = 0
        try:
            for b in blocks:
                pending.append(self._pool.submit(fout.write, memoryview(b).cast("B")))
                written += b.nbytes
                while len(pending) > WRITE_AHEAD:
                    pending.popleft().result()
        finally:  # the file is touched here again only once every write is done
            while pending:
                pending.popleft().result()
        if written != nbytes:
            raise ValueError(f"{written} bytes of tensor data written, {nbytes} announced")
        self.write_padding(fout, nbytes)
        self.state = gguf.WriterState.WEIGHTS

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        super().close()
