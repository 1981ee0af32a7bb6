"""Services around moving data between hosts: the multi-peer pull, warm replicas, a migration's destination."""
