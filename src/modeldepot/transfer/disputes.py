"""Which of several nodes lied about a file, settled by one chunk of the upstream's.

A file that failed the upstream's SHA-256 with chunks from one node besides the upstream is fetched again
without that node. With chunks from several (a node that came late took them from a lying complete holder
and from honest nodes that held the file by then), it was fetched again from the upstream alone: one more
copy per late node (2.2x for three nodes in CI, where 1.0x is the aim). The nodes' own words usually say
where they differ: the digest each chunk landed with (its sender's), and a complete holder's list of
digests as this pull knows it (its own, or the scan node's, which its chunks were checked against). One chunk on which they differ, fetched from the upstream, says who lied there; the file is then
fetched again, the swarm's way, without them.

The upstream's chunk decides only when it matches one of the words: a chunk the upstream garbled matches
none, and no node is taken for a liar on it (the file's digests, once it is fetched again whole, are what
names and bans a liar: :func:`~modeldepot.transfer.download.liars`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping

import blake3

from modeldepot.errors import DepotError, IntegrityError
from modeldepot.transfer.choosing import FileSource
from modeldepot.transfer.download import Limits
from modeldepot.transfer.threads import to_thread_to_the_end

__all__ = ["caught_by_upstream", "disputed_chunk"]

log = logging.getLogger(__name__)


def disputed_chunk(
    mismatch: IntegrityError, suspects: Collection[str], holders: Iterable[FileSource]
) -> tuple[int, dict[str, str]] | None:
    """A chunk on which the suspects' words differ, with each one's digest of it (name -> BLAKE3), or None
    when they never do. A suspect's word is the digest a chunk it alone sent landed with, and its list of
    digests as this pull knows it, when it has one (a complete holder: its own, or the scan node's). Of the chunks in dispute, the one most suspects spoke of
    (the lowest such index: a choice that does not change from one look to the next)."""
    words: dict[int, dict[str, str]] = {}
    for index, (senders, landed_as) in (mismatch.chunks_landed or {}).items():
        if len(senders) == 1:  # (a chunk whose part came from another sender is no one suspect's word)
            [name] = senders
            words.setdefault(index, {})[name] = landed_as
    for holder in holders:
        name = holder.source.name
        if name in suspects and holder.chunk_blake3:
            for index, digest in enumerate(holder.chunk_blake3):
                words.setdefault(index, {}).setdefault(name, digest)
    disputed = [(-len(said), index) for index, said in words.items() if len(set(said.values())) > 1]
    if not disputed:
        return None
    _, index = min(disputed)
    return index, words[index]


async def caught_by_upstream(
    upstream: FileSource, size: int, chunk_size: int, index: int, said: Mapping[str, str], limits: Limits
) -> tuple[set[str] | None, int]:
    """The suspects whose word on chunk ``index`` differs from the upstream's bytes of it, fetched (under a
    buffer slot of ``limits``, as every chunk of the pull), with the bytes fetched; None for the suspects
    when the upstream's chunk matches no word (garbled on its way, or every suspect lied: nobody is caught
    on it) or cannot be fetched."""
    start = index * chunk_size
    end = min(size, start + chunk_size) - 1
    length = end - start + 1
    async with limits.buffer_slot():
        buffer = limits.take_buffer(length)
        try:
            data = await upstream.source.fetch(upstream.url, start, end, size, buffer)
        except (DepotError, OSError) as error:  # (a failed look settles nothing: every suspect stays out)
            log.warning("chunk %d from the upstream, to settle which node lied, could not be fetched (%s): "
                        "every node that sent chunks is left out", index, error)  # fmt: skip
            limits.give_back(buffer)
            return None, 0
        try:
            # (to its end: a cancelled pull's buffer is still read by the thread, a BufferError on release)
            true = await to_thread_to_the_end(_blake3_hex, data)
        finally:
            data.release()
        limits.give_back(buffer)
    if true not in said.values():
        log.warning("chunk %d from the upstream matches no node's digest of it (garbled on its way?): every "
                    "node that sent chunks is left out", index)  # fmt: skip
        return None, length
    return {name for name, digest in said.items() if digest != true}, length


def _blake3_hex(data: memoryview) -> str:
    return blake3.blake3(data).hexdigest()
