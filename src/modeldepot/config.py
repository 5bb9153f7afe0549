"""Settings, read from the environment once, at the edge (CLI, server start), and passed down explicitly."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import ConfigError, InvalidInputError
from modeldepot.validation import parse_cluster_url
from modeldepot.validation import validate_cluster_prefix as validate_cluster_prefix_value

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CLUSTER_PREFIX",
    "DEFAULT_HUB_ENDPOINT",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "ClusterTls",
    "DepotConfig",
    "cluster_credentials",
    "cluster_tls",
    "default_home",
    "parse_duration",
    "parse_size",
    "truthy",
    "validate_cluster",
    "validate_cluster_prefix",
]

MiB = 1024 * 1024
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
DEFAULT_CHUNK_SIZE = 16 * MiB
DEFAULT_SLOW_PEER_RATE = 8 * MiB  # bytes a second (64 Mbit/s): below it, peers do not hold a pull back
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 1024 * MiB
DEFAULT_CLUSTER_PREFIX = "/modeldepot"

_SIZE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*", re.IGNORECASE | re.ASCII
)  # (no other digits: "１０GiB" is not 10 GiB)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def _size_setting(name: str, value: str) -> int:
    """``value``, a size, read from the setting ``name`` (named in the error: nothing on a command line
    says where a bad size came from)."""
    try:
        return parse_size(value)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None


def truthy(value: str | None) -> bool:
    """Whether a setting or a query parameter says yes: ``1``, ``true``, ``yes`` or ``on``, in any case."""
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


MAX_SIZE = 1 << 62  # bytes: 4 EiB, more than any disk or link (a size past it is a typo, or an overflow)


def _fraction_of_a_byte(text: str) -> bool:
    """Whether ``text`` is a size with a fraction and no unit ("1.5" was a budget of 1 byte, said nowhere: an
    explorer's trial)."""
    match = _SIZE.fullmatch(text)
    return match is not None and not match.group(2) and "." in match.group(1)


def parse_size(text: str) -> int:
    """Parse ``"16MiB"``, ``"1.5GiB"``, ``"16M"``, ``"65536"`` into bytes (binary units: MB is MiB), at most
    MAX_SIZE."""
    match = _SIZE.fullmatch(text)
    if not match:
        if text.strip().startswith("-"):
            raise ConfigError(
                f"size {text!r} cannot be negative: write it like 16MiB, 1.5GiB, 64KiB or 1048576"
            )
        raise ConfigError(f"cannot read size {text!r}: write it like 16MiB, 1.5GiB, 64KiB or 1048576")
    number, unit = match.group(1), _UNITS[match.group(2).upper()]
    if _fraction_of_a_byte(text):
        raise ConfigError(
            f"size {text.strip()[:40]!r} is a fraction of a byte: give a unit (1.5GiB) or whole bytes"
        )
    # (exact for whole numbers: a float of 400 digits is infinity, and int() of it raised OverflowError)
    size = int(number) * unit if "." not in number else float(number) * unit
    if size > MAX_SIZE:
        shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:37] + "..."
        raise ConfigError(f"size {shown!r} is more than 4096 PiB: write it like 16MiB, 1.5GiB or 1048576")
    return int(size)


MIN_RATE = 16 * 1024  # bytes a second: the least rate limit (below it, one read's piece lasts over a second)
_PER_SECOND = re.compile(r"\s*(.*?)\s*(?:/\s*s(?:ec(?:ond)?)?)?\s*", re.IGNORECASE)


_SHARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*", re.ASCII)


def parse_share(text: str) -> float:
    """The percentage ``"50%"`` (or ``"12.5 %"``) names; ValueError for anything else (other digits than
    ASCII ones, "nan%", "-5%")."""
    match = _SHARE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a percentage: {text!r}")
    return float(match.group(1))


NO_CAP = "off"  # a rate setting's value for no cap: `pull --max-rate off` under a profile's cap


