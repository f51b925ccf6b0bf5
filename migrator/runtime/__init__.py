"""Container runtimes: OCI runtime adapters (runc, crun) and podman as
migration Workloads, and the restorers the destination uses for them.

Importing this package registers the container kinds in
``migrator.migration.workload.RESTORERS`` / ``RESUMERS``.
"""

from typing import Optional

from migrator.runtime import podman
from migrator.runtime.runc import ContainerWorkload, register  # noqa: F401

register()
podman.register()


def container_workload(container: str, runtime: Optional[str] = None,
                       shared_storage: bool = False):
    """The Workload of a container: podman's when podman has it (its
    containers also show up in runc's state, under their full ids, but
    must move through podman), else runc's or crun's."""
    if runtime == "podman" or (runtime is None and podman.exists(container)):
        return podman.PodmanWorkload(container, shared_storage)
    return ContainerWorkload(container, runtime, shared_storage)
