"""OCI runtime hooks: a registry of the containers migrator may move, and
the hook stages (poststart, poststop, createRuntime) that keep it current.

`migrator hook STAGE` (migrator/cli/hook.py) is the entry point a runtime
calls; `registry` is what the migration drivers and `migrator list` read.
Nothing here loads the native module: a hook runs on every container start
and must not fail because the dirty-tracking layer is not built.
"""
