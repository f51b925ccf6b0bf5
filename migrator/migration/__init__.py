"""Source and destination drivers of a live migration, the convergence
policy, and the destination's page store."""
