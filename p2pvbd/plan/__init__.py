"""Pure planning algorithms behind sync_planner: no I/O."""
