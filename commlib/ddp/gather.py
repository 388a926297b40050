"""Every rank's hook state in one object, for frameworks that write one checkpoint from rank 0.

    blob = commlib.ddp.gather_state(state)        # collective: call on every rank
    ...                                           # rank 0 saves blob with the model
    commlib.ddp.load_gathered_state(state, blob)  # every rank takes its own entry

Each rank's ``state_dict()`` crosses the process group as ``torch.save`` bytes and is read back
with ``torch.load(weights_only=True)``: a peer's bytes are never unpickled.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping

import torch
import torch.distributed as dist

from commlib.ddp.state import HookState
from commlib.errors import ConfigError

FORMAT = "commlib.ddp.gathered_state/1"


def _to_bytes(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), map_location="cpu", weights_only=True)


def _comm_device(group) -> torch.device:
    """NCCL moves only CUDA tensors; gloo and others take CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_state(state: HookState) -> Dict[str, Any]:
    """Collect every rank's ``state.state_dict()`` into one object (returned on every rank).

    A collective over ``state.process_group``: every rank must call it. The result holds plain
    tensors, numbers and strings (loadable with ``torch.load(weights_only=True)``).
    """
    group = state.process_group
    mine = _to_bytes(state.state_dict())
    dev = _comm_device(group)
    n = state.world_size
    size = torch.tensor([mine.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    cap = max(lengths)
    padded = torch.zeros(cap, dtype=torch.uint8, device=dev)
    padded[:mine.numel()] = mine.to(dev)
    rows = [torch.empty(cap, dtype=torch.uint8, device=dev) for _ in range(n)]
    dist.all_gather(rows, padded, group=group)
    ranks: List[Dict[str, Any]] = [_from_bytes(r[:ln].cpu()) for r, ln in zip(rows, lengths)]
    return {"format": FORMAT, "world_size": n, "scheme": state.scheme.describe(), "ranks": ranks}


def load_gathered_state(state: HookState, blob: Mapping[str, Any]) -> None:
    """Restore this rank's entry of a :func:`gather_state` object (no communication).

    Refuses an object of another format, world size or scheme (:class:`ConfigError`).
    """
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT:
        raise ConfigError(f"not a commlib.ddp.gather_state object (expected format {FORMAT!r}); "
                          "a single rank's state_dict goes to HookState.load_state_dict")
    ranks = blob.get("ranks")
    if not isinstance(ranks, (list, tuple)) or len(ranks) != blob.get("world_size"):
        raise ConfigError("gathered hook state is malformed: 'ranks' must list one state per rank")
    if len(ranks) != state.world_size:
        raise ConfigError(f"hook state was gathered from {len(ranks)} ranks, this run has {state.world_size}: "
                          "error-feedback state is per rank and cannot be resharded")
    state.load_state_dict(ranks[state.rank])
