"""The fleet in etcd, through aetcd (imported only by this package, and this package only for ``etcd://`` and
``etcds://``: the same over TLS, :mod:`.tls`).

Keys, all under ``{prefix}/`` (``/modeldepot`` by default), values compact JSON::

    {prefix}/nodes/{node_id}               a NodeRecord       {"node_id", "url", "version", "started_at"}
    {prefix}/holdings/{sha256}/{node_id}   a Holding          {"size", "complete", "chunks_done", "chunks"}
    {prefix}/claims/{sha256}/{chunk_size}/{index}
                                           a ChunkClaim       {"node_id", "blake3"}

Every key this node writes hangs on one lease (``ttl``, 10 s by default), refreshed every ttl/3: when the
process dies its keys go within ``ttl``; :meth:`EtcdDiscovery.close` revokes the lease, which removes them
at once. Holdings are keyed by content first, so "who holds X" is one prefix of the view.

Chunk claims (which node fetches which chunk of a file the fleet pulls at once) are in :mod:`.claims`.

Two tasks run on the caller's loop:

- the **writer** grants the lease, writes the record, writes the differences between the holdings
  :meth:`~EtcdDiscovery.publish` asked for and those it last wrote (transactions of at most 128 operations),
  refreshes the lease, sends the claim settlements etcd missed during an outage, and after any failure
  checks (by the lease's key list) what really is in etcd before writing again: a lease that ran out is
  granted anew and everything written again (its claims went with it: their settlements are dropped).
- the **follower** keeps the view: a snapshot of ``{prefix}/``, then one prefix watch; after an error it
  watches again from the last revision it applied (no event missed), or reloads a snapshot when etcd has
  compacted that revision away (or its revision went back: a cluster restored from a backup). It watches
  from the last revision applied, not the next one, because etcd compacted *at* a revision R keeps R's
  puts but not its deletes and still answers a watch from R without an error; R's events applied twice
  change nothing.

Everything read from etcd is input from outside: keys and values are checked (node ids, URLs, SHA-256,
sizes, JSON shapes) and a malformed one is skipped with a warning (once per key), never trusted.

When etcd is out of reach, reads answer from the last view, :meth:`~EtcdDiscovery.status` says so (with the
error and since when), one warning is logged per outage, and both tasks retry (backoff from 0.1 s, at most
2 s). Every call has a deadline (``timeout``), so a hung etcd stalls nothing; gRPC keepalive pings find a
dead connection within ~6 s. Several endpoints: after a failure the next one is tried.

The package, by responsibility: :mod:`.wire` (keys and values), :mod:`.connection` (the client, calls
under a deadline, the lease, health), :mod:`.claims` (chunk claims) and :mod:`.discovery` (the view and
this node's record and holdings).
"""

import os

# gRPC's core logs its own lines to stderr (a failed TLS handshake: four "E1205 ... Corruption detected" a
# second), set before it is first imported; the node says each outage once, with gRPC's reason, itself
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# Its fork handlers crashed a child forked while a connection was open, now and then (SIGSEGV in os.fork: 4
# of 15 forks, 0 of 50 without them, grpcio 1.85); a child uses none of the parent's connections anyway
# (the fleet's view is detached there: transfer/fleet.py)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from modeldepot.discovery.etcd.discovery import EtcdDiscovery
from modeldepot.discovery.etcd.wire import CHANNEL_OPTIONS, MAX_TXN_OPS

__all__ = ["CHANNEL_OPTIONS", "MAX_TXN_OPS", "EtcdDiscovery"]
