"""DDP runtime: commlib schemes as DistributedDataParallel communication hooks.

    state = commlib.ddp.register(ddp_model, commlib.Scheme("dgc", ratio=0.001, feedback="ef21"), optimizer=opt)

or, for people who build the state themselves:

    state = commlib.ddp.HookState(scheme)
    ddp_model.register_comm_hook(state, commlib.ddp.hook)

Checkpoints: ``state.state_dict()`` per rank, or ``gather_state(state)`` (all ranks in one
object, a collective) and ``load_gathered_state(state, blob)`` (each rank takes its own).
Lightning and Accelerate: ``commlib.integrations``.
"""
from commlib.ddp.checks import CommlibWarning, HookNotRunWarning  # noqa: F401
from commlib.ddp.decentralized import MoNNAMixer  # noqa: F401
from commlib.ddp.gather import gather_state, load_gathered_state  # noqa: F401
from commlib.ddp.hooks import hook, sync_gradients  # noqa: F401
from commlib.ddp.private import private_trainer  # noqa: F401
from commlib.ddp.register import check_optimizer, register  # noqa: F401
from commlib.ddp.state import HookState  # noqa: F401
