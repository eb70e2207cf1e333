"""Many independent jobs, above training: the task runner (local pool | Ray), sweeps and
cross-validation, parallel batch predict."""
