"""NVMe tier: one file per block under a directory with a byte budget, checksummed.

File layout: header `<4s magic, u32 version, 16s key, u64 payload_len, u32 crc32>` then the
payload (the block's raw bytes). A read checks magic, version, key, length and crc; any
mismatch (a flipped byte, a truncated file) is a miss and the file is dropped. An unwritable or
full directory degrades to misses: the first failure is logged, every one is counted, nothing
raises to the caller. Not thread-safe: the TieredStore serializes access.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

from kvtransfer.tiers.placement import SlotLRU

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<4sI16sQI")
_MAGIC, _VERSION, _SUFFIX = b"TKVB", 1, ".kvb"


class NvmeTier:
    def __init__(
        self, directory: str | os.PathLike[str], bytes_per_block: int, budget_bytes: int
    ) -> None:
        self.directory = Path(directory)
        self.bytes_per_block = bytes_per_block
        self.lru = SlotLRU(budget_bytes // (bytes_per_block + _HEADER.size))
        self.num_write_failures = 0
        self.num_corrupt = 0
        self._logged = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._fail("cannot create directory", exc)

    def __contains__(self, key: bytes) -> bool:
        return key in self.lru

    def write(self, key: bytes, payload: bytes) -> list[bytes]:
        """Stores one block; returns the keys evicted (their files deleted). Never raises."""
        assert len(key) == 16 and len(payload) == self.bytes_per_block
        if key in self.lru or self.lru.num_slots == 0:
            return []
        header = _HEADER.pack(_MAGIC, _VERSION, key, len(payload), zlib.crc32(payload))
        path, tmp = self._path(key), self._path(key).with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as exc:
            self._fail(f"cannot write {path}", exc)
            _unlink(tmp)
            return []
        _, evicted = self.lru.allocate(key)
        if evicted is None:
            return []
        _unlink(self._path(evicted[0]))  # type: ignore[arg-type]
        return [evicted[0]]  # type: ignore[list-item]

    def read(self, key: bytes) -> bytes | None:
        """The block's payload, or None for a miss (absent, unreadable or corrupt: dropped)."""
        if key not in self.lru:
            return None
        self.lru.touch(key)
        try:
            raw = self._path(key).read_bytes()
        except OSError:
            self.remove(key)
            return None
        if not self._valid(key, raw):
            self.num_corrupt += 1
            log.warning("kvtransfer nvme tier: corrupt block file %s dropped", self._path(key))
            self.remove(key)
            return None
        return raw[_HEADER.size :]

    def remove(self, key: bytes) -> None:
        if self.lru.remove(key) is not None:
            _unlink(self._path(key))

    def _valid(self, key: bytes, raw: bytes) -> bool:
        if len(raw) != _HEADER.size + self.bytes_per_block:
            return False
        magic, version, file_key, length, crc = _HEADER.unpack_from(raw)
        payload = memoryview(raw)[_HEADER.size :]
        return (magic, version, file_key, length) == (
            _MAGIC,
            _VERSION,
            key,
            self.bytes_per_block,
        ) and zlib.crc32(payload) == crc

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}{_SUFFIX}"

    def _fail(self, what: str, exc: OSError) -> None:
        self.num_write_failures += 1
        if not self._logged:
            self._logged = True
            log.error("kvtransfer nvme tier degraded to misses: %s: %s", what, exc)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
