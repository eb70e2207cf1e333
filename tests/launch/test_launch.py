"""Launch checks that need no ranks: --nproc against the cores or GPUs found, refused before any start."""

import os

import pytest

from hpcml.errors import UsageError
from hpcml.launch.elastic import check_nproc


def test_nproc_within_the_cores_or_gpus_passes():
    check_nproc(2, device="cpu", cores=2, gpus=0)
    check_nproc(2, device="auto", cores=2, gpus=0)
    check_nproc(8, device="auto", cores=2, gpus=8)  # CUDA: a GPU per rank, cores do not limit it
    check_nproc(4, device="cpu", cores=4, gpus=1)  # device cpu on a GPU machine counts cores
    check_nproc(1, device="cuda:1", cores=2, gpus=2)


@pytest.mark.parametrize(
    ("nproc", "device", "cores", "gpus", "message"),
    [
        (3, "cpu", 2, 0, r"--nproc 3 is more than the 2 CPU core\(s\)"),
        (1000, "auto", 2, 0, r"--nproc 1000 is more than the 2 CPU core\(s\).*--nproc 2 or fewer"),
        (3, "auto", 64, 2, r"--nproc 3 is more than the 2 GPU\(s\) found"),
        (3, "cuda", 64, 2, r"--nproc 3 is more than the 2 GPU\(s\) found.*--nproc 2 or fewer"),
        (2, "cuda:0", 64, 2, r"device='cuda:0' would put all 2 ranks on one GPU"),
        (1, "cuda", 64, 0, r"device='cuda' but no CUDA device is available"),
    ],
)
def test_too_many_ranks_are_refused_naming_the_count(nproc, device, cores, gpus, message):
    with pytest.raises(UsageError, match=message):
        check_nproc(nproc, device=device, cores=cores, gpus=gpus)


def test_cli_refuses_more_ranks_than_cores(cli, tmp_path):
    cores = len(os.sched_getaffinity(0))
    nproc = max(64, cores + 1)
    r = cli("train", "--nproc", str(nproc), "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"--nproc {nproc} is more than the {cores} CPU core(s)" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_elastic_loggers_are_quiet_for_the_launch_only():
    import logging

    from hpcml.launch.elastic import _elastic_log_level

    child = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    parent = logging.getLogger("torch.distributed.elastic")
    child_before, before = child.level, parent.level
    child.setLevel(logging.INFO)
    try:
        with _elastic_log_level(logging.WARNING):
            assert child.level == logging.WARNING and parent.level == logging.WARNING
            assert not child.isEnabledFor(logging.INFO)
        assert child.level == logging.INFO and parent.level == before
    finally:
        child.setLevel(child_before)
