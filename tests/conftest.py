import os
import secrets
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("COMMLIB_TMP", os.path.join(ROOT, ".tmp"))
# the job secret every process of a test inherits (network transports refuse to start without one)
os.environ.setdefault("COMMLIB_SECRET", secrets.token_hex(32))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
