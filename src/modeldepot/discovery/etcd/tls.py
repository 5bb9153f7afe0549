"""An aetcd client whose gRPC channel is TLS (an ``etcds://`` fleet). aetcd opens only plain channels
(``insecure_channel``); production etcds serve their clients over TLS, most with client certificates
(``--client-cert-auth``), and a fleet's keys (its nodes' addresses, its token-guarded holdings) must not
cross the network in clear. The connection is aetcd's own but for the channel."""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]
from aetcd import rpc, watcher

# (gRPC's errors as aetcd's, as its own connect has them)
from aetcd.client import _handle_errors  # type: ignore[import-untyped]

from modeldepot.config import ClusterTls

__all__ = ["TlsClient"]


class TlsClient(aetcd.Client):  # type: ignore[misc]
    def __init__(self, tls: ClusterTls, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )

    @_handle_errors  # type: ignore[untyped-decorator]
    async def connect(self) -> None:
        """aetcd's :meth:`aetcd.Client.connect`, over a TLS channel."""
        if self._connected.is_set():
            return
        connecting: bool = self._is_connecting  # type: ignore[has-type]
        if connecting:  # (another task connects: wait for it, as aetcd does)
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._channel_credentials, options=self._options.items()
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                answer = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", answer.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False
