"""Process groups and rank info, below training: `DistInfo` from hpcml's launcher, torchrun, SLURM or
Ray environments, `init_process_group`, the DDP wrapper and all-reduce helpers. Models know nothing
of ranks; the trainer receives a DistInfo and wraps the model here."""
