"""The parameter-server task the PS tests share: the model, data and per-(rank, step) batches
of tests/ddp_jobs.py (batch 16), so PS runs can be compared with the DDP jobs."""
import torch.nn as nn

from commlib.ps import Task
from ddp_jobs import Net, make_data, shard

X, Y = make_data()


class DDPJobTask(Task):
    """The model, data and per-(rank, step) batches of tests/ddp_jobs.py (batch 16)."""

    num_classes = 4

    def build_model(self):
        return Net()

    def loss(self, model, worker, n_workers, step, *, flip_labels=False):
        xb, yb = shard(X, Y, worker, n_workers, step, 16)
        return nn.functional.cross_entropy(model(xb), yb)
