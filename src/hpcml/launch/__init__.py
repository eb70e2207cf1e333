"""Starting ranks, above training: the elastic launcher (`--nproc`, `--nnodes`, restarts) and the
worker entry point each rank runs."""
