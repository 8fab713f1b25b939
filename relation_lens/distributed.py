"""Data parallelism over torch.distributed ranks, and resumable checkpoints.

The dataset workloads (:func:`~relation_lens.trace_dataset`, :meth:`KeyStatistics.compute
<relation_lens.key_statistics.KeyStatistics.compute>`, :func:`~relation_lens.evaluate`) call
:func:`ranks` and work on their share of the items: item ``i`` belongs to rank ``i % world_size``.
Every item keeps its own seed, so a rank computes exactly what one process would for that item; the
shares are then gathered (``all_gather_object``) or summed (``all_reduce`` of float64 sums) and
every rank ends with the same, whole result. Only rank 0 writes outputs.

A process group is used when one is initialised, or when ``torchrun`` describes one in the
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...): it is then initialised here with gloo
on CPUs and NCCL when CUDA is available. Without either, everything runs in one process as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from relation_lens.errors import ConfigError
from relation_lens.results import json_safe


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """The indices of ``n`` items that this rank works on (``i % world_size == rank``)."""
        return list(range(self.rank, n, self.world_size))


def ranks() -> Ranks:
    """This process's rank and the world size, initialising the group ``torchrun`` described."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        _OWNED.append(True)
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks(0, 1)


_OWNED: list[bool] = []  # a process group this module initialised (from torchrun's environment)


def shutdown() -> None:
    """Destroy the process group :func:`ranks` initialised, if any (the CLI calls it on exit)."""
    if _OWNED:
        if dist.is_initialized():
            dist.destroy_process_group()
        _OWNED.clear()


def gather(obj: Any, r: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if r.world_size == 1:
        return [obj]
    out: list[Any] = [None] * r.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, r: Ranks) -> torch.Tensor:
    """The sum of ``t`` over ranks (float64 kept; moved to the rank's GPU and back under NCCL)."""
    if r.world_size == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    work = t.to(dev).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def barrier(r: Ranks) -> None:
    if r.world_size > 1:
        dist.barrier()


def fingerprint(obj: Any) -> str:
    """A short hash of a JSON-serialisable description (the arguments a run was started with)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoint:
    """A folder of per-item results appended as they finish, for a run that can be killed and started
    again with the same arguments: it then skips what is done and loses nothing.

    Layout: ``manifest.json`` (what the run is: its arguments' fingerprint and description) and one
    ``items.rank{R}.jsonl`` per rank (each line ``{"index": i, ...}``, flushed and fsynced as written;
    a line cut short by a kill is ignored and redone). A folder holding a run with other arguments is
    refused with :class:`~relation_lens.errors.ConfigError` instead of mixing results.
    """

    def __init__(self, folder: str | Path, description: dict[str, Any], r: Ranks):
        self.folder = Path(folder)
        self.rank = r
        self.key = fingerprint(description)
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("fingerprint") != self.key:
                changed = sorted(k for k in set(description) | set(old.get("description", {}))
                                 if description.get(k) != old.get("description", {}).get(k))
                raise ConfigError(
                    f"checkpoint folder {str(self.folder)!r} holds a run started with other arguments (differing: "
                    f"{changed}); use another folder, or delete it to start over")
        barrier(r)
        if r.is_main and not manifest.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.key, "description": description}, indent=1,
                                      default=str))
            os.replace(tmp, manifest)
        barrier(r)
        self.folder.mkdir(parents=True, exist_ok=True)

    def done(self) -> dict[int, dict[str, Any]]:
        """Every item recorded by any rank of this or an earlier run, by index."""
        out: dict[int, dict[str, Any]] = {}
        for file in sorted(self.folder.glob("items.rank*.jsonl")):
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that item is redone
                out.setdefault(int(row["index"]), row)
        return out

    def append(self, row: dict[str, Any]) -> None:
        file = self.folder / f"items.rank{self.rank.rank}.jsonl"
        if file.is_file() and file.stat().st_size:
            with open(file, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
            if cut:  # the last line was cut short by a kill: end it, so it stays one unreadable line
                with open(file, "a", encoding="utf-8") as fh:
                    fh.write("\n")
        with open(file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
