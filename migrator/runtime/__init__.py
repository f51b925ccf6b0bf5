"""Container runtimes: OCI runtime adapters (runc, crun) as migration
Workloads, and the restorers the destination uses for them.

Importing this package registers the container kinds in
``migrator.migration.workload.RESTORERS`` / ``RESUMERS``.
"""

from migrator.runtime.runc import (ContainerWorkload, container_workload,  # noqa: F401
                                   register)

register()
