"""Typed transfer failures, so workers can tell "the peer aborted" from "the peer is gone" from "the bytes are bad"."""

from __future__ import annotations


class TransferError(RuntimeError):
    """Base of every KV transfer failure."""


class TransferAborted(TransferError):
    """The other side aborted the transfer on purpose (a protocol message, never a timeout)."""


class TransferTimeout(TransferError):
    """The peer stayed silent longer than ``kv_transfer.timeout_s``: the last resort, not the normal abort path."""


class PeerUnavailable(TransferError):
    """The peer cannot be reached, or went away mid-transfer."""


class IntegrityError(TransferError):
    """The received bytes do not match what was sent (checksum, size or shape mismatch)."""
