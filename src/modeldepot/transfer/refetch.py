"""A file that failed the upstream's SHA-256 after chunks from other nodes, fetched again.

Each chunk from another node matched the digest a node gave for it (its manifest, its chunk's settlement),
or came from a partial holder outside a swarm, unchecked: the upstream's SHA-256 says one of them lied. The
bytes are gone (the download was reset), and the file is fetched again, as the first time (the swarm's
way: from the upstream alone, each node of a fleet a lying holder fooled fetched the whole file, and the
Hub sent it once per node: 4.7x with four, an explorer's trial), without the nodes that may have lied:

- one suspect (it sent every chunk the upstream did not): it is left out;
- several: one chunk of the upstream's, on which their words differ, says who lied there
  (:mod:`~modeldepot.transfer.disputes`); those are left out, the others asked again. A chunk that
  matches no word, none in dispute, or a failed look: every suspect is left out;
- a try that fails again with other nodes' chunks (a node the upstream's chunk cleared lied elsewhere in
  the file, or another one took part): the upstream alone.

A node is banned for long, and remembered by the store (:mod:`~modeldepot.transfer.liars`), only once the
upstream's bytes say it sent chunks that are not the file's (banned at once, an honest node was named the
liar of a chunk the Hub had garbled: a review); the others are let back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from modeldepot.errors import DepotError, IntegrityError
from modeldepot.hashing import BlobDigest
from modeldepot.hub.manifest import RemoteFile
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.choosing import left_out
from modeldepot.transfer.disputes import caught_by_upstream, disputed_chunk
from modeldepot.transfer.download import (
    BAN_SECONDS,
    BytesDone,
    BytesReceiving,
    FileSource,
    Limits,
    ban_liars,
    download_file,
    liars,
)
from modeldepot.transfer.liars import remember_liars
from modeldepot.transfer.progress import PullTracker
from modeldepot.transfer.session import LazySession
from modeldepot.transfer.swarm import SwarmFile

__all__ = ["LIAR_BAN_SECONDS", "FileTry", "fetch_again"]

log = logging.getLogger("modeldepot.transfer.pull")  # (one logger for a pull's story)

# A node found to have sent chunks other than a file's, by the upstream's own bytes (not a blip: its digests
# vouched for its wrong bytes), gets no chunk from this process for so long (a chunk failing its check: 30 s)
LIAR_BAN_SECONDS = 600.0


@dataclass
class FileTry:
    """One file's transfer as a pull runs it: what trying it again takes."""

    http: LazySession
    remote: RemoteFile
    claim: ResumablePartial
    nodes: list[FileSource]  # the other nodes that hold it (configured servers, the fleet's holders)
    hub: list[FileSource]  # the upstream
    limits: Limits
    on_bytes: BytesDone
    on_start: Callable[[BytesReceiving, BytesReceiving], None]
    join_swarm: Callable[[], Awaitable[SwarmFile | None]]  # the file's claims in the fleet, or None
    tracker: PullTracker
    home: Path  # the store's, where the liars found are remembered


