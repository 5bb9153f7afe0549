"""How the fleet is written in etcd: the keys' layout, the values' encoding, and the small facts of the
gRPC answers the rest of the package reads. No state and no calls here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import aetcd  # type: ignore[import-untyped]

from modeldepot.discovery.base import validate_node_id
from modeldepot.errors import InvalidInputError
from modeldepot.validation import validate_sha256, validate_size

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
MAX_TXN_BYTES = 1 << 20  # under etcd's 1.5 MiB request limit
MAX_VALUE_BYTES = 4096  # a record or a holding is ~100 bytes: a far larger value is not ours

# gRPC channel options: reconnect quickly (backoff 0.1-1 s, not gRPC's default of up to 120 s), giving each
# connection attempt 5 s (gRPC takes the least reconnect backoff as the least connect timeout too: at 100 ms,
# an etcd 120 ms away, or a busy one, was never reached, an explorer's trial); find a dead or hung etcd by
# keepalive pings (every 5 s, also without calls: etcd answers GOAWAY to pings more
# often than every 5 s); no limit on the size of an answer (a snapshot of a large fleet).
CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 5000,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 1000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.ping_timeout_ms": 3000,
    "grpc.max_receive_message_length": -1,
}


def describe(error: BaseException) -> str:
    """An error in one line of at most 300 characters, for logs and the node's status."""
    # (gRPC's messages may end in a colon with nothing after it: "errors resolving host:2379: ")
    text = str(error).strip().rstrip(":").rstrip()
    text = text or ("no answer in time" if isinstance(error, asyncio.TimeoutError) else "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = text if len(text) <= 300 else text[:297] + "…"
    if "user name is empty" in text:  # (etcd's words for a client that gave no credentials)
        text += " (etcd's authentication is on: set MODELDEPOT_CLUSTER_USER and MODELDEPOT_CLUSTER_PASSWORD)"
    elif "authentication failed" in text:
        text += " (check MODELDEPOT_CLUSTER_USER and MODELDEPOT_CLUSTER_PASSWORD or its file)"
    elif "permission denied" in text:  # (a user etcd knows, its role short: the CN of a client certificate's)
        text += (" (etcd's authentication is on: this client's user, MODELDEPOT_CLUSTER_USER or its certificate's"
                 " common name, needs a role that reads and writes the fleet's prefix)")  # fmt: skip
    if "database space exceeded" in text:  # (said "cannot be reached": the operator looked at the network)
        text += " (etcd is up and refuses writes, its database full: compact and defragment it, then `etcdctl alarm disarm`)"
    return text


def is_auth_lost(error: BaseException) -> bool:
    """Whether etcd no longer takes the client's authentication token (its TTL ran out unused, or etcd
    restarted): a client made again authenticates again."""
    return isinstance(error, aetcd.ClientError) and "invalid auth token" in str(error)


def is_lease_not_found(error: BaseException) -> bool:
    return isinstance(error, aetcd.ClientError) and "lease not found" in str(error)


def encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def decode(value: bytes) -> object:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidInputError(f"the value is {len(value)} bytes (at most {MAX_VALUE_BYTES})")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidInputError(f"the value is not JSON: {error}") from None


def retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned call's outcome as seen (no "exception was never retrieved" at exit)."""
    if not task.cancelled():
        task.exception()


def txn_revision(responses: Sequence[Any]) -> int:
    """The revision a transaction made (each operation's answer carries the header)."""
    for response in responses:
        kind = response.WhichOneof("response")
        if kind is not None:
            return int(getattr(response, kind).header.revision)
    return 0


class FleetKey(NamedTuple):
    """A key of the fleet, parsed: ``kind`` is node, holding or claim."""

    kind: str
    sha256: str = ""
    node_id: str = ""
    chunk_size: int = 0
    chunk: int = 0


def _number(text: str) -> int:
    """A decimal number in a key (no sign, no leading zero, no other digit than ASCII)."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 12:
        raise InvalidInputError(f"{text[:20]!r} is not a plain decimal number")
    return validate_size(int(text))


class FleetKeys:
    """The keys under one prefix (``root`` is ``{prefix}/`` as bytes)."""

    def __init__(self, prefix: str) -> None:
        self.root = f"{prefix}/".encode()
        self.nodes_root = self.root + b"nodes/"
        self.holdings_root = self.root + b"holdings/"

    def node(self, node_id: str) -> bytes:
        return self.nodes_root + node_id.encode()

    def holding(self, sha256: str, node_id: str) -> bytes:
        return self.holdings_root + f"{sha256}/{node_id}".encode()

    def claim(self, sha256: str, chunk_size: int, index: int) -> bytes:
        return self.root + f"claims/{sha256}/{chunk_size}/{index}".encode()

    def parse(self, key: bytes) -> FleetKey | None:
        """The key's kind and parts; None for a kind of key this version does not know (a newer one's).
        Raises InvalidInputError for a malformed key of a known kind."""
        try:
            parts = key[len(self.root) :].decode("ascii").split("/")
        except UnicodeDecodeError:
            raise InvalidInputError("the key is not ASCII") from None
        if parts[0] == "nodes" and len(parts) == 2:
            return FleetKey("node", node_id=validate_node_id(parts[1]))
        if parts[0] == "holdings" and len(parts) == 3:
            return FleetKey("holding", validate_sha256(parts[1]), validate_node_id(parts[2]))
        if parts[0] == "claims" and len(parts) == 4:
            return FleetKey(
                "claim", validate_sha256(parts[1]), chunk_size=_number(parts[2]), chunk=_number(parts[3])
            )
        if parts[0] in ("nodes", "holdings", "claims"):
            raise InvalidInputError(f"a {parts[0]} key has {len(parts) - 1} parts after it")
        return None
