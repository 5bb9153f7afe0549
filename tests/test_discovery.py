"""Discovery against a real etcd (tests/etcdserver.py) and in memory: membership, holdings, the publish diff
and its batches, leases (close, a killed process), outages (etcd killed and restarted, one node cut off,
etcd hung, etcd compacted), malformed entries, the static backend and open_discovery.

Every wait is on the discovery's own change event (``wait_for``) or on a process; nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import aetcd
import pytest

from conftest import closed_port, free_port
from etcdserver import EtcdServer, TcpGate
from modeldepot.discovery import ClusterStatus, Holding, NodeRecord, open_discovery
from modeldepot.discovery.etcd import MAX_TXN_OPS, EtcdDiscovery
from modeldepot.discovery.mem import MemDiscovery, MemRegistry, mem_registry
from modeldepot.discovery.static import StaticDiscovery
from modeldepot.errors import ConfigError, InvalidInputError

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
WAIT = 10.0  # seconds any awaited view change may take (they take milliseconds)
WHOLE = Holding(size=100, complete=True, chunks_done=1, chunks=1)
HALF = Holding(size=4 << 20, complete=False, chunks_done=1, chunks=4)


def run(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 45))


def sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def node(name: str) -> NodeRecord:
    node_id = hashlib.sha256(name.encode()).hexdigest()[:32]  # 32 hex digits, like a store id
    return NodeRecord(node_id, f"http://{name}.test:8980", "1.2.3", 1_700_000_000.5)


def etcd(server: EtcdServer | TcpGate, ttl: float = 10.0, timeout: float = 3.0) -> EtcdDiscovery:
    port = server.client_port if isinstance(server, EtcdServer) else server.port
    return EtcdDiscovery([("127.0.0.1", port)], ttl=ttl, timeout=timeout)


@contextlib.asynccontextmanager
async def started(*discoveries: EtcdDiscovery | MemDiscovery) -> AsyncIterator[None]:
    try:
        for discovery in discoveries:
            await discovery.start()
        yield
    finally:
        for discovery in discoveries:
            await discovery.close()


@contextlib.asynccontextmanager
async def raw(server: EtcdServer) -> AsyncIterator[Any]:
    async with aetcd.Client("127.0.0.1", server.client_port, timeout=5) as client:
        yield client


async def keys(client: Any, prefix: bytes = b"/modeldepot/") -> dict[bytes, Any]:
    return {kv.key: kv for kv in await client.get_prefix(prefix)}


async def revision(client: Any) -> int:
    return int((await client.get_prefix(b"/nothing-here/")).header.revision)


def ids(discovery: EtcdDiscovery | MemDiscovery) -> list[str]:
    return [n.node_id for n in discovery.peers()]


# -- etcd: membership and holdings ------------------------------------------------------------------------


def test_nodes_see_each_other_and_each_others_holdings(etcd_server: EtcdServer) -> None:
    a, b, c = node("a"), node("b"), node("c")

    async def main() -> None:
        da, db, dc = etcd(etcd_server), etcd(etcd_server), etcd(etcd_server)
        async with started(da, db, dc):
            for discovery, record in ((da, a), (db, b), (dc, c)):
                await discovery.register(record)
            everyone = sorted(r.node_id for r in (a, b, c))
            for discovery in (da, db, dc):
                await discovery.wait_for(lambda d=discovery: ids(d) == everyone, WAIT)
                assert discovery.status() == ClusterStatus(
                    "etcd", True, True, None, discovery.status().since, peers=3
                )
            assert da.peers() == sorted([a, b, c], key=lambda r: r.node_id)  # the records, field by field

            await da.publish({sha(1): WHOLE, sha(2): HALF})
            await db.publish({sha(2): WHOLE})
            holders = await dc.wait_for(lambda: len(dc.holders(sha(2))) == 2 and dc.holders(sha(2)), WAIT)
            assert [(h.node, h.holding) for h in holders] == [(b, WHOLE), (a, HALF)]  # complete ones first
            assert [(h.node, h.holding) for h in dc.holders(sha(1))] == [(a, WHOLE)]
            assert dc.holders(sha(3)) == []
            assert dc.holdings_of(a.node_id) == {sha(1): WHOLE, sha(2): HALF}
            assert da.holdings_of(a.node_id) == {sha(1): WHOLE, sha(2): HALF}  # its own, at once
            assert dc.holdings_of("0" * 32) == {}

    run(main())


def test_publish_writes_only_the_difference_in_transactions_of_at_most_128(etcd_server: EtcdServer) -> None:
    a = node("a")
    many = {sha(i): Holding(size=i, complete=i % 2 == 0, chunks_done=0, chunks=3) for i in range(300)}

    async def main() -> None:
        da, db = etcd(etcd_server), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await da.register(a)
            before = await revision(client)
            await da.publish(many)  # with etcd up, an awaited publish is in etcd when it returns
            after = await revision(client)
            assert MAX_TXN_OPS == 128 and after - before == 3  # 128 + 128 + 44: a revision per transaction
            stored = await keys(client, b"/modeldepot/holdings/")
            assert len(stored) == 300 and {kv.lease for kv in stored.values()} == {da._lease_id}
            value = json.loads(stored[f"/modeldepot/holdings/{sha(7)}/{a.node_id}".encode()].value)
            assert value == {"size": 7, "complete": False, "chunks_done": 0, "chunks": 3}
            await db.wait_for(lambda: db.holdings_of(a.node_id) == many, WAIT)  # all arrived

            await da.publish(dict(many))  # the same set again: nothing is written
            await da.register(a)  # nor for the same record
            assert await revision(client) == after

            smaller = {s: h for i, (s, h) in enumerate(many.items()) if i >= 10}
            smaller[sha(299)] = WHOLE  # one changed
            await da.publish(smaller)
            assert await revision(client) == after + 1  # 10 deletes and 1 put: one transaction
            assert len(await keys(client, b"/modeldepot/holdings/")) == 290
            await db.wait_for(lambda: db.holdings_of(a.node_id) == smaller, WAIT)
            assert db.holders(sha(0)) == [] and db.holders(sha(299))[0].holding == WHOLE

    run(main())


class Statuses:
    """``discovery``'s ``registered``, at each change of its view or status (health's flaps, all of them)."""

    def __init__(self, discovery: EtcdDiscovery) -> None:
        self.registered: list[bool] = []
        changed = discovery._changed

        def record() -> None:
            self.registered.append(discovery.status().registered)
            changed()

        discovery._changed = record  # type: ignore[method-assign]


class WatchFirst:
    """Holds back the answers to ``discovery``'s next ``times`` transactions until its watch has shown what
    they did (``until()``, of its view, is true): the order of events the user's node saw, made certain.
    ``meanwhile()``, if given, runs first (someone else's write while this node's is on its way)."""

    def __init__(self, discovery: EtcdDiscovery, until: Any, times: int = 1, meanwhile: Any = None) -> None:
        self.until, self.times, self.held = until, times, 0
        transaction = discovery._client.transaction

        async def held_back(*args: Any, **kwargs: Any) -> Any:
            answer = await transaction(*args, **kwargs)
            if self.held < self.times:
                self.held += 1
                if meanwhile is not None:
                    await meanwhile()
                await discovery.wait_for(self.until, WAIT)
            return answer

        discovery._client.transaction = held_back


def test_a_nodes_own_deletes_are_no_lost_keys_even_when_the_watch_shows_them_first(
    etcd_server: EtcdServer,
) -> None:
    a, b = node("a"), node("b")

    async def main() -> None:
        da, db = etcd(etcd_server), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await da.register(a)
            await da.publish({sha(1): WHOLE, sha(2): HALF, sha(3): WHOLE})
            await db.register(b)
            await db.wait_for(lambda: len(db.holdings_of(a.node_id)) == 3, WAIT)
            record_key = f"/modeldepot/nodes/{a.node_id}".encode()
            registered_at = (await keys(client))[record_key].mod_revision
            statuses = Statuses(da)

            # A delete alone (an rm), then a delete and a change in one transaction.
            hook = WatchFirst(da, lambda: sha(1) not in da.holdings_of(a.node_id), times=2)
            await da.publish({sha(2): HALF, sha(3): WHOLE})
            assert hook.held == 1 and da.status().registered
            hook.until = lambda: da.holdings_of(a.node_id) == {sha(3): HALF}
            await da.publish({sha(3): HALF})
            assert hook.held == 2 and da.status().registered
            assert statuses.registered and all(statuses.registered)  # never "not registered" on the way
            assert not da._verify and not da._checking  # nothing to check, nothing to write again

            stored = await keys(client)
            assert stored[record_key].mod_revision == registered_at
            assert [k for k in stored if k.startswith(b"/modeldepot/holdings/")] == [
                f"/modeldepot/holdings/{sha(3)}/{a.node_id}".encode()
            ]
            await db.wait_for(lambda: db.holdings_of(a.node_id) == {sha(3): HALF}, WAIT)
            # What was deleted counts as not written: published again, it is written again.
            before = await revision(client)
            await da.publish({sha(1): WHOLE, sha(3): HALF})
            assert await revision(client) == before + 1
            await db.wait_for(lambda: db.holdings_of(a.node_id) == {sha(1): WHOLE, sha(3): HALF}, WAIT)
            assert all(statuses.registered)

    run(main())


def test_a_nodes_keys_deleted_by_someone_else_are_written_again(etcd_server: EtcdServer) -> None:
    a, b = node("a"), node("b")

    async def main() -> None:
        da, db = etcd(etcd_server), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await da.register(a)
            await da.publish({sha(1): WHOLE, sha(2): HALF})
            await db.register(b)
            await db.wait_for(lambda: len(db.holdings_of(a.node_id)) == 2, WAIT)
            record_key = f"/modeldepot/nodes/{a.node_id}".encode()
            mine = {sha(1): WHOLE, sha(2): HALF}
            statuses = Statuses(da)

            # Deleted by someone else, a holding then the record: noticed (not registered until checked),
            # and written again.
            for key in (f"/modeldepot/holdings/{sha(1)}/{a.node_id}".encode(), record_key):
                statuses.registered.clear()
                deleted_at = int((await client.delete(key)).header.revision)
                # Seen (and dropped from the view: the same event), then written again.
                await da.wait_for(lambda: False in statuses.registered, WAIT)
                await da.wait_for(
                    lambda: da.status().registered and a in da.peers() and da.holdings_of(a.node_id) == mine,
                    WAIT,
                )
                stored = await keys(client)
                assert stored[key].mod_revision > deleted_at and stored[key].lease == da._lease_id
                await db.wait_for(lambda: ids(db) == sorted([a.node_id, b.node_id]), WAIT)
                await db.wait_for(lambda: db.holdings_of(a.node_id) == mine, WAIT)

            # Someone else deletes a holding while this node's own delete of another is on its way (and
            # the watch shows both first): the own delete is no loss, the other one is written again.
            other = f"/modeldepot/holdings/{sha(2)}/{a.node_id}".encode()

            async def meanwhile() -> None:
                await client.delete(other)

            statuses.registered.clear()
            hook = WatchFirst(da, lambda: da.holdings_of(a.node_id) == {}, meanwhile=meanwhile)
            await da.publish({sha(2): HALF})
            assert hook.held == 1
            await da.wait_for(lambda: False in statuses.registered, WAIT)
            await da.wait_for(
                lambda: da.status().registered and da.holdings_of(a.node_id) == {sha(2): HALF}, WAIT
            )
            stored = await keys(client)
            assert other in stored and stored[other].lease == da._lease_id
            assert f"/modeldepot/holdings/{sha(1)}/{a.node_id}".encode() not in stored
            await db.wait_for(lambda: db.holdings_of(a.node_id) == {sha(2): HALF}, WAIT)

    run(main())


def test_close_removes_the_node_at_once(etcd_server: EtcdServer) -> None:
    a, b = node("a"), node("b")

    async def main() -> None:
        da, db = etcd(etcd_server, ttl=30), etcd(etcd_server, ttl=30)
        async with started(db), raw(etcd_server) as client:
            await da.start()
            await da.register(a)
            await da.publish({sha(1): WHOLE})
            await db.register(b)
            await db.wait_for(lambda: db.holders(sha(1)), WAIT)
            await da.close()  # revokes the lease: no waiting for its 30 s TTL
            assert not [k for k in await keys(client) if a.node_id.encode() in k]
            await db.wait_for(lambda: ids(db) == [b.node_id] and not db.holders(sha(1)), 2)
            assert da.status().connected is False and da.status().registered is False

    run(main())


def test_a_second_process_registering_the_same_node_id_is_told_to_the_first(etcd_server: EtcdServer) -> None:
    """Two `serve` on one store (one node id): the second's record replaced the first's, and the first still
    said registered and healthy, its log calling the second's record "not a valid fleet entry"."""
    first = node("a")
    second = NodeRecord(first.node_id, "http://elsewhere.test:8981", "1.2.3", 1_700_000_001.0)

    async def main() -> None:
        da, db = etcd(etcd_server, ttl=30), etcd(etcd_server, ttl=30)
        async with started(da):
            await da.register(first)
            await da.wait_for(lambda: da.status().registered, WAIT)
            await db.start()
            await db.register(second)
            status = await da.wait_for(lambda: da.status().conflict and da.status(), WAIT)
            assert not status.registered and "http://elsewhere.test:8981" in (status.conflict or "")
            assert db.status().conflict is None
            await db.close()  # the second leaves: the first writes its record again
            await da.wait_for(lambda: da.status().registered and da.status().conflict is None, WAIT)
            assert [n.url for n in da.peers()] == [first.url]

    run(main())


