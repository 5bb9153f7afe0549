"""The node's HTTP server: Hub-compatible routes and the native /api/depot/v1 API over a Depot."""

from modeldepot.server.app import create_app
from modeldepot.server.ranges import ByteRange, RangeNotSatisfiable, parse_range

__all__ = ["ByteRange", "RangeNotSatisfiable", "create_app", "parse_range"]
