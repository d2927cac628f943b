"""JSON-RPC layer of the vhost target (SPDK rpc.py compatible)."""

from .client import RpcClient, RpcClientError
from .registry import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RpcError,
    RpcMethod,
    RpcRegistry,
)
from .server import RpcServer, RpcSocketInUseError

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "RpcClient",
    "RpcClientError",
    "RpcError",
    "RpcMethod",
    "RpcRegistry",
    "RpcServer",
    "RpcSocketInUseError",
]