CHILD = """
import asyncio, sys, time
from modeldepot.discovery import Holding, NodeRecord
from modeldepot.discovery.etcd import EtcdDiscovery

async def main():
    port, node_id, digest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    discovery = EtcdDiscovery([("127.0.0.1", port)], ttl=2)
    await discovery.start()
    await discovery.register(NodeRecord(node_id, "http://child.test:8980", "1", time.time()))
    await discovery.publish({digest: Holding(size=1, complete=True, chunks_done=1, chunks=1)})
    print("registered", discovery.status().registered, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_killed_process_disappears_within_its_ttl(etcd_server: EtcdServer) -> None:
    child = node("child")

    async def main() -> None:
        db = etcd(etcd_server)
        async with started(db):
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(etcd_server.client_port), child.node_id, sha("c")],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert process.stdout is not None
            try:
                assert await asyncio.to_thread(process.stdout.readline) == "registered True\n"
                await db.wait_for(lambda: child.node_id in ids(db) and db.holders(sha("c")), WAIT)
                process.kill()  # no close(): the lease is not revoked, it runs out
            finally:
                process.kill()
                process.wait()
                process.stdout.close()
            killed = time.monotonic()
            await db.wait_for(lambda: not db.peers() and not db.holders(sha("c")), 2 + 2.5)
            assert time.monotonic() - killed > 0.5  # gone by the lease's expiry, not by anything else

    run(main())


# -- etcd: outages ------------------------------------------------------------------------------------------


def test_etcd_killed_and_restarted(etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    a, b, c = node("a"), node("b"), node("c")
    caplog.set_level(logging.INFO, "modeldepot.discovery")

    async def main() -> None:
        da, db = etcd(etcd_server), etcd(etcd_server)
        async with started(da, db):
            await da.register(a)
            await db.register(b)
            await da.publish({sha(1): WHOLE})
            await db.wait_for(lambda: db.holders(sha(1)) and len(db.peers()) == 2, WAIT)

            etcd_server.kill()  # SIGKILL
            for discovery in (da, db):
                status = await discovery.wait_for(
                    lambda d=discovery: not d.status().connected and d.status(), WAIT
                )
                assert status.last_error and status.since and not status.registered
            began = time.monotonic()
            await da.publish({sha(1): WHOLE, sha(2): HALF})  # kept, written when etcd returns
            await db.publish({sha(3): WHOLE})  # another node's change during the outage
            assert time.monotonic() - began < 1  # an outage does not make callers wait
            assert [h.node for h in da.holders(sha(1))] == [a]  # the last view answers
            assert len(da.peers()) == 2 and da.status().peers == 2

            await asyncio.to_thread(etcd_server.start)  # the same data folder and ports
            async with raw(etcd_server) as client:  # and a change right after it returns
                await client.put(f"/modeldepot/nodes/{c.node_id}".encode(), json.dumps(c.to_dict()).encode())
                await client.put(
                    f"/modeldepot/holdings/{sha(4)}/{c.node_id}".encode(), b'{"size":1,"complete":true}'
                )
                for discovery in (da, db):
                    await discovery.wait_for(
                        lambda d=discovery: d.status().connected and d.status().registered, WAIT
                    )
                await da.wait_for(lambda: da.holders(sha(3)) and da.holders(sha(4)), WAIT)
                await db.wait_for(lambda: db.holdings_of(a.node_id) == {sha(1): WHOLE, sha(2): HALF}, WAIT)
                assert len(da.peers()) == 3
                stored = await keys(client)
                assert f"/modeldepot/holdings/{sha(2)}/{a.node_id}".encode() in stored  # published while down
                assert stored[f"/modeldepot/nodes/{a.node_id}".encode()].lease == da._lease_id != 0
                assert da.status().last_error is None

    run(main())
    outages = [r for r in caplog.records if "out of reach" in r.getMessage()]
    assert len(outages) == 2, [r.getMessage() for r in outages]  # one per node per outage, not per retry


def test_a_node_cut_off_resumes_its_watch_without_missing_a_change(etcd_server: EtcdServer) -> None:
    a, b = node("a"), node("b")

    async def main() -> None:
        gate = await TcpGate(etcd_server.client_port).open()
        da, db = etcd(gate), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await da.register(a)
            await db.register(b)
            await db.publish({sha(0): WHOLE})
            await da.wait_for(lambda: da.holders(sha(0)) and len(da.peers()) == 2, WAIT)
            registered_at = (await keys(client))[f"/modeldepot/nodes/{a.node_id}".encode()].mod_revision

            await gate.close()  # a's network is down; etcd and b go on
            await da.wait_for(lambda: not da.status().connected, WAIT)
            await db.publish({sha(1): WHOLE})  # a put and a delete a does not see now
            assert da.holders(sha(0)) and not da.holders(sha(1))

            await gate.open()
            await da.wait_for(lambda: da.holders(sha(1)) and not da.holders(sha(0)), WAIT)
            await da.wait_for(lambda: da.status().registered, WAIT)
            # Its lease lived through the outage: its keys were checked, not written again.
            assert (await keys(client))[
                f"/modeldepot/nodes/{a.node_id}".encode()
            ].mod_revision == registered_at
            await gate.close()

    run(main())


def test_a_node_cut_off_for_longer_than_its_ttl_registers_again(etcd_server: EtcdServer) -> None:
    a, b = node("a"), node("b")

    async def main() -> None:
        gate = await TcpGate(etcd_server.client_port).open()
        da, db = etcd(gate, ttl=2), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await da.register(a)
            await da.publish({sha(1): WHOLE, sha(2): HALF})
            await db.register(b)
            await db.wait_for(lambda: db.holdings_of(a.node_id) == {sha(1): WHOLE, sha(2): HALF}, WAIT)
            old_lease = da._lease_id

            await gate.close()
            await db.wait_for(lambda: ids(db) == [b.node_id] and not db.holders(sha(1)), 2 + 3)  # expired
            assert not da.status().connected and not da.status().registered
            await da.publish({sha(1): WHOLE, sha(3): WHOLE})  # changed while cut off

            await gate.open()  # a new lease, and everything written again
            expected = {sha(1): WHOLE, sha(3): WHOLE}
            await db.wait_for(lambda: db.holdings_of(a.node_id) == expected, WAIT)
            await da.wait_for(lambda: da.status().registered, WAIT)
            stored = await keys(client)
            assert stored[f"/modeldepot/nodes/{a.node_id}".encode()].lease == da._lease_id != old_lease
            assert f"/modeldepot/holdings/{sha(2)}/{a.node_id}".encode() not in stored
            await gate.close()

    run(main())


def test_the_next_endpoint_is_tried_when_one_fails(etcd_server: EtcdServer) -> None:
    a = node("a")

    async def main() -> None:
        da = EtcdDiscovery([("127.0.0.1", closed_port()), ("127.0.0.1", etcd_server.client_port)])
        async with started(da):
            await da.register(a)
            await da.wait_for(lambda: da.status().registered and da.peers() == [a], WAIT)
            assert da._endpoint == 1  # the first one refused: the second took over

    run(main())


def test_a_view_started_with_its_first_endpoint_down_is_the_fleet_at_once(etcd_server: EtcdServer) -> None:
    """With the first of `etcd://A,B` down, `start()` returned after A's failure with an empty view: `peers`
    failed, and every CLI pull (a view read once, at once) went to the Hub, B up all along (an explorer's
    trial). The first view waits for an attempt at every endpoint."""
    a = node("a")

    async def main() -> None:
        registering = etcd(etcd_server)
        async with started(registering):
            await registering.register(a)
            await registering.wait_for(lambda: registering.status().registered, WAIT)
            reader = EtcdDiscovery([("127.0.0.1", closed_port()), ("127.0.0.1", etcd_server.client_port)])
            async with started(reader):
                assert reader.peers() == [a] and reader.status().connected

    run(main())


def test_an_etcd_120_ms_away_is_reached(etcd_server: EtcdServer) -> None:
    """gRPC's connection attempts had 100 ms to finish their handshake (`min_reconnect_backoff_ms` is its
    least connect timeout too): an etcd across regions, or a busy one, was never reached by a command (an
    explorer's trial)."""
    a = node("a")

    async def main() -> None:
        far = await TcpGate(etcd_server.client_port).open()
        far.delay = 0.06
        registering = etcd(etcd_server)
        async with started(registering):
            await registering.register(a)
            await registering.wait_for(lambda: registering.status().registered, WAIT)
            reader = EtcdDiscovery([("127.0.0.1", far.port)])
            async with started(reader):
                assert reader.status().connected and reader.peers() == [a]
        await far.close()

    run(main())


def test_a_compacted_history_reloads_the_view(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    b = node("b")
    caplog.set_level(logging.INFO, "modeldepot.discovery")

    async def main() -> None:
        gate = await TcpGate(etcd_server.client_port).open()
        da, db = etcd(gate), etcd(etcd_server)
        async with started(da, db), raw(etcd_server) as client:
            await db.register(b)
            await db.publish({sha(0): WHOLE, sha(1): HALF})
            await da.wait_for(lambda: da.holders(sha(0)), WAIT)
            await gate.close()
            await da.wait_for(lambda: not da.status().connected, WAIT)
            await db.publish({sha(1): WHOLE, sha(2): WHOLE})  # one revision R: 2 puts and a delete
            # Compacted at R itself: a watch from R would get R's puts but not its delete, without an error.
            await client.compact(await revision(client), physical=True)
            await gate.open()
            expected = {sha(1): WHOLE, sha(2): WHOLE}
            await da.wait_for(lambda: da.holdings_of(b.node_id) == expected and da.status().connected, WAIT)
            await gate.close()

    run(main())
    assert "compacted" in caplog.text


def test_a_hung_etcd_hangs_nothing(etcd_server: EtcdServer) -> None:
    a = node("a")

    async def main() -> None:
        da = etcd(etcd_server, ttl=3, timeout=1)
        async with started(da):
            await da.register(a)
            await da.publish({sha(1): WHOLE})
            assert etcd_server.process is not None
            etcd_server.process.send_signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                await da.publish({sha(1): WHOLE, sha(2): WHOLE})  # a call that gets no answer
                assert time.monotonic() - began < 3  # its deadline (1 s + 1 s of our own)
                await da.wait_for(lambda: not da.status().connected, WAIT)
                assert da.holders(sha(1)) and da.peers() == [a]
            finally:
                etcd_server.process.send_signal(signal.SIGCONT)
            await da.wait_for(lambda: da.status().registered, WAIT)
            await da.wait_for(lambda: da.holdings_of(a.node_id) == {sha(1): WHOLE, sha(2): WHOLE}, WAIT)

    run(main())


def test_unreachable_at_start_then_registers_when_etcd_comes(tmp_path: Any) -> None:
    server = EtcdServer(tmp_path / "etcd")  # its ports are chosen; nothing listens yet
    a = node("a")

    async def main() -> None:
        da = etcd(server)
        began = time.monotonic()
        async with started(da):
            await da.register(a)
            await da.publish({sha(1): WHOLE})
            assert time.monotonic() - began < 3
            status = da.status()
            assert not status.connected and not status.registered and status.last_error
            assert da.peers() == [] and da.holders(sha(1)) == []
            await asyncio.to_thread(server.start)
            await da.wait_for(lambda: da.status().registered and da.holders(sha(1)), WAIT)
            assert da.peers() == [a]

    try:
        run(main())
    finally:
        server.kill()


# -- etcd: what is read is checked --------------------------------------------------------------------------


def test_malformed_keys_and_values_are_ignored(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # (the warnings are what is checked: a `peers` command run in this process before quiets them)
    caplog.set_level(logging.WARNING, "modeldepot.discovery")
    good = node("good")
    good_id = good.node_id
    bad_id = node("bad").node_id
    record = good.to_dict()

    def rec(**change: Any) -> bytes:
        return json.dumps({**record, "node_id": bad_id, **change}).encode()

    def hold(**change: Any) -> bytes:
        return json.dumps({"size": 1, "complete": True, "chunks_done": 1, "chunks": 1, **change}).encode()

    p = "/modeldepot"
    malformed: list[tuple[bytes, bytes]] = [
        (f"{p}/nodes/{bad_id}".encode(), b"{not json"),
        (f"{p}/nodes/{bad_id}x".encode(), b"[1, 2]"),
        (f"{p}/nodes/{bad_id}y".encode(), rec(node_id=f"{bad_id}y", url="ftp://x.test/")),
        (f"{p}/nodes/{bad_id}z".encode(), rec(node_id=f"{bad_id}z", url="http://user:pw@x.test/")),
        (f"{p}/nodes/{bad_id}w".encode(), rec()),  # the record names another node
        (f"{p}/nodes/{bad_id}v".encode(), rec(node_id=f"{bad_id}v", started_at=float("nan"))),
        (f"{p}/nodes/{bad_id}u".encode(), rec(node_id=f"{bad_id}u", version="x\ny")),
        (f"{p}/nodes/{bad_id}t".encode(), rec(node_id=f"{bad_id}t", pad="x" * 5000)),  # too big
        (f"{p}/nodes/{bad_id}s".encode(), b"[" * 3000 + b"]" * 3000),  # too deep
        (f"{p}/nodes/{bad_id}r".encode(), json.dumps({"node_id": f"{bad_id}r"}).encode()),  # fields missing
        (f"{p}/nodes/has space".encode(), rec(node_id="has space")),
        (f"{p}/nodes/../x".encode(), rec()),
        (f"{p}/nodes/\xff\xfe".encode("latin-1"), rec()),
        (f"{p}/nodes/".encode(), rec()),
        (f"{p}/holdings/{'A' * 64}/{good_id}".encode(), hold()),  # not lowercase hex
        (f"{p}/holdings/{sha(1)}".encode(), hold()),  # no node id
        (f"{p}/holdings/{sha(1)}/{good_id}/x".encode(), hold()),
        (f"{p}/holdings/{sha(2)}/{good_id}".encode(), hold(size=-1)),
        (f"{p}/holdings/{sha(3)}/{good_id}".encode(), hold(size=True)),
        (f"{p}/holdings/{sha(4)}/{good_id}".encode(), hold(size=1 << 60)),
        (f"{p}/holdings/{sha(5)}/{good_id}".encode(), hold(chunks_done=5, chunks=4)),
        (f"{p}/holdings/{sha(6)}/{good_id}".encode(), hold(complete="yes")),
        (f"{p}/holdings/{sha(7)}/{good_id}".encode(), hold(size=1.5)),
        (f"{p}/holdings/{sha(8)}/{good_id}".encode(), b'"just a string"'),
    ]
    ignored_quietly = [
        (f"{p}/something-newer/{good_id}".encode(), b"{}"),  # a kind of key a later version may add
        (f"{p}X/nodes/{bad_id}".encode(), rec(node_id=bad_id)),  # outside the prefix
    ]

    async def main() -> None:
        watching = etcd(etcd_server)
        async with started(watching), raw(etcd_server) as client:
            for key, value in malformed + ignored_quietly:
                await client.put(key, value)
            await client.put(f"{p}/nodes/{good_id}".encode(), json.dumps(record).encode())
            await client.put(f"{p}/holdings/{sha(9)}/{good_id}".encode(), hold())
            await client.put(f"{p}/holdings/{sha(10)}/{good_id}".encode(), hold())
            await client.put(f"{p}/holdings/{sha(10)}/{good_id}".encode(), hold(size="big"))  # now bad

            loading = etcd(etcd_server)  # this one reads it all in its first snapshot
            async with started(loading):
                expected = {sha(9): Holding(1, True, 1, 1)}
                for discovery in (watching, loading):
                    await discovery.wait_for(lambda d=discovery: d.holdings_of(good_id) == expected, WAIT)
                    assert discovery.peers() == [good]
                    assert all(discovery.holders(sha(i)) == [] for i in range(1, 9))
                    assert discovery.holders(sha(10)) == []  # a value that turned bad is dropped

    run(main())
    for key, _value in malformed:
        assert repr(key[:200]) in caplog.text, key
    for key, _value in ignored_quietly:
        assert repr(key[:200]) not in caplog.text


def test_etcd_discovery_checks_its_arguments_and_what_it_is_given(etcd_server: EtcdServer) -> None:
    for endpoints, options in (
        ([], {}),
        ([("bad host", 1)], {}),
        ([("h", 0)], {}),
        ([("h", 1)], {"prefix": "modeldepot"}),
        ([("h", 1)], {"prefix": "/a/../b"}),
        ([("h", 1)], {"ttl": 0.5}),
    ):
        with pytest.raises(InvalidInputError):
            EtcdDiscovery(endpoints, **options)
    assert EtcdDiscovery([("::1", 2379)]).endpoints == [("[::1]", 2379)]
    assert EtcdDiscovery([("h", 1)], prefix="/fleets/prod/").prefix == "/fleets/prod"

    async def main() -> None:
        da = etcd(etcd_server)
        async with started(da):
            for record in (
                NodeRecord("a/b", "http://a.test", "1", 0.0),
                NodeRecord("a" * 32, "file:///etc/passwd", "1", 0.0),
                NodeRecord("a" * 32, "http://a.test", "1", -1.0),
            ):
                with pytest.raises(InvalidInputError):
                    await da.register(record)
            await da.register(node("a"))
            with pytest.raises(InvalidInputError):
                await da.register(node("other"))  # one discovery, one node
            for bad in ({"nothex": WHOLE}, {sha(1): Holding(-1, True)}, {sha(1): {"size": 1}}):
                with pytest.raises(InvalidInputError):
                    await da.publish(bad)  # type: ignore[arg-type]

    run(main())


# -- mem ------------------------------------------------------------------------------------------------------


def test_mem_nodes_see_each_other_across_threads_and_loops() -> None:
    registry = MemRegistry("t")
    a, b = node("a"), node("b")
    ready, done = threading.Event(), threading.Event()
    db = MemDiscovery(registry)

    def other_thread() -> None:  # b runs on a loop of its own, as a BackgroundServer's node would
        async def main() -> None:
            async with started(db):
                await db.register(b)
                await db.publish({sha(2): HALF})
                ready.set()
                await db.wait_for(lambda: db.holders(sha(1)), WAIT)
                await db.publish({sha(2): HALF, sha(5): WHOLE})
                await asyncio.to_thread(done.wait, WAIT)

        asyncio.run(main())

    async def main() -> None:
        da = MemDiscovery(registry)
        async with started(da):
            await da.register(a)
            thread = threading.Thread(target=other_thread)
            thread.start()
            try:
                await da.wait_for(lambda: len(da.peers()) == 2, WAIT)  # woken from the other thread
                await asyncio.to_thread(ready.wait, WAIT)
                assert [(h.node, h.holding) for h in da.holders(sha(2))] == [(b, HALF)]
                await da.publish({sha(1): WHOLE})
                await db.wait_for(lambda: db.holders(sha(5)), WAIT)  # b's view, waited on from this loop
            finally:
                done.set()
                await asyncio.to_thread(thread.join, WAIT)
            await da.wait_for(lambda: da.peers() == [a] and not da.holders(sha(2)), WAIT)  # b closed

    run(main())


def test_a_wait_that_times_out_leaves_no_waiter_behind() -> None:
    """A timed-out waiter stayed listed until the next change: a node's state logger, waiting 5 s at a time
    on a quiet fleet, piled up 17,000 a day (a review)."""

    async def main() -> None:
        da = MemDiscovery(MemRegistry("quiet"))
        async with started(da):
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await da.wait_for(lambda: False, 0.05)
            assert not da._waiters

    run(main())


def test_mem_publish_withdraw_death_and_outage() -> None:
    registry = mem_registry("test-mem-basics")
    a, b = node("a"), node("b")

    async def main() -> None:
        da, db = MemDiscovery(registry), MemDiscovery(registry)
        async with started(da, db):
            await da.publish({sha(1): WHOLE})  # before register: kept until then
            assert db.holders(sha(1)) == []
            await da.register(a)
            await db.register(b)
            assert [h.node for h in db.holders(sha(1))] == [a]
            await da.publish({sha(2): HALF})  # sha(1) withdrawn
            assert db.holders(sha(1)) == [] and db.holdings_of(a.node_id) == {sha(2): HALF}
            assert da.status() == ClusterStatus("mem", True, True, None, registry.since, 2)

            registry.set_available(False)
            await da.publish({sha(3): WHOLE})
            assert db.holdings_of(a.node_id) == {sha(2): HALF}  # the last view
            assert not da.status().connected and da.status().last_error
            registry.set_available(True)
            assert db.holdings_of(a.node_id) == {sha(3): WHOLE}

            registry.drop_node(b.node_id)  # b's process died
            assert da.peers() == [a] and not db.status().registered
            await db.publish({sha(4): WHOLE})
            assert da.peers() == [a] and da.holders(sha(4)) == []
            with pytest.raises(InvalidInputError):
                await da.publish({"x": WHOLE})
        assert registry._nodes == {} and registry._holdings == {}

    run(main())


# -- static and open_discovery --------------------------------------------------------------------------------


def test_static_discovery_is_the_configured_servers() -> None:
    static = StaticDiscovery(["http://b.test:8980/", "https://a.test", "http://b.test:8980"])

    async def main() -> None:
        await static.start()
        await static.register(node("me"))
        await static.publish({sha(1): WHOLE})
        assert [p.url for p in static.peers()] == ["http://b.test:8980", "https://a.test"]
        assert static.peers()[0] == NodeRecord("http://b.test:8980", "http://b.test:8980", "", 0.0)
        assert static.holders(sha(1)) == [] and static.holdings_of("http://b.test:8980") == {}
        status = static.status()
        assert (status.backend, status.connected, status.registered, status.peers) == (
            "static",
            True,
            False,
            2,
        )
        await static.close()

    run(main())
    with pytest.raises(InvalidInputError):
        StaticDiscovery(["ftp://x.test"])


def test_open_discovery_picks_and_checks_the_backend() -> None:
    assert isinstance(open_discovery(None, servers=["http://a.test"]), StaticDiscovery)
    mem = open_discovery("mem://test-open")
    assert isinstance(mem, MemDiscovery) and mem.registry is mem_registry("test-open")
    port = free_port()
    found = open_discovery(f"etcd://127.0.0.1:{port},[::1]:2379,etcd-0.fleet.test:2380", prefix="/f", ttl=5)
    assert isinstance(found, EtcdDiscovery)
    assert found.endpoints == [("127.0.0.1", port), ("[::1]", 2379), ("etcd-0.fleet.test", 2380)]
    assert (found.prefix, found.ttl) == ("/f", 5.0)
    for url in (
        "etcd://",
        "etcd://host",
        "etcd://host:0",
        "etcd://host:65536",
        "etcd://host:12a",
        "etcd://user@host:1",
        "etcd://host:1/path",
        "etcd://-host:1",
        "etcd://[::zz]:1",
        "etcd://a:1,,b:2",
        "http://host:1",
        "zookeeper://host:1",
        "mem://",
        "mem://a/b",
        "host:2379",
    ):
        with pytest.raises(ConfigError):
            open_discovery(url)
    with pytest.raises(ConfigError):
        open_discovery("etcd://h:1", prefix="no-slash")
    with pytest.raises(ConfigError):
        open_discovery(None, servers=["ftp://x.test"])
    # aetcd (and gRPC) are imported for etcd:// alone
    probe = (
        "import sys; from modeldepot.discovery import open_discovery; "
        "open_discovery(None, servers=['http://a.test']); open_discovery('mem://x'); "
        "print(sorted(m for m in ('aetcd', 'grpc') if m in sys.modules))"
    )
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "[]"


# -- chunk claims (etcd and mem: the same contract) ---------------------------------------------------------


async def _claims_contract(a: EtcdDiscovery | MemDiscovery, b: EtcdDiscovery | MemDiscovery,
                           c: EtcdDiscovery | MemDiscovery) -> None:  # fmt: skip
    """Three processes' discoveries: a and b claim for nodes A and B; c only reads (never registers)."""
    content, size = sha("claimed"), 1 << 20
    first = await a.claim_chunk(content, size, 0, "A")
    assert first is not None and first.node_id == "A" and first.blake3 is None
    assert (await b.claim_chunk(content, size, 0, "B")) == first  # taken: the winner's claim comes back
    await c.wait_for(lambda: c.claims(content, size).get(0) == first, WAIT)
    # Concurrent claims of one chunk: exactly one wins.
    answers = await asyncio.gather(a.claim_chunk(content, size, 1, "A"), b.claim_chunk(content, size, 1, "B"))
    assert answers[0] == answers[1] and answers[0] is not None
    # Settling records the BLAKE3; the settlement outlives the claim's release.
    digest = "ab" * 32
    await a.settle_claim(content, size, 0, digest)
    await c.wait_for(lambda: (c.claims(content, size).get(0) or first).blake3 == digest, WAIT)
    # A take-over names the revision it replaces: a stale one loses, the current one wins, once.
    settled = c.claims(content, size)[0]
    assert (await b.claim_chunk(content, size, 0, "B", replaces=settled.revision - 1)) == settled
    taken = await b.claim_chunk(content, size, 0, "B", replaces=settled.revision)
    assert taken is not None and taken.node_id == "B" and taken.revision > settled.revision
    assert (await c.claim_chunk(content, size, 0, "C", replaces=settled.revision)) == taken
    await a.settle_claim(content, size, 0, "cd" * 32)  # a's claim was taken over: nothing is written
    # Releasing some chunks (a pull whose Hub failed withdraws the claims it will not land) keeps the rest.
    for index in (5, 6, 7):
        claimed = await b.claim_chunk(content, size, index, "B")
        assert claimed is not None and claimed.node_id == "B"
    await b.release_claims(content, size, [5, 7])
    await c.wait_for(lambda: not {5, 7} & c.claims(content, size).keys(), WAIT)
    assert c.claims(content, size)[6].node_id == "B"
    await b.release_claims(content, size)
    await c.wait_for(lambda: 0 not in c.claims(content, size), WAIT)
    assert c.settlements(content, size)[0] == ("A", digest)
    # Another chunk size is another set of claims.
    assert c.claims(content, 2 * size) == {}
    # A process that ends takes its claims with it (etcd: its lease is revoked). (When b won chunk 1 in the
    # race above, its release took that claim too: a claims another chunk.)
    index = 1
    if answers[0].node_id == "B":
        await c.wait_for(lambda: 1 not in c.claims(content, size), WAIT)
        index = 2
        assert (await a.claim_chunk(content, size, index, "A")) is not None
    await c.wait_for(lambda: index in c.claims(content, size), WAIT)
    await a.close()
    await c.wait_for(lambda: index not in c.claims(content, size), WAIT)


def test_etcd_chunk_claims_are_taken_once_settled_taken_over_and_released(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, b, c = etcd(etcd_server), etcd(etcd_server), etcd(etcd_server)
        async with started(a, b, c):
            await a.register(node("a"))  # a registered node claims under its node lease; b and c have none
            await _claims_contract(a, b, c)
            async with raw(etcd_server) as client:  # nothing of the released claims is left in etcd
                left = await keys(client, b"/modeldepot/claims/")
                assert all(json.loads(kv.value)["node_id"] != "B" for kv in left.values())

    run(main())


@pytest.mark.parametrize("registered", [False, True], ids=["pull-alone", "node"])
def test_settlements_etcd_missed_while_down_are_written_when_it_returns(
    etcd_server: EtcdServer, registered: bool
) -> None:
    """etcd is SIGKILLed while a pull settles its claims and restarted: the settlements it could not take
    (one whose call failed, one made once the outage was known) are written when it is back, by a pull alone
    (a lease of its own, nothing registered) as by a node. Lost, they kept every peer from taking those
    chunks from the claimer, and the Hub from being asked, until the claims went late (a fleet trial's
    pulls hung for minutes)."""
    content, size = sha("settle"), 1 << 20
    first, second = "ab" * 32, "cd" * 32

    async def main() -> None:
        claimer, reader = etcd(etcd_server, timeout=1), etcd(etcd_server)
        async with started(claimer, reader):
            if registered:
                await claimer.register(node("a"))
            for index in (0, 1, 2):
                assert await claimer.claim_chunk(content, size, index, "A") is not None
            await reader.wait_for(lambda: len(reader.claims(content, size)) == 3, WAIT)

            etcd_server.kill()  # SIGKILL
            await claimer.settle_claim(content, size, 0, first)  # its call fails: kept
            await claimer.wait_for(lambda: not claimer.status().connected, WAIT)
            began = time.monotonic()
            await claimer.settle_claim(content, size, 1, second)  # known down: kept at once
            assert time.monotonic() - began < 0.5  # a pull's worker does not wait on the outage

            await asyncio.to_thread(etcd_server.start)  # the same data folder and ports
            expected = {0: ("A", first), 1: ("A", second)}
            await reader.wait_for(lambda: reader.settlements(content, size) == expected, 15)
            assert reader.claims(content, size)[2].blake3 is None  # (never settled: left as it was)
            async with raw(etcd_server) as client:
                stored = await keys(client, f"/modeldepot/claims/{content}/{size}/".encode())
                assert {k.rsplit(b"/", 1)[1]: json.loads(kv.value)["blake3"] for k, kv in stored.items()} == {
                    b"0": first,
                    b"1": second,
                    b"2": None,
                }
                assert {kv.lease for kv in stored.values()} == {claimer._lease_id}  # still the claims' lease
            # (dropped once etcd answered the write, which the reader may see first: a CI run's race)
            deadline = time.monotonic() + WAIT
            while claimer._unsettled and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert claimer._unsettled == {}

    run(main())


def test_etcd_claims_of_a_killed_claimer_go_within_its_ttl(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        reader = etcd(etcd_server)
        async with started(reader):
            claimer = etcd(etcd_server, ttl=2)
            await claimer.start()
            claim = await claimer.claim_chunk(sha("x"), 1 << 20, 3, "A")
            assert claim is not None and claim.node_id == "A"
            await reader.wait_for(lambda: 3 in reader.claims(sha("x"), 1 << 20), WAIT)
            for task in claimer._tasks:  # the process "dies": no refresh, no revoke
                task.cancel()
            await reader.wait_for(lambda: 3 not in reader.claims(sha("x"), 1 << 20), 2 + 3)
            claimer._closed = True
            await claimer._close_quietly(claimer._client)

    run(main())


def test_mem_chunk_claims_follow_the_same_contract() -> None:
    async def main() -> None:
        registry = MemRegistry("claims")
        a, b, c = MemDiscovery(registry), MemDiscovery(registry), MemDiscovery(registry)
        async with started(a, b, c):
            await _claims_contract(a, b, c)
            claim = await b.claim_chunk(sha("m"), 4096, 0, "B")
            assert claim is not None
            registry.set_available(False)
            assert await a.claim_chunk(sha("m"), 4096, 1, "A") is None  # the registry cannot say
            registry.set_available(True)

    run(main())


def test_static_discovery_keeps_no_claims() -> None:
    async def main() -> None:
        static = StaticDiscovery(["http://a.test:1"])
        assert not static.claims_supported
        assert await static.claim_chunk(sha("s"), 4096, 0, "A") is None
        assert static.claims(sha("s"), 4096) == {}

    run(main())


def test_etcd_settlements_are_pruned_once_a_content_has_no_claim_left(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settlements outlive their claims (a look after the release still finds who holds a chunk), for
    SETTLEMENT_TTL: then they go, so a long-running view does not keep every content it ever saw."""
    import modeldepot.discovery.base as base

    async def main() -> None:
        a, c = etcd(etcd_server), etcd(etcd_server)
        async with started(a, c):
            content, size = sha("pruned"), 1 << 20
            assert await a.claim_chunk(content, size, 0, "A") is not None
            await a.settle_claim(content, size, 0, "ef" * 32)
            await c.wait_for(lambda: c.settlements(content, size).get(0) == ("A", "ef" * 32), WAIT)
            monkeypatch.setattr(base, "SETTLEMENT_TTL", 0.0)
            await a.release_claims(content, size)
            await c.wait_for(lambda: 0 not in c.claims(content, size), WAIT)
            assert c.settlements(content, size) == {}
            assert a.settlements(content, size) == {}

    run(main())


async def _settlements_go_with_the_whole_copy(
    a: EtcdDiscovery | MemDiscovery, c: EtcdDiscovery | MemDiscovery
) -> None:
    """Node a settles a chunk of two contents, holds both whole, then removes one: its settlements of that
    one go (a pull of it again asked a for every chunk it had settled, had 404s and voided a's fresh claims,
    and the Hub sent 1.46 times the model: an explorer's trial); the other's stay, and a download's holding
    that goes (its end) keeps what it settled."""
    me = node("a")
    await a.register(me)
    removed, kept, downloading, size = sha("removed"), sha("kept"), sha("downloading"), 1 << 20
    pulled_again = sha("pulled again")
    for content in (removed, kept, downloading, pulled_again):
        assert await a.claim_chunk(content, size, 0, me.node_id) is not None
        await a.settle_claim(content, size, 0, "ab" * 32)
        await a.release_claims(content, size)
    await a.publish({removed: WHOLE, kept: WHOLE, downloading: HALF, pulled_again: WHOLE})
    await c.wait_for(lambda: len(c.holders(removed)) == 1 and len(c.holders(downloading)) == 1, WAIT)
    assert c.settlements(removed, size) == {0: (me.node_id, "ab" * 32)}
    # (removed and pulled again within one publish: the whole copy became a download, a review)
    await a.publish({kept: WHOLE, pulled_again: HALF})
    await c.wait_for(lambda: not c.holders(removed) and not c.holders(downloading), WAIT)
    assert c.settlements(removed, size) == c.settlements(pulled_again, size) == {}
    assert c.settlements(kept, size) == c.settlements(downloading, size) == {0: (me.node_id, "ab" * 32)}


def test_a_view_reloaded_forgets_the_settlements_of_copies_that_went_meanwhile() -> None:
    """A view away while a node removed its copy, etcd's history compacted since: reloaded from a snapshot,
    it kept the node's settlements of that copy (a review); and those of a node that left meanwhile."""
    from modeldepot.discovery.base import ChunkClaim

    view, me, other = MemDiscovery(MemRegistry("reloaded")), node("a"), node("b")  # (its view's part alone)
    removed, kept, size = sha("removed"), sha("kept"), 1 << 20
    for record in (me, other):
        view._set_node(record)
    for content, who in ((removed, me), (kept, me), (kept, other)):
        view._set_holding(content, who.node_id, WHOLE)
        view._set_claim(content, size, 0 if who is me else 1, ChunkClaim(who.node_id, "ab" * 32, 1))
    view._replace_view({me.node_id: me}, {kept: {me.node_id: WHOLE}})
    assert view.settlements(removed, size) == {}
    assert view.settlements(kept, size) == {0: (me.node_id, "ab" * 32)}  # (b left: its chunk 1 went)


def test_a_nodes_settlements_go_when_its_whole_copy_does() -> None:
    async def main() -> None:
        registry = MemRegistry("gone")
        a, c = MemDiscovery(registry), MemDiscovery(registry)
        async with started(a, c):
            await _settlements_go_with_the_whole_copy(a, c)

    run(main())


def test_etcd_a_nodes_settlements_go_when_its_whole_copy_does(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, c = etcd(etcd_server), etcd(etcd_server)
        async with started(a, c):
            await _settlements_go_with_the_whole_copy(a, c)

    run(main())


def test_a_claim_made_on_a_lease_that_ran_out_is_no_outage(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After etcd stalled past a node's lease, a chunk claim made on the old lease met "requested lease not
    found" and was logged as etcd out of reach, just after etcd had answered, and the node's view shrank (an
    explorer's trial). etcd answered: the lease ran out, and the node registers again under a new one."""
    a = node("a")

    async def main() -> None:
        da = etcd(etcd_server)
        async with started(da), raw(etcd_server) as client:
            await da.register(a)
            old_lease = da._lease_id
            await client.revoke_lease(old_lease)  # (as a lease that ran out while etcd stood still)
            await da.claim_chunk(sha(1), 1024, 0, a.node_id)  # on the old lease, as it was when called
            assert da.status().connected
            await da.wait_for(lambda: da._lease_id not in (None, old_lease) and da.status().registered, WAIT)
            assert await da.claim_chunk(sha(1), 1024, 0, a.node_id) is not None

    with caplog.at_level("INFO", logger="modeldepot.discovery"):
        run(main())
    assert "is out of reach" not in caplog.text, caplog.text


def test_a_node_that_did_not_run_past_its_ttl_says_so_not_that_etcd_was_away(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose own process stood still (SIGSTOP, a paused container: here its event loop blocked) past
    its lease's TTL found its lease gone as it went on: it said etcd was out of reach ("requested lease not
    found" taken for a connection failure) though etcd had answered all along (an explorer's trial). Said as
    the lease running out, this process perhaps not running; registered again."""
    a = node("a")

    async def main() -> None:
        da = etcd(etcd_server, ttl=2)
        async with started(da):
            await da.register(a)
            await da.publish({sha(1): WHOLE})
            old_lease = da._lease_id
            time.sleep(4.5)  # (the process stands still: nothing of it runs, etcd lets the lease expire)
            await da.wait_for(lambda: da._lease_id not in (None, old_lease) and da.status().registered, WAIT)

    with caplog.at_level("WARNING", logger="modeldepot.discovery"):
        run(main())
    assert "this process not running" in caplog.text, caplog.text
    assert "out of reach (" not in caplog.text, caplog.text


def test_a_hung_first_endpoint_costs_nothing_and_is_no_outage(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the first of three members hung (it accepts and never answers: SIGSTOP), every command waited out
    the call's deadline on it before it tried the next (~3 s each), and warned that etcd was out of reach,
    "0 nodes", with a quorum answering (an explorer's trial). Every endpoint is asked at once as the view
    starts: the one that answers is used, and a member's failure while another answers is no warning. (Here
    the deadline is 20 s: a view that waited it out would not be loaded within it.)"""
    a = node("a")
    with contextlib.ExitStack() as stack:
        hung = stack.enter_context(socket.socket())
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # (the kernel accepts; nothing ever answers)
        dead = closed_port()

        async def main() -> float:
            writer = etcd(etcd_server)
            async with started(writer):
                await writer.register(a)
                endpoints = [("127.0.0.1", hung.getsockname()[1]), ("127.0.0.1", dead),
                             ("127.0.0.1", etcd_server.client_port)]  # fmt: skip
                view = EtcdDiscovery(endpoints, timeout=20.0)
                began = time.monotonic()
                async with started(view):
                    took = time.monotonic() - began
                    assert view.peers() == [a] and view._endpoint == 2
                return took

        with caplog.at_level(logging.INFO, logger="modeldepot.discovery"):
            took = run(main())
    assert took < 20.0, f"the view waited {took:.1f} s: the hung member's deadline"
    assert "out of reach" not in caplog.text


def test_a_node_whose_role_is_revoked_says_so_once_and_keeps_the_reason(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """etcd with authentication; the node's user has a role that reads and writes the fleet's prefix. Its role
    revoked while it runs (a decommission), each refused write logged a warning and, as the lease's refresh
    went through, "answers again", every 2 s for ever, and its status lost the reason (an explorer's trial).
    The refusal is said once and kept as the status's last error until a write goes through again."""
    a = node("a")

    async def auth(call: Any) -> None:
        async with aetcd.Client("127.0.0.1", etcd_server.client_port, "root", "rootpw", timeout=5) as client:
            await call(aetcd.rpc.AuthStub(client.channel), client.metadata)

    async def main() -> None:
        async with aetcd.Client("127.0.0.1", etcd_server.client_port, timeout=5) as client:
            stub, rpc = aetcd.rpc.AuthStub(client.channel), aetcd.rpc
            await stub.UserAdd(rpc.AuthUserAddRequest(name="root", password="rootpw"), timeout=5)
            await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            await stub.RoleAdd(rpc.AuthRoleAddRequest(name="fleet"), timeout=5)
            permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/modeldepot/",
                                        range_end=aetcd.utils.prefix_range_end(b"/modeldepot/"))  # fmt: skip
            await stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="fleet", perm=permission),
                                           timeout=5)  # fmt: skip
            await stub.UserAdd(rpc.AuthUserAddRequest(name="node", password="nodepw"), timeout=5)
            await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="node", role="fleet"), timeout=5)
            await stub.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
        da = EtcdDiscovery([("127.0.0.1", etcd_server.client_port)], credentials=("node", "nodepw"))
        async with started(da):
            await da.register(a)
            await da.wait_for(lambda: da.status().registered, WAIT)
            await auth(lambda stub, meta: stub.UserRevokeRole(
                aetcd.rpc.AuthUserRevokeRoleRequest(name="node", role="fleet"), timeout=5, metadata=meta))  # fmt: skip
            await da.publish({sha(1): WHOLE})
            await da.wait_for(lambda: "permission denied" in (da.status().last_error or ""), WAIT)
            await asyncio.sleep(6)  # (the writer tries again meanwhile, 0.5 s, 1 s, 2 s... apart)
            status = da.status()
            assert status.connected and not status.registered
            assert "permission denied" in (status.last_error or ""), status
            await auth(lambda stub, meta: stub.UserGrantRole(
                aetcd.rpc.AuthUserGrantRoleRequest(user="node", role="fleet"), timeout=5, metadata=meta))  # fmt: skip
            await da.wait_for(lambda: da.status().registered and da.status().last_error is None, 3 * WAIT)

    with caplog.at_level(logging.INFO, logger="modeldepot.discovery"):
        run(main())
    # (the node's own warnings: gRPC's loop may log a callback it ran after the test's loop closed)
    refusals = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("modeldepot")]
    assert len(refusals) == 1 and "refuses this node" in refusals[0].getMessage(), caplog.text
    assert "answers again" not in caplog.text
    assert "takes this node's writes again" in caplog.text


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_a_discovery_closed_while_its_endpoints_race_leaves_no_client_open(how: str) -> None:
    """Two endpoints that accept and never answer; the discovery is closed (or its start cancelled) while
    every endpoint is being asked at once: every client it made is closed, and start() ends (it kept the
    winner open, and ran its tasks on a closed discovery: a review)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(2):
            hung = stack.enter_context(socket.socket())
            hung.bind(("127.0.0.1", 0))
            hung.listen(8)
            ports.append(hung.getsockname()[1])

        async def main() -> tuple[int, int]:
            da = EtcdDiscovery([("127.0.0.1", port) for port in ports], timeout=1.0)
            made, closed = [], []
            make = da._new_client

            def counted_client() -> Any:
                client = make()
                made.append(client)
                close = client.close

                async def counted_close() -> None:
                    closed.append(client)
                    await close()

                client.close = counted_close
                return client

            da._new_client = counted_client  # type: ignore[method-assign]
            start = asyncio.create_task(da.start())
            await asyncio.sleep(0.3)
            if how == "cancel":
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
                await da.close()
            else:
                await da.close()
                await asyncio.wait_for(start, 10)
            await asyncio.sleep(0.5)
            assert da._client is None and not da._tasks
            return len(made), len(closed)

        made, closed = run(main())
    assert made == 2 and closed == 2, (made, closed)


def test_a_node_record_with_a_chunk_size_not_understood_stays_in_the_view() -> None:
    """The chunk size a node registers is shown by `peers` alone: one not understood (a newer node's, a hand's)
    made the whole record invalid, the node gone from every view (a review). It is not said; an older node's
    record without it reads as not said."""
    from modeldepot.discovery.base import NodeRecord

    base = {"node_id": "n1", "url": "http://127.0.0.1:8980", "version": "1", "started_at": 1.0}
    assert NodeRecord.from_dict(base).chunk_size == 0
    assert NodeRecord.from_dict({**base, "chunk_size": 16 << 20}).chunk_size == 16 << 20
    for odd in (None, "16MiB", -1, 1.5, True, 1 << 40):
        assert NodeRecord.from_dict({**base, "chunk_size": odd}).chunk_size == 0
