"""host:port strings that also hold for IPv6 hosts (Ray reports a node's IPv6 address on some machines)."""

from __future__ import annotations


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets, as gRPC targets and bind addresses need."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """The inverse of join_host_port: the bare host (no brackets) and the port."""
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)