def parse_rate(text: str, name: str = "rate") -> int:
    """Bytes a second from ``"50MiB/s"``, ``"50MiB"``, ``"1.5GiB/s"`` or ``"1048576"`` (binary units, as
    every size here)."""
    match = _PER_SECOND.fullmatch(text)
    try:
        rate = parse_size(match.group(1) if match else text)
    except ConfigError:
        said = "cannot be negative" if text.strip().startswith("-") else "cannot be read"
        raise ConfigError(
            f"{name} {text!r} {said}: write it like 50MiB/s, 1.5GiB/s, 1048576 or off"
        ) from None
    if rate < MIN_RATE:
        raise ConfigError(f"{name} {text!r} is below the least that can be kept to, 16KiB/s")
    return rate


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE | re.ASCII)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Parse ``"1d"``, ``"12h"``, ``"30m"``, ``"90s"`` or ``"90"`` into seconds; ``"0"`` or ``"off"`` is 0."""
    if text.strip().lower() == "off":
        return 0.0
    match = _DURATION.fullmatch(text)
    if not match:
        raise ConfigError(f"cannot read duration {text!r}: write it like 1d, 12h, 30m, 90s or off")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def validate_cluster(url: str) -> str:
    """A fleet registry's URL, checked before anything connects (``validation.parse_cluster_url``)."""
    try:
        parse_cluster_url(url)
    except InvalidInputError as error:
        raise ConfigError(str(error)) from None
    return url


MAX_PASSWORD_FILE = 64 * 1024


def _read_secret(variable: str, path: str, what: str) -> str:
    """The secret a file holds (a mounted secret: its last line end dropped)."""
    try:
        with open(path, "rb") as secret:
            read = secret.read(MAX_PASSWORD_FILE + 1)
    except OSError as error:
        raise ConfigError(f"{variable} {path!r}: {error.strerror or error}") from None
    if len(read) > MAX_PASSWORD_FILE:
        raise ConfigError(f"{variable} {path!r} is no {what} (over 64 KiB)")
    try:
        return read.decode().removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable} {path!r} is not UTF-8 text") from None


def node_token(env: Mapping[str, str]) -> str | None:
    """The depot nodes' token: ``MODELDEPOT_TOKEN``, or the file ``MODELDEPOT_TOKEN_FILE`` names (a mounted
    secret, out of `ps` and the environment); None without either."""
    token, token_file = env.get("MODELDEPOT_TOKEN", ""), env.get("MODELDEPOT_TOKEN_FILE", "")
    if token and token_file:
        raise ConfigError("MODELDEPOT_TOKEN and MODELDEPOT_TOKEN_FILE are both set: give one")
    if token_file:
        token = _read_secret("MODELDEPOT_TOKEN_FILE", token_file, "token")
        if not token.strip():
            raise ConfigError(
                f"MODELDEPOT_TOKEN_FILE {token_file!r} is empty: that would serve every route openly"
            )
    return token or None


def _upstream_token(env: Mapping[str, str]) -> str | None:
    """``MODELDEPOT_UPSTREAM_TOKEN``: the token for the depot nodes of MODELDEPOT_SERVERS alone."""
    token = env.get("MODELDEPOT_UPSTREAM_TOKEN")
    if token is None:
        return None
    if not token.strip() or not all("!" <= c <= "~" for c in token):
        raise ConfigError("MODELDEPOT_UPSTREAM_TOKEN must be a token (printable ASCII, no space): unset it to "
                          "send MODELDEPOT_TOKEN to the upstream nodes")  # fmt: skip
    return token


