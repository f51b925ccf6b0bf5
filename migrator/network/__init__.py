"""Container networking around a move: the container keeps its address,
its veth is re-created on the destination and neighbours are told where
the address now lives (migrator.network.cutover)."""
