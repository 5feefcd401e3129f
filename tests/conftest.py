import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "imagenet-sample-dev")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Under pytest-xdist (`make test` runs `-n 2`) each worker takes its share of the cores,
    # and so do the scripts the tests start (they inherit OMP_NUM_THREADS): two workers of one
    # thread each keep both cores busy through the tests that mostly import and spawn.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 1) // workers))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no CUDA device on this machine (the CUDA build is compile-checked by "
                     "scripts/check_cuda_build.sh)"))]