def cluster_credentials(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The user and password a node gives the fleet's etcd when etcd's authentication is on
    (``MODELDEPOT_CLUSTER_USER`` with ``MODELDEPOT_CLUSTER_PASSWORD``, or ``MODELDEPOT_CLUSTER_PASSWORD_FILE``:
    a mounted secret, its last line end dropped); None without a user. Without them anything that reached
    etcd's port could register as a node and be sent the fleet's MODELDEPOT_TOKEN (an explorer's trial)."""
    user = env.get("MODELDEPOT_CLUSTER_USER", "")
    password = env.get("MODELDEPOT_CLUSTER_PASSWORD", "")
    password_file = env.get("MODELDEPOT_CLUSTER_PASSWORD_FILE", "")
    if password and password_file:
        raise ConfigError(
            "MODELDEPOT_CLUSTER_PASSWORD and MODELDEPOT_CLUSTER_PASSWORD_FILE are both set: give one"
        )
    if password_file:
        password = _read_secret("MODELDEPOT_CLUSTER_PASSWORD_FILE", password_file, "password")
    if not user:
        if password or password_file:
            raise ConfigError("an etcd password is set without MODELDEPOT_CLUSTER_USER: set the user too")
        return None
    if not password:
        raise ConfigError("MODELDEPOT_CLUSTER_USER is set without a password: set MODELDEPOT_CLUSTER_PASSWORD "
                          "or MODELDEPOT_CLUSTER_PASSWORD_FILE")  # fmt: skip
    return user, password


MAX_PEM_FILE = 1024 * 1024  # bytes of a CA bundle, a certificate chain or a key, at most
_TLS_FILES = ("MODELDEPOT_CLUSTER_CA", "MODELDEPOT_CLUSTER_CERT", "MODELDEPOT_CLUSTER_KEY")


@dataclass(frozen=True)
class ClusterTls:
    """What a node gives gRPC to reach an ``etcds://`` fleet: the CA bundle that signed etcd's certificate
    (None: the system's), and its own certificate chain and key when etcd asks clients for one
    (``--client-cert-auth``). PEM bytes, read once at start."""

    ca: bytes | None = None
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)


def cluster_tls(env: Mapping[str, str], secure: bool) -> ClusterTls | None:
    """The TLS files of an ``etcds://`` fleet (``secure``): ``MODELDEPOT_CLUSTER_CA``, and
    ``MODELDEPOT_CLUSTER_CERT`` with ``MODELDEPOT_CLUSTER_KEY`` (as etcdctl's --cacert, --cert, --key);
    None for a plain ``etcd://`` one, which refuses them (a CA given to a plain URL would have sent the
    fleet's keys in clear while its operator thought them encrypted)."""
    given = {name: env.get(name, "").strip() for name in _TLS_FILES}
    if not secure:
        named = [name for name, path in given.items() if path]
        if named:
            raise ConfigError(f"{' and '.join(named)} set, but the cluster is a plain etcd:// URL: give it as "
                              "etcds://HOST:PORT to reach etcd over TLS")  # fmt: skip
        return None
    ca, cert, key = (_read_pem(name, path) if path else None for name, path in given.items())
    if (cert is None) != (key is None):
        have, lack = ("CERT", "KEY") if key is None else ("KEY", "CERT")
        raise ConfigError(f"MODELDEPOT_CLUSTER_{have} is set without MODELDEPOT_CLUSTER_{lack}: a client "
                          "certificate needs its key, and the key its certificate")  # fmt: skip
    _check_tls(given, ca, cert is not None)
    return ClusterTls(ca, cert, key)


def _check_tls(given: Mapping[str, str], ca: bytes | None, with_cert: bool) -> None:
    """The CA bundle and the certificate with its key, as a TLS client takes them, at start: a key with a
    passphrase, or the certificate and key swapped, passed the PEM check and failed every connection later
    with a hint that blamed the CA (a review)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(f"MODELDEPOT_CLUSTER_CA {given['MODELDEPOT_CLUSTER_CA']!r} holds no CA certificate "
                              f"({error})") from None  # fmt: skip
    if with_cert:
        _check_dates(given["MODELDEPOT_CLUSTER_CERT"])
        try:  # (a key with a passphrase asks for it: an empty one fails it, rather than a prompt)
            context.load_cert_chain(given["MODELDEPOT_CLUSTER_CERT"], given["MODELDEPOT_CLUSTER_KEY"],
                                    password=lambda: b"")  # fmt: skip
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(
                "MODELDEPOT_CLUSTER_CERT and MODELDEPOT_CLUSTER_KEY are not a certificate and its key, without a "
                f"passphrase ({error}); a key with one: `openssl pkey -in KEY -out PLAIN` makes one without"
            ) from None


def _check_dates(path: str) -> None:
    """A client certificate out of its dates is said at start (it passed, and every connection failed later
    with a hint that blamed the CA, the words "expired" and "certificate" said nowhere: an explorer's
    trial)."""
    import ssl
    import time

    try:  # (CPython's decoder of a certificate file; where it is missing, etcd says it)
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        not_before, not_after = (ssl.cert_time_to_seconds(decoded[k]) for k in ("notBefore", "notAfter"))
    except (AttributeError, KeyError, ValueError, ssl.SSLError, OSError):
        return
    now = time.time()
    if now > not_after:
        raise ConfigError(f"MODELDEPOT_CLUSTER_CERT {path!r} expired on {decoded['notAfter']}: renew it")
    if now < not_before:
        raise ConfigError(f"MODELDEPOT_CLUSTER_CERT {path!r} is not valid before {decoded['notBefore']}")


def _read_pem(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as pem:
            read = pem.read(MAX_PEM_FILE + 1)
    except OSError as error:
        raise ConfigError(f"{name} {path!r}: {error.strerror or error}") from None
    if len(read) > MAX_PEM_FILE or b"-----BEGIN " not in read:
        raise ConfigError(f"{name} {path!r} is not a PEM file (-----BEGIN ...-----)")
    return read


def validate_cluster_prefix(prefix: str) -> str:
    """The registry's key prefix (``validation.validate_cluster_prefix``), as a setting."""
    try:
        return validate_cluster_prefix_value(prefix)
    except InvalidInputError as error:
        raise ConfigError(str(error)) from None


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$MODELDEPOT_HOME``, else ``$XDG_CACHE_HOME/modeldepot``, else ``~/.cache/modeldepot``."""
    env = os.environ if environ is None else environ
    if env.get("MODELDEPOT_HOME"):
        return Path(env["MODELDEPOT_HOME"]).expanduser().absolute()
    return personal_cache_home(env)


def personal_cache_home(environ: Mapping[str, str] | None = None) -> Path:
    """The user's own cache store: ``$XDG_CACHE_HOME/modeldepot``, else ``~/.cache/modeldepot``."""
    env = os.environ if environ is None else environ
    cache = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return (Path(cache) / "modeldepot").absolute()


PRELOAD_STRATEGIES = (
    "page-cache",
    "mmap",
    "read",
    "memfd",
)  # how the RAM tier holds a file (preload/copies.py)


@dataclass(frozen=True)
class DepotConfig:
    """Where the store lives and how it chunks new blobs.

    ``chunk_size`` applies to a store when it is created; an existing store keeps the size recorded in
    its index (``None`` means "whatever the store has, or the default for a new one"). Asked for by the
    program (``chunk_size_required``), another size than an existing store's is an error; from
    ``MODELDEPOT_CHUNK_SIZE``, it shapes new stores only (set in a profile, it made every older store fail).
    """

    home: Path
    chunk_size: int | None = None
    chunk_size_required: bool = True
    hub_endpoint: str = DEFAULT_HUB_ENDPOINT
    hub_token: str | None = field(default=None, repr=False)  # sent to the Hub only, never to nodes or peers
    offline: bool = False
    servers: tuple[str, ...] = ()  # depot nodes asked before the Hub, in order (MODELDEPOT_SERVERS)
    node_token: str | None = field(default=None, repr=False)  # sent to depot nodes only (MODELDEPOT_TOKEN)
    # Sent to the depot nodes of ``servers`` (a mirror's --upstream) in place of ``node_token``: an open mirror
    # in front of a node that takes a token (MODELDEPOT_UPSTREAM_TOKEN; one token for both ways spread the
    # upstream's to every client of the mirror, an explorer's trial)
    upstream_token: str | None = field(default=None, repr=False)
    connections: int = 16  # parallel requests of one transfer, in total (MODELDEPOT_CONNECTIONS)
    connections_per_source: int = 4
    read_timeout: float = 30.0  # seconds without a byte before a retry (MODELDEPOT_READ_TIMEOUT)
    # Seconds Depot.pull (and `modeldepot pull`) keeps trying again through an outage, once no source
    # answers at all (MODELDEPOT_OUTAGE_PATIENCE; 0: fail at once)
    outage_patience: float = 120.0
    # Seconds a mirror reuses its upstream's answer for a branch before it asks again: a branch moved upstream
    # is followed after this long at most (MODELDEPOT_MIRROR_TTL; 0: ask at every request)
    mirror_ttl: float = 30.0
    preload_budget: str = "50%"  # RAM for preloaded models: "50%" of RAM, "8GiB" (MODELDEPOT_PRELOAD_BUDGET)
    preload_strategy: str = "page-cache"  # MODELDEPOT_PRELOAD_STRATEGY
    cluster: str | None = None  # the fleet's registry: etcd://HOST:PORT[,HOST:PORT] (MODELDEPOT_CLUSTER)
    cluster_prefix: str = DEFAULT_CLUSTER_PREFIX  # its key prefix (MODELDEPOT_CLUSTER_PREFIX)
    # "deferred": blobs published once verified, flushed in the background; "sync": flushed before
    # they are published (MODELDEPOT_DURABILITY). See store/durability.py.
    durability: str = "deferred"
    # The disk budget of the store's blobs: "200GiB", or "80%" of its file system; None: none
    # (MODELDEPOT_MAX_SIZE). See store/budget.py.
    max_size: str | None = None
    # Bytes a second all of this process's pulls may download together, from every source; None: no cap
    # (MODELDEPOT_MAX_DOWNLOAD_RATE). See ratelimit.py.
    max_download_rate: int | None = None
    # ... and a node may send in file bodies, to all its clients together (MODELDEPOT_MAX_UPLOAD_RATE).
    max_upload_rate: int | None = None
    # Other nodes that send a file slower than this, all together, do not hold the upstream back: it joins
    # for the rest (MODELDEPOT_SLOW_PEER_RATE; 0 or off: they never do). See transfer/download.py.
    slow_peer_rate: int = DEFAULT_SLOW_PEER_RATE
    # Stores read through after this one, never written by it (MODELDEPOT_SHARED, paths joined by ":"): an
    # admin's store of the models everyone uses, under a user's own. See tiers.py.
    shared: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.preload_strategy not in PRELOAD_STRATEGIES:
            raise ConfigError(f"MODELDEPOT_PRELOAD_STRATEGY {self.preload_strategy!r} must be one of "
                              f"{', '.join(PRELOAD_STRATEGIES)}")  # fmt: skip
        if self.durability not in ("deferred", "sync"):
            raise ConfigError(f"MODELDEPOT_DURABILITY {self.durability!r} must be 'deferred' or 'sync'")
        if not 1 <= self.connections <= 256:
            raise ConfigError(f"MODELDEPOT_CONNECTIONS {self.connections} must be from 1 to 256 (connections a pull "
                              "opens in total)")  # fmt: skip
        if not 1 <= self.connections_per_source <= self.connections <= 256:
            raise ConfigError(
                f"connections: {self.connections} in total and {self.connections_per_source} per source "
                "must satisfy 1 <= per source <= total <= 256"
            )
        for server in self.servers:
            if not server.startswith(("http://", "https://")):
                raise ConfigError(f"depot server {server!r} must be an http:// or https:// URL")
        # (the cluster is checked where the fleet is opened, a pull's, `serve`'s: a mistyped MODELDEPOT_CLUSTER in
        # a fleet-wide profile made every local read, `ls`, `Depot().file_path()`, a ConfigError, an explorer's trial)
        object.__setattr__(self, "cluster_prefix", validate_cluster_prefix(self.cluster_prefix))
        for rate in (self.max_download_rate, self.max_upload_rate):
            if rate is not None and rate < MIN_RATE:
                raise ConfigError(f"a rate limit of {rate} bytes a second is below the least, 16KiB/s")
        if self.chunk_size is not None and not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(
                f"chunk size {self.chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, home: Path | str | None = None
    ) -> DepotConfig:
        """Build from the environment (``MODELDEPOT_HOME``, ``MODELDEPOT_CHUNK_SIZE``, ``MODELDEPOT_SERVERS``,
        ``MODELDEPOT_CLUSTER``, ...); an explicit ``home`` wins."""
        env = os.environ if environ is None else environ
        chunk = env.get("MODELDEPOT_CHUNK_SIZE")
        servers = tuple(
            u.strip().rstrip("/") for u in env.get("MODELDEPOT_SERVERS", "").split(",") if u.strip()
        )
        connections = _int_setting(env, "MODELDEPOT_CONNECTIONS", 16)
        per_source = _int_setting(env, "MODELDEPOT_CONNECTIONS_PER_SOURCE", min(4, connections))
        return cls(
            home=Path(home).expanduser().absolute() if home is not None else default_home(env),
            chunk_size=_size_setting("MODELDEPOT_CHUNK_SIZE", chunk) if chunk else None,
            chunk_size_required=False,
            hub_endpoint=(env.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/"),
            hub_token=env.get("HF_TOKEN") or None,
            offline=_flag_setting(env, "MODELDEPOT_OFFLINE") or truthy(env.get("HF_HUB_OFFLINE")),
            servers=servers,
            node_token=node_token(env),
            upstream_token=_upstream_token(env),
            connections=connections,
            connections_per_source=per_source,
            read_timeout=_float_setting(env, "MODELDEPOT_READ_TIMEOUT", 30.0),
            outage_patience=_float_setting(env, "MODELDEPOT_OUTAGE_PATIENCE", 120.0, zero=True),
            mirror_ttl=_float_setting(env, "MODELDEPOT_MIRROR_TTL", 30.0, zero=True),
            preload_budget=env.get("MODELDEPOT_PRELOAD_BUDGET") or "50%",
            preload_strategy=env.get("MODELDEPOT_PRELOAD_STRATEGY") or "page-cache",
            cluster=env.get("MODELDEPOT_CLUSTER", "").strip() or None,
            durability=(env.get("MODELDEPOT_DURABILITY") or "deferred").strip().lower(),
            max_size=_max_size_setting(env),
            max_download_rate=_rate_setting(env, "MODELDEPOT_MAX_DOWNLOAD_RATE"),
            max_upload_rate=_rate_setting(env, "MODELDEPOT_MAX_UPLOAD_RATE"),
            cluster_prefix=env.get("MODELDEPOT_CLUSTER_PREFIX", "").strip() or DEFAULT_CLUSTER_PREFIX,
            slow_peer_rate=_slow_peer_rate(env),
            shared=shared_homes(env.get("MODELDEPOT_SHARED", "")),
        )


def shared_homes(text: str | Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """The shared stores' folders, from ``MODELDEPOT_SHARED`` (paths joined by ``:``) or a list."""
    parts = text.split(os.pathsep) if isinstance(text, str) else list(text)
    homes: list[Path] = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        if not isinstance(part, (str, os.PathLike)):
            raise ConfigError(f"a shared store is a folder's path, not {part!r}")
        home = Path(part).expanduser().absolute()
        if home not in homes:
            homes.append(home)
    return tuple(homes)


def parse_max_size(text: str | int, path: os.PathLike[str] | str) -> int:
    """Bytes from ``"200GiB"`` (or a plain number, or an int of bytes) or ``"80%"`` of the file system that
    holds ``path``."""
    text = budget_text(text)
    if text.startswith("-"):
        raise ConfigError(f"disk budget {text!r} cannot be negative: give a size like 200GiB or 80%")
    if text.endswith("%"):
        try:
            share = parse_share(text)
        except ValueError:
            raise ConfigError(f"cannot read disk budget {text!r}: write it like 200GiB or 80%") from None
        if not 0 < share <= 100:
            raise ConfigError(f"disk budget {text!r} must be a share above 0% and at most 100% of the disk")
        stat = os.statvfs(path)
        size = int(stat.f_blocks * stat.f_frsize * share / 100)
        if size <= 0:  # ("0.00000000001%" of a disk: a budget that evicts everything)
            raise ConfigError(f"disk budget {text!r} is 0 bytes of this disk: give it more")
        return size
    try:
        size = parse_size(text)  # (1.5TiB too)
    except ConfigError:
        if _fraction_of_a_byte(text):
            raise ConfigError(
                f"disk budget {text[:40]!r} is a fraction of a byte: write it like 200GiB or 80%"
            ) from None
        if _SIZE.fullmatch(text):  # (read, and more than any disk)
            raise ConfigError(
                f"disk budget {text[:40]!r} is more than 4096 PiB: write it like 200GiB or 80%"
            ) from None
        raise ConfigError(f"cannot read disk budget {text!r}: write it like 200GiB or 80%") from None
    if size <= 0:
        raise ConfigError(f"disk budget {text!r} must be more than 0 bytes")
    return size


def typed_max_size(text: str, path: os.PathLike[str] | str) -> int:
    """:func:`parse_max_size` of a budget a user typed (an option, ``budget SIZE``): a bare number under 1 MiB
    is a unit left out (`serve --max-size 5`, meant as 5GiB, emptied a store of every model at the node's
    start: a trial). Not of one the store saved: an API's ``set_max_size(524288)`` is saved as its bytes."""
    size = parse_max_size(text, path)
    if text.strip().isdigit() and size < 1 << 20:
        raise ConfigError(f"disk budget {text.strip()!r} is {size} bytes, which holds no model: give a unit (like "
                          f"{text.strip()}GiB)")  # fmt: skip
    return size


def budget_text(max_size: str | int) -> str:
    if isinstance(max_size, int) and not isinstance(max_size, bool):
        return str(max_size)
    if not isinstance(max_size, str):
        raise ConfigError(f"a disk budget is a size like 200GiB, 80% or a number of bytes, not {max_size!r}")
    return max_size.strip()


def _max_size_setting(env: Mapping[str, str]) -> str | None:
    text = env.get("MODELDEPOT_MAX_SIZE", "").strip() or None
    if text is not None:
        try:
            typed_max_size(text, "/")  # (its syntax: a share is taken of the store's disk when it opens)
        except ConfigError as error:
            raise ConfigError(f"MODELDEPOT_MAX_SIZE: {error}") from None
    return text


def _slow_peer_rate(env: Mapping[str, str]) -> int:
    text = env.get("MODELDEPOT_SLOW_PEER_RATE", "").strip()
    if not text:
        return DEFAULT_SLOW_PEER_RATE
    return 0 if text.lower() in ("0", "off") else parse_rate(text, "MODELDEPOT_SLOW_PEER_RATE")


def _rate_setting(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    return None if not text or text.lower() == NO_CAP else parse_rate(text, name)


_FALSE = ("0", "OFF", "NO", "FALSE")


def _flag_setting(env: Mapping[str, str], name: str) -> bool:
    """Yes or no from ``env[name]`` (unset or empty: no). A value that is neither was taken for no, without a
    word (``MODELDEPOT_OFFLINE=maybe`` pulled from the network, an explorer's trial). (huggingface_hub's own
    HF_HUB_OFFLINE is read as it reads it: anything but a yes is a no.)"""
    text = env.get(name, "")
    if not text.strip() or text.strip().upper() in _FALSE:
        return False
    if truthy(text):
        return True
    raise ConfigError(f"{name}={text!r}: use 1, true, yes or on (or 0, false, no or off)")


def _float_setting(env: Mapping[str, str], name: str, default: float, zero: bool = False) -> float:
    """Seconds from ``env[name]``: positive, below a day (or 0 too, with ``zero``)."""
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    in_range = (value >= 0 if zero else value > 0) and value < 86400  # (NaN is not)
    if not in_range:
        kind = "a number of seconds (0 or more)" if zero else "a positive number of seconds"
        raise ConfigError(f"{name}={text!r} must be {kind} below a day")
    return value


def _int_setting(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None


# Every variable modeldepot reads (a test keeps this list whole): any other MODELDEPOT_ name is a typo the
# command line warns of (a mistyped token variable started an open node, and one for the port was dropped, unsaid:
# an explorer's trial)
KNOWN_VARIABLES = frozenset({
    "MODELDEPOT_BOOT_ID", "MODELDEPOT_CHUNK_SIZE", "MODELDEPOT_CLUSTER", "MODELDEPOT_CLUSTER_CA",
    "MODELDEPOT_CLUSTER_CERT", "MODELDEPOT_CLUSTER_KEY", "MODELDEPOT_CLUSTER_PASSWORD",
    "MODELDEPOT_CLUSTER_PASSWORD_FILE", "MODELDEPOT_CLUSTER_PREFIX", "MODELDEPOT_CLUSTER_USER",
    "MODELDEPOT_CONNECTIONS", "MODELDEPOT_CONNECTIONS_PER_SOURCE", "MODELDEPOT_DURABILITY",
    "MODELDEPOT_HEADER_TIMEOUT", "MODELDEPOT_HOME", "MODELDEPOT_LISTEN_HOST", "MODELDEPOT_LISTEN_PORT",
    "MODELDEPOT_LOG_LEVEL",
    "MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT", "MODELDEPOT_MAX_DOWNLOAD_RATE", "MODELDEPOT_MAX_SIZE",
    "MODELDEPOT_MAX_UPLOAD_RATE", "MODELDEPOT_MIRROR_TTL", "MODELDEPOT_OFFLINE", "MODELDEPOT_OUTAGE_PATIENCE", "MODELDEPOT_PUBLIC_URL",
    "MODELDEPOT_PRELOAD_BUDGET", "MODELDEPOT_PRELOAD_STRATEGY", "MODELDEPOT_READ_TIMEOUT",
    "MODELDEPOT_REPAIR", "MODELDEPOT_SCRUB_INTERVAL", "MODELDEPOT_SCRUB_RATE", "MODELDEPOT_SEND_TIMEOUT",
    "MODELDEPOT_SERVERS", "MODELDEPOT_SHARED", "MODELDEPOT_SHUTDOWN_GRACE", "MODELDEPOT_SLOW_PEER_RATE", "MODELDEPOT_TOKEN",
    "MODELDEPOT_TOKEN_FILE", "MODELDEPOT_UPSTREAM_TOKEN",
})  # fmt: skip


# What Kubernetes (and `docker --link`) puts in every pod of a namespace with a Service named modeldepot
_SERVICE_LINK = re.compile(
    r"MODELDEPOT_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"
)


def _service_link(name: str, value: str) -> bool:
    return bool(_SERVICE_LINK.fullmatch(name)) or (
        name == "MODELDEPOT_PORT" and value.startswith(("tcp://", "udp://", "sctp://"))
    )


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The MODELDEPOT_ names in ``env`` modeldepot does not read, each with the known one it is nearest to
    (None: none is near)."""
    unknown = sorted(name for name, value in env.items() if name.startswith("MODELDEPOT_")
                     and name not in KNOWN_VARIABLES and not _service_link(name, value))  # fmt: skip
    if not unknown:
        return []  # (the common case: no import)
    import difflib

    return [(name, next(iter(difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.8)), None))
            for name in unknown]  # fmt: skip
