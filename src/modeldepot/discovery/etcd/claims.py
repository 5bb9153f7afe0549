"""Chunk claims in etcd: which node fetches which chunk of a file the fleet pulls at once.

A claim is taken by a transaction that puts it only if the key does not exist (``create_revision == 0``) or
still is the claim being taken over (``mod_revision`` equal to the one named), and otherwise reads the
winner's; it hangs on the claiming process's lease (a process that only pulls, and never registers, gets a
lease of its own on its first claim), so a claimer's claims go with it. Settling a claim (its BLAKE3) and
releasing it compare the ``mod_revision`` too: a claim taken over is never overwritten or deleted."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from modeldepot.discovery.base import ChunkClaim, validate_node_id
from modeldepot.discovery.etcd.connection import EtcdConnection
from modeldepot.discovery.etcd.wire import FleetKey, encode, txn_revision
from modeldepot.validation import validate_blake3, validate_sha256, validate_size


class EtcdClaims(EtcdConnection):
    """This process's chunk claims, and the settlements etcd has not taken yet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # (EtcdConnection's; EtcdDiscovery names them)
        super().__init__(*args, **kwargs)
        self._mine: dict[tuple[str, int], dict[int, ChunkClaim]] = {}  # this process's claims, by chunk
        # Settlements (a claimed chunk's BLAKE3) etcd did not take yet: an outage must not lose one (peers
        # take a claimed chunk only once its BLAKE3 is known), so the writer sends them when etcd is back.
        self._unsettled: dict[tuple[str, int], dict[int, str]] = {}

    def _claims_seen(self, claims: dict[tuple[str, int], dict[int, ChunkClaim]]) -> None:
        """A snapshot of every claim came in: a claim of ours missing from it went (a lease ran out)."""
        for content, mine in list(self._mine.items()):
            held = claims.get(content, {})
            for index, claim in list(mine.items()):
                if index not in held or held[index].revision != claim.revision:
                    del mine[index]

    def _claim_changed(self, key: FleetKey, entry: object, revision: int, lease: int) -> None:
        """A claim's key was put (``entry`` the claim, None when malformed) or deleted (``entry`` None)."""
        if isinstance(entry, ChunkClaim):
            self._set_claim(key.sha256, key.chunk_size, key.chunk, entry)
        else:
            self._drop_claim(key.sha256, key.chunk_size, key.chunk, revision)
        mine = self._mine.get((key.sha256, key.chunk_size))
        if mine is not None and key.chunk in mine and mine[key.chunk].revision < revision:
            if isinstance(entry, ChunkClaim) and self._lease_id is not None and lease == self._lease_id:
                mine[key.chunk] = entry  # ours, settled (the answer to our write may come later)
            else:
                del mine[key.chunk]  # gone with a lease, or taken over: no longer ours
        self._changed()

    def _forget_claims(self) -> None:
        """The lease went: the claims hung on it, and so did what there was to settle."""
        self._mine.clear()
        self._unsettled.clear()

    async def claim_chunk(
        self, sha256: str, chunk_size: int, index: int, node_id: str, replaces: int = 0
    ) -> ChunkClaim | None:
        validate_sha256(sha256)
        validate_node_id(node_id)
        key = self._keys.claim(sha256, validate_size(chunk_size), validate_size(index))
        if not self._started or self._closed:
            return None
        client = self._client
        try:
            if self._lease_id is None:
                async with self._write_lock:
                    if self._lease_id is None:
                        await self._grant_lease(client)
            lease = self._lease_id
            tx = client.transactions
            guard = tx.create(key) == 0 if replaces == 0 else tx.mod(key) == replaces
            value = encode(ChunkClaim(node_id, None, 0).to_dict())
            won, responses = await self._call(
                client.transaction(
                    compare=[guard], success=[tx.put(key, value, lease=lease)], failure=[tx.get(key)]
                )
            )
        except Exception as error:
            self._failed(error, client, during="claim")
            return None
        self._answered("claim")
        if won:
            revision = txn_revision(responses)
            claim = ChunkClaim(node_id, None, revision)
            if lease == self._lease_id:
                self._mine.setdefault((sha256, chunk_size), {})[index] = claim
            self._set_claim(sha256, chunk_size, index, claim)
            self._changed()
            return claim
        found = responses[0] if responses else []
        if not found:  # the claim taken over is gone already (its lease ran out): nobody holds it now
            return await self.claim_chunk(sha256, chunk_size, index, node_id) if replaces else None
        value_found, meta = found[0]
        parsed = self._parse(key, value_found, int(meta.mod_revision))
        if parsed is None:
            return None  # malformed (warned): the caller fetches it itself
        winner = parsed[1]
        assert isinstance(winner, ChunkClaim)
        self._set_claim(sha256, chunk_size, index, winner)
        self._changed()
        return winner

    async def settle_claim(self, sha256: str, chunk_size: int, index: int, blake3: str) -> None:
        """Write the chunk's BLAKE3 into this process's claim. When etcd does not take it (an outage), the
        settlement is kept and the writer sends it once etcd answers again: a claim left unsettled keeps
        every peer from taking the chunk from this node, and the Hub from being asked for it, until the
        claim goes late (what an etcd restart mid-swarm did to every pull)."""
        validate_blake3(blake3)
        ours = self._mine.get((sha256, chunk_size), {}).get(index)
        if ours is None or self._closed or self._lease_id is None:
            return
        content = (sha256, chunk_size)
        if self._unsettled or not self._connected:
            # etcd is out of reach, or settlements wait already: queued behind them, not a deadline each
            # (a pull's workers await this), the writer sends them in order when etcd answers.
            self._unsettled.setdefault(content, {})[index] = blake3
            self._wake.set()
            return
        client = self._client
        try:
            await self._settle(client, content, index, blake3)
        except Exception as error:
            self._unsettled.setdefault(content, {})[index] = blake3
            self._failed(error, client, during="claim")

    async def _settle(self, client: Any, content: tuple[str, int], index: int, blake3: str) -> None:
        """Settle one claim of this process, if it still is ours: a compare on its ``mod_revision`` (a claim
        taken over is never overwritten). Raises when etcd does not answer."""
        mine = self._mine.get(content, {})
        ours = mine.get(index)
        if ours is None or self._lease_id is None:
            return  # gone with its lease, taken over, or released
        sha256, chunk_size = content
        key = self._keys.claim(sha256, chunk_size, index)
        claim = ChunkClaim(ours.node_id, blake3, 0)
        tx = client.transactions
        won, responses = await self._call(client.transaction(
            compare=[tx.mod(key) == ours.revision],
            success=[tx.put(key, encode(claim.to_dict()), lease=self._lease_id)], failure=[tx.get(key)],
        ))  # fmt: skip
        if won:
            revision = txn_revision(responses)
        else:
            # A settlement retried after a lost answer finds its own write there (this node's claim with
            # this BLAKE3, on this lease): it is settled. Anything else: the claim was taken over.
            found = responses[0] if responses else []
            if not found:  # gone (its lease ran out): nothing to settle
                mine.pop(index, None)
                return
            value, meta = found[0]
            revision = int(meta.mod_revision)
            parsed = self._parse(key, value, revision)
            if (
                parsed is None
                or parsed[1] != ChunkClaim(ours.node_id, blake3, revision)
                or int(meta.lease) != self._lease_id
            ):
                mine.pop(index, None)
                return
        settled = ChunkClaim(claim.node_id, claim.blake3, revision)
        mine[index] = settled
        self._set_claim(sha256, chunk_size, index, settled)
        self._changed()

    async def _write_settlements(self, client: Any) -> None:
        """Send the settlements etcd did not take (in the order they came), each dropped once written or
        once its claim is no longer this process's; raises at the first that etcd does not answer."""
        for content in list(self._unsettled):
            pending = self._unsettled.get(content, {})  # (a release meanwhile drops a content's)
            for index in list(pending):
                await self._settle(client, content, index, pending[index])
                pending.pop(index, None)
            if not pending and self._unsettled.get(content) is pending:
                del self._unsettled[content]

    async def release_claims(
        self, sha256: str, chunk_size: int, chunks: Collection[int] | None = None
    ) -> None:
        content = (sha256, chunk_size)
        if chunks is None:
            mine = self._mine.pop(content, {})
            self._unsettled.pop(content, None)  # released: nothing left to settle
        else:  # (kept as this process's until deleted: a release cancelled midway leaves them to the last one)
            held = self._mine.get(content, {})
            mine = {index: held[index] for index in chunks if index in held}
        if not mine or self._closed:
            return
        client = self._client
        tx = client.transactions

        async def release(index: int, revision: int) -> None:
            key = self._keys.claim(sha256, chunk_size, index)
            await self._call(client.transaction(compare=[tx.mod(key) == revision], success=[tx.delete(key)],
                                                failure=[]))  # fmt: skip
            self._drop_claim(sha256, chunk_size, index, revision)
            if chunks is not None:
                held = self._mine.get(content, {})
                if (claim := held.get(index)) is not None and claim.revision == revision:
                    del held[index]
                self._unsettled.get(content, {}).pop(index, None)

        results = await asyncio.gather(
            *(release(i, c.revision) for i, c in mine.items()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:  # left to the lease: they go when this process ends
            self._failed(errors[0], client, during="claim")
        self._changed()
