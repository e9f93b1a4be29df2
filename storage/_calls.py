"""The call journal: which handler calls were running when the process died.

A death may only be blamed on the events whose handler call had started (a crash loop
is broken by counting those deaths as failed attempts), so the journal must say
exactly which calls were in flight, without a commit per call. It is a small file
beside the log, mapped into memory: starting or ending a call is a store into a slot
(about 0.1 us), no system call, no fsync. The kernel keeps the mapped pages when the
process is killed, so the next open reads what was in flight at the instant of the
kill. (A power loss may leave the file stale; it then blames calls of an earlier
instant: at most the calls of one moment, never a whole backlog.)

Layout (little-endian): a header page ``b"EVBCALLS"``, version, generation; then one
region per subscription, page-aligned: a header page with its name, slot count and
slot width, then the slots. A slot is ``count`` (u32, 0 when empty), padding, and up
to ``width`` sequence numbers (u64). A call is written seqs first, count last, so a
kill half-way through leaves the slot empty: the handler had not been called yet.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Protocol

_MAGIC = b"EVBCALLS"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQ")  # magic, version, padding, generation
_REGION = struct.Struct("<4sIIIQ")  # magic, slots, width, name length, region size
_REGION_MAGIC = b"RGN1"
_COUNT = struct.Struct("<I")
_PAGE = mmap.PAGESIZE


class CallSlots(Protocol):
    """One subscription's slots in the call journal: ``slots`` calls at once, each of
    at most ``width`` events. Both methods are plain (non-async) and cheap: they run
    just before and just after a handler call."""

    def started(self, slot: int, seqs: Sequence[int]) -> None:
        """A handler call holding ``seqs`` starts in ``slot``."""

    def ended(self, slot: int) -> None:
        """The call in ``slot`` returned (or was abandoned): it can no longer be
        blamed for a death."""


class NoCallSlots:
    """Slots that remember nothing: for logs that do not outlive the process."""

    def started(self, slot: int, seqs: Sequence[int]) -> None:
        return None

    def ended(self, slot: int) -> None:
        return None


class _MappedSlots:
    """A region of the journal file, mapped into memory."""

    def __init__(self, mapped: mmap.mmap, base: int, slots: int, width: int) -> None:
        self._map = mapped
        self._base = base  # offset of slot 0 within the mapping
        self._stride = 8 + 8 * width
        self._slots = slots
        self._width = width
        # The mapping as 8-byte words, on a little-endian machine (the file's order):
        # slots are 8-byte aligned, a count and its zero padding one word, and storing
        # a word costs a tenth of a struct.pack_into (measured: 6,100 instructions
        # per started and ended call before, a handler call's main cost on a file).
        self._words = memoryview(mapped).cast("q") if sys.byteorder == "little" else None
        self._word_at = [(base + slot * self._stride) >> 3 for slot in range(slots)]

    def started(self, slot: int, seqs: Sequence[int]) -> None:
        if not 0 <= slot < self._slots or len(seqs) > self._width:
            raise ValueError(
                f"call journal slot {slot} of {self._slots} cannot hold {len(seqs)} events "
                f"(width {self._width})"
            )
        words = self._words
        if words is not None:
            at = self._word_at[slot]
            n = len(seqs)
            if n == 1:
                words[at + 1] = seqs[0]
            else:
                words[at + 1 : at + 1 + n] = array("q", seqs)
            words[at] = n  # last: the call now counts
            return
        at = self._base + slot * self._stride
        if len(seqs) == 1:
            struct.pack_into("<q", self._map, at + 8, seqs[0])
        else:
            data = array("q", seqs).tobytes()
            self._map[at + 8 : at + 8 + len(data)] = data
        _COUNT.pack_into(self._map, at, len(seqs))  # last: the call now counts

    def ended(self, slot: int) -> None:
        words = self._words
        if words is not None:
            words[self._word_at[slot]] = 0
            return
        _COUNT.pack_into(self._map, self._base + slot * self._stride, 0)

    def release(self) -> None:
        """Let go of the mapping (before it is closed)."""
        if self._words is not None:
            self._words.release()


def _round_up(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


class CallJournal:
    """The journal file of one process's life on a log (see the module docstring).

    Created by the log's owner at open, after the previous life's journal has been
    read (:func:`read_journal`) and its deaths recorded in the log.
    """

    def __init__(self, path: str, generation: int) -> None:
        self.path = path
        self.generation = generation
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = bytearray(_PAGE)
            _HEADER.pack_into(header, 0, _MAGIC, _VERSION, 0, generation)
            os.write(fd, header)
            os.replace(tmp, path)  # atomic: a reader sees the old journal or this one
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = _PAGE
        self._maps: list[mmap.mmap] = []
        self._regions: list[_MappedSlots] = []

    def region(self, name: str, slots: int, width: int) -> CallSlots:
        """Allocate ``slots`` slots of ``width`` events for subscription ``name``."""
        encoded = name.encode()
        head = _round_up(_REGION.size + len(encoded))
        size = head + _round_up(slots * (8 + 8 * width))
        offset = self._size
        os.ftruncate(self._fd, offset + size)  # zero-filled: every slot empty
        mapped = mmap.mmap(self._fd, size, offset=offset)
        mapped[_REGION.size : _REGION.size + len(encoded)] = encoded
        # The region header last: a reader that finds it finds the name too.
        _REGION.pack_into(mapped, 0, _REGION_MAGIC, slots, width, len(encoded), size)
        self._size = offset + size
        self._maps.append(mapped)
        region = _MappedSlots(mapped, head, slots, width)
        self._regions.append(region)
        return region

    def close(self) -> None:
        """Unmap and close the file (it stays on disk, with every slot empty if every
        call ended)."""
        for region in self._regions:
            region.release()
        self._regions.clear()
        for mapped in self._maps:
            mapped.close()
        self._maps.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_journal(path: str) -> tuple[int, dict[str, list[int]]] | None:
    """The generation of the journal at ``path`` and, per subscription, the seqs of
    the calls in flight when it was last written; None if there is no journal.

    A truncated or foreign file yields what could be read (possibly nothing).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, version, _, generation = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        return None
    inflight: dict[str, list[int]] = {}
    offset = _PAGE
    while offset + _REGION.size <= len(data):
        tag, slots, width, name_len, size = _REGION.unpack_from(data, offset)
        if tag != _REGION_MAGIC or size <= 0 or offset + size > len(data):
            break
        name = data[offset + _REGION.size : offset + _REGION.size + name_len].decode(
            errors="replace"
        )
        base = offset + _round_up(_REGION.size + name_len)
        stride = 8 + 8 * width
        for slot in range(slots):
            at = base + slot * stride
            (count,) = _COUNT.unpack_from(data, at)
            if 0 < count <= width:
                seqs = array("q")
                seqs.frombytes(data[at + 8 : at + 8 + 8 * count])
                inflight.setdefault(name, []).extend(seqs)
        offset += size
    return generation, inflight