async def fetch_again(file: FileTry, mismatch: IntegrityError) -> BlobDigest:
    """The digests of ``file`` fetched again after ``mismatch`` (the whole file's SHA-256 failed); raises
    ``mismatch`` when it was not the nodes' doing (the file's own digest, the upstream's own bytes) or the
    tries again fail."""
    remote, claim, tracker = file.remote, file.claim, file.tracker
    kinds = set(tracker.path_sources.get(remote.path, {}))
    if claim.done or kinds <= {"hub"}:
        if not claim.done:  # (thrown away: not "kept" in the status a failed pull leaves)
            tracker.forget(remote.path)
        raise mismatch  # not the whole file's digest (the download was not reset), or the upstream's own bytes
    suspects = {name for senders, _ in (mismatch.chunks_landed or {}).values() for name in senders}
    tracker.forget(remote.path)
    cleared: dict[str, Callable[[], None]] = {}  # the nodes left out, each with what lets it back
    out: set[str] = set()
    if suspects and "local" not in kinds:
        out, settled = await _left_out(file, mismatch, suspects)
        cleared = {name: left_out(name, BAN_SECONDS) for name in sorted(out)}
        log.warning("%s: with chunks from %s%s it failed the upstream's SHA-256 (thrown away)%s; fetching "
                    "the file again without %s", remote.path, " and ".join(sorted(suspects)),
                    " alone" if len(suspects) == 1 else "", settled, "it" if len(out) == 1 else "them")  # fmt: skip
        honest = [node for node in file.nodes if node.source.name not in out]
        swarm = await file.join_swarm()
        if swarm is not None:
            again, fallback = [*honest, *file.hub], None
        else:
            again, fallback = (honest, lambda: file.hub) if honest else (file.hub, None)
    else:
        # (no other node took part: the bytes an earlier pull left were wrong, not a node, an SRE's trial)
        others = kinds - {"hub", "local"}
        whose = "chunks from other nodes" if others else "the bytes an earlier pull of it left on disk"
        log.warning("%s: with %s it failed the upstream's SHA-256 (thrown away); fetching it again from the "
                    "upstream alone", remote.path, whose)  # fmt: skip
        again, fallback, swarm = file.hub, None, None
    refuted = [mismatch]  # the tries that failed the upstream's SHA-256, by what landed in each
    try:
        try:
            digest = await download_file(file.http, remote, claim, again, file.limits, fallback, file.on_bytes,
                                         swarm, file.on_start)  # fmt: skip
        except IntegrityError as still:
            if still.chunks_landed is None or not any(senders for senders, _ in still.chunks_landed.values()):
                raise  # (not the whole file's digest, or the upstream's own bytes: fetched again, as bad)
            # Other nodes sent chunks again: a node the upstream's chunk cleared lied elsewhere in the file,
            # or another one took part (a second liar; before the fleet's way was tried again, several
            # suspects meant the upstream alone, which the pull then never failed: a review)
            refuted.append(still)
            tracker.forget(remote.path)
            log.warning("%s: without %s it failed the upstream's SHA-256 again (thrown away); fetching it "
                        "again from the upstream alone", remote.path, " and ".join(sorted(out)))  # fmt: skip
            digest = await download_file(file.http, remote, claim, file.hub, file.limits, None, file.on_bytes,
                                         None, file.on_start)  # fmt: skip
    except DepotError as again_failed:
        if not claim.done:
            tracker.forget(remote.path)
        raise mismatch from again_failed
    await _judge(file, refuted, digest, cleared)
    return digest


async def _left_out(file: FileTry, mismatch: IntegrityError, suspects: set[str]) -> tuple[set[str], str]:
    """The suspects the next try leaves out, and what settled it (said in the warning): the nodes that sent
    every chunk the upstream did not; of several, those one chunk of the upstream's says lied, when it
    says (the others are asked again)."""
    if len(suspects) > 1 and (dispute := disputed_chunk(mismatch, suspects, file.nodes)) is not None:
        index, said = dispute
        caught, fetched = await caught_by_upstream(
            file.hub[0], file.remote.size, file.claim.chunk_size, index, said, file.limits
        )
        file.tracker.fetched += fetched
        if caught:
            return caught, f"; its chunk {index} from the upstream says {' and '.join(sorted(caught))} lied"
    return set(suspects), ""


async def _judge(
    file: FileTry, refuted: list[IntegrityError], digest: BlobDigest, cleared: dict[str, Callable[[], None]]
) -> None:
    """Name and ban the nodes whose chunks in the failed tries the file's right digests refute (for long,
    in the store too: its next pull leaves them alone); let the others left out back."""
    found: dict[str, int] = {}
    for failed in refuted:
        for name, count in liars(failed, digest).items():
            found[name] = found.get(name, 0) + count
    for name, let_back in cleared.items():
        if name not in found:
            let_back()
    if not found:
        return
    ban_liars(found, LIAR_BAN_SECONDS)
    await asyncio.to_thread(remember_liars, file.home, found, LIAR_BAN_SECONDS)
    log.warning("%s: %s sent chunks that are not the file's (checked against the upstream's bytes): no chunk "
                "is asked of %s for %.0f minutes", file.remote.path,
                ", ".join(f"{name} ({count} chunk{'s' if count > 1 else ''})" for name, count in found.items()),
                "it" if len(found) == 1 else "them", LIAR_BAN_SECONDS / 60)  # fmt: skip
