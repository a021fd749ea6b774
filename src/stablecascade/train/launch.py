"""Run one training config on N local processes without torchrun (gloo on CPU): what the distributed test uses,
and a quick way to try multi-process training on one machine. Each rank writes `rank{r}.json`/`.safetensors` (its
step records and a copy of the trained weights) to `report_dir`."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, report_dir: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from .config import from_dict
    from .statefile import write_state
    from .trainer import Trainer

    trainer = Trainer(from_dict(cfg).validate())
    try:
        trainer.fit()
        # under FSDP each rank holds shards: full_tensor() gathers them (a collective, before the group closes)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                 for k, v in trainer.trained.state_dict().items()}
    finally:
        trainer.dist.close()
    write_state(Path(report_dir), f"rank{rank}", {"history": trainer.history, "state": state})


def spawn_local(cfg: dict, world: int, report_dir) -> list[dict]:
    """Train `cfg` on `world` processes; returns each rank's {"history", "state"}."""
    import torch.multiprocessing as mp

    from .statefile import read_state

    Path(report_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), cfg, str(report_dir)), nprocs=world, join=True)
    return [read_state(Path(report_dir), f"rank{r}") for r in range(world)]
