"""How the driver joins Ray, decided before Ray is imported: Ray reads some of it (the auth mode) at import."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from splitserve.config import ClusterSection

log = logging.getLogger(__name__)
RAY_AUTH_MODE = "RAY_AUTH_MODE"


def ray_init_args(cluster: ClusterSection, environ: Mapping[str, str]) -> dict[str, Any]:
    """How the driver finds Ray: ``cluster.address`` when set; inside a Ray job (Ray sets RAY_ADDRESS for the job's
    entrypoint) the job's cluster; otherwise a fresh local Ray."""
    if cluster.address:
        return {"address": cluster.address, "namespace": cluster.namespace}
    if environ.get("RAY_ADDRESS"):
        return {"address": "auto", "namespace": cluster.namespace}
    return {"namespace": cluster.namespace, "include_dashboard": False, "log_to_driver": True}


def pin_local_ray_auth(cluster: ClusterSection, environ: MutableMapping[str, str]) -> None:
    """A fresh local Ray turns token authentication on by default and warns that it did. Keep it on (anyone who can
    reach its ports could otherwise run code in the workers), say so in one line, and set the mode explicitly, which
    Ray does not warn about. Must run before Ray is imported: Ray caches its config then. A cluster being joined,
    and a RAY_AUTH_MODE the user set, are left as they are."""
    if RAY_AUTH_MODE in environ or "address" in ray_init_args(cluster, environ):
        return
    environ[RAY_AUTH_MODE] = "token"
    log.info("local Ray: token authentication on (token in ~/.ray/auth_token; %s=disabled turns it off)", RAY_AUTH_MODE)
