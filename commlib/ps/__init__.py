"""Parameter-server runtime: a server that owns the model, the optimizer and the scheme's
server half; workers that pull parameters, compute gradients and push Payloads.

    from commlib.ps import PSConfig, run_inproc
    result = run_inproc({"name": "classification", "dataset": "digits"},
                        {"compressor": "topk", "ratio": 0.05, "feedback": "ef21"},
                        PSConfig(mode="sync", steps=50, quorum=3), n_workers=4)

Other transports: ``python -m commlib.ps --transport torch|mpi`` under torchrun / mpirun,
and ``commlib.ps.ray_runner.run_ray`` on a local Ray or a Ray cluster. Many logical workers per
process (virtual workers, ``commlib.ps.worker_group``): ``run_inproc_groups`` and
``commlib.ps.group_ray.run_ray_groups``. A sharded server (parameters split over k shards):
``run_inproc_sharded`` (threads), ``commlib.ps.shard_launch.ShardedProcessJob`` (processes over
gloo; ``--shards K`` under torchrun), ``commlib.ps.shard_ray.run_ray_sharded`` (Ray actors).
"""
from commlib.ps.config import PSConfig, build_optimizer  # noqa: F401
from commlib.ps.local import InprocJob, run_inproc  # noqa: F401
from commlib.ps.group_local import GroupInprocJob, run_inproc_groups  # noqa: F401
from commlib.ps.sharded_local import ShardedInprocJob, run_inproc_sharded  # noqa: F401
from commlib.ps.protocol import Frame, FrameFlag, FrameKind  # noqa: F401
from commlib.ps.server import ParameterServer, WorkerRecord  # noqa: F401
from commlib.ps.task import TASKS, ClassificationTask, Task, build_task  # noqa: F401
from commlib.ps.worker import PSWorker, WorkerCrashed, WorkerHooks  # noqa: F401
from commlib.ps import private as _private  # noqa: F401,E402  (registers the 'private' task)
