"""The mapping between gRPC status codes and the typed transfer errors, used by both ends of the wire: as the
status of a failed session call, and by name in a transfer's ERROR message."""

from __future__ import annotations

import grpc

from splitserve.kv_transfer.errors import (
    IntegrityError,
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
)

_TO_CODE: list[tuple[type[TransferError], grpc.StatusCode]] = [
    (TransferAborted, grpc.StatusCode.ABORTED),
    (TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
]
_FROM_CODE = {code: cls for cls, code in _TO_CODE}


def code_for(err: TransferError) -> grpc.StatusCode:
    return next((code for cls, code in _TO_CODE if isinstance(err, cls)), grpc.StatusCode.FAILED_PRECONDITION)


def error_from_rpc(err: grpc.RpcError, peer: str) -> TransferError:
    """A failed call as a typed error; a connection torn down (UNAVAILABLE, CANCELLED) means the peer is gone."""
    code = err.code()
    details = err.details() or code.name
    if code == grpc.StatusCode.CANCELLED:
        return PeerUnavailable(f"{peer}: the receiver went away ({details})")
    return error_from_code(code, details, peer)


def error_from_code(code: grpc.StatusCode | str, details: str, peer: str) -> TransferError:
    """An ERROR message's code (by name) or a call's status as a typed error; unknown codes are plain TransferError."""
    if isinstance(code, str):
        code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    return _FROM_CODE.get(code, TransferError)(f"{peer}: {details}")
