"""`tq generate --distributed`: one rank of an ``mlx.launch`` job, with bounded waits.

Every rank loads its shard of the model (tensor-parallel through mlx-lm's ``Model.shard``,
or pipeline-parallel) with ``tq_core.lm.sharded_load`` and runs the same greedy/sampled
generation; rank 0 prints the text, every rank prints its own speed and memory to stderr.
MLX's collectives block without a time limit (a ring rank waits for a missing peer forever),
so a watchdog ends a rank that waits on the others longer than ``--dist-timeout`` with an
error naming what it waited for; ``mlx.launch`` then stops the remaining ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from .main import CommandError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Watchdog",
    "add_distributed_arguments",
    "check_distributed_arguments",
    "finish_together",
    "init_group",
    "load_distributed",
    "stats_path",
]

#: Seconds a rank waits on the others (group start, the load barrier, each token).
DEFAULT_TIMEOUT = 300.0


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "distributed (run every rank with mlx.launch; see docs/distributed.md)"
    )
    g.add_argument(
        "--distributed",
        nargs="?",
        const="tensor",
        choices=("tensor", "pipeline"),
        help="shard the model over the mx.distributed group mlx.launch started: tensor "
        "(default; heads and MLP columns split, mlx-lm's Model.shard) or pipeline (layers)",
    )
    g.add_argument(
        "--dist-backend",
        default="any",
        choices=("any", "ring", "mpi", "nccl", "jaccl"),
        help="mx.distributed backend (default: whichever mlx.launch set up)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="end a rank that waits more than S seconds on the others: group start, "
        f"loading, each token (0: wait forever; default {DEFAULT_TIMEOUT:g})",
    )


def check_distributed_arguments(args) -> None:
    if not getattr(args, "distributed", None):
        if args.dist_backend != "any" or args.dist_timeout != DEFAULT_TIMEOUT:
            raise CommandError("--dist-backend/--dist-timeout need --distributed")
        return
    if args.dist_timeout < 0:
        raise CommandError("--dist-timeout must be >= 0")
    if args.stream_experts:
        raise CommandError("--distributed and --stream-experts cannot be combined yet")
    if args.chat:
        raise CommandError("--distributed runs one --prompt; --chat is not supported")


#: The watchdog process: re-armed by "kick [what]" lines on stdin, disarmed by "stop"; when
#: armed and silent for the limit it reports and terminates its parent. A separate process
#: because a rank blocked in an MLX collective holds the GIL: no Python thread or signal
#: handler of its own would run.
_WATCHDOG = r"""
import os, select, signal, sys, time
parent, seconds, label = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
what, deadline, buf = "", None, b""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([0], [], [], wait)[0]:
        sys.stderr.write(
            f"tq: error: {label}: no progress for {seconds:g} s while {what}; a rank has died, "
            "is stuck, or the host list is wrong (check mlx.launch's --hosts/--hostfile and "
            "that every rank started). Raise --dist-timeout for slow loads.\n"
        )
        sys.stderr.flush()
        os.kill(parent, signal.SIGTERM)
        time.sleep(2)
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    data = os.read(0, 4096)
    if not data:
        sys.exit(0)
    *lines, buf = (buf + data).split(b"\n")
    for line in lines:
        cmd, _, arg = line.decode().partition(" ")
        if cmd == "kick":
            deadline, what = time.monotonic() + seconds, arg or what
        elif cmd == "stop":
            deadline = None
        elif cmd == "label":
            label = arg
"""


class Watchdog:
    """Terminates this process with a clear message when a phase outlasts ``seconds``
    without a :meth:`kick` (``seconds`` = 0: never). The clock runs in a small child
    process, which exits with this one."""

    def __init__(self, seconds: float, label: str):
        import subprocess

        self.seconds = seconds
        self._proc = None
        if seconds > 0:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(seconds),
                 label],
                stdin=subprocess.PIPE,
            )  # fmt: skip

    def _send(self, line: str) -> None:
        if self._proc is not None:
            self._proc.stdin.write(line.replace("\n", " ").encode() + b"\n")
            self._proc.stdin.flush()

    def relabel(self, label: str) -> None:
        self._send(f"label {label}")

    def kick(self, what: str | None = None) -> None:
        """Restart the clock (for ``what`` from now on, if given)."""
        self._send(f"kick {what or ''}")

    def stop(self) -> None:
        self._send("stop")

    @contextmanager
    def guard(self, what: str):
        self.kick(what)
        try:
            yield self
        finally:
            self.stop()


def init_group(backend: str, watchdog: Watchdog):
    """The ``mx.distributed`` group of this process; CommandError outside a launched job."""
    import mlx.core as mx

    if not mx.distributed.is_available(backend):
        raise CommandError(
            f"--distributed: MLX's {backend!r} distributed backend is not available here"
        )
    with watchdog.guard("waiting for the other ranks to join the group"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise CommandError(
                f"--distributed: cannot start the {backend!r} group ({e}); launch every rank "
                "with mlx.launch, e.g. `mlx.launch --backend ring -n 2 -- tq generate "
                "--distributed ...`"
            ) from None
    return group


def load_distributed(path, args):
    """``(model, tokenizer, group, watchdog)``: this rank's shard of the checkpoint."""
    from tq_core.lm import sharded_load

    label = "tq generate --distributed"
    watchdog = Watchdog(args.dist_timeout, label)
    group = init_group(args.dist_backend, watchdog)
    watchdog.relabel(f"{label} (rank {group.rank()} of {group.size()})")
    mode = args.distributed
    groups = {"tensor_group": group} if mode == "tensor" else {"pipeline_group": group}
    print(
        f"tq: rank {group.rank()} of {group.size()}, {args.distributed}-parallel",
        file=sys.stderr,
        flush=True,
    )
    with watchdog.guard("loading the model and waiting for every rank to finish loading"):
        try:
            model, tokenizer = sharded_load(path, **groups)
        except ValueError as e:  # unsplittable layers, heads, unsupported architectures
            raise CommandError(f"rank {group.rank()}: {e}") from None
    return model, tokenizer, group, watchdog


def finish_together(group, watchdog: Watchdog) -> None:
    """Wait for this rank's queued work, then for every rank. mlx-lm computes one token
    ahead, so when generation stops each rank still has a step in flight whose collectives
    need every peer: a rank that exited at once would fail the others' last step."""
    import mlx.core as mx

    with watchdog.guard("finishing the last generation step with the other ranks"):
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def stats_path(template: str | None, rank: int, size: int) -> str | None:
    """Where this rank writes ``--stats-json``: ``{rank}`` in the name is replaced; without
    it only rank 0 writes (every rank's speed and memory are on stderr regardless)."""
    if template is None:
        return None
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    return template if rank == 0 else None
