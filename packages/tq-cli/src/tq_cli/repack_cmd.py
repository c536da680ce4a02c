"""`tq repack-experts`: rewrite a checkpoint with its experts in perm.json's order."""

from __future__ import annotations

import sys

from .main import CommandError

__all__ = ["run"]


def run(args) -> int:
    from tq_stream import StreamError, read_perm_file, repack_experts

    try:
        out = repack_experts(args.model, read_perm_file(args.perm), args.out, args.force)
    except StreamError as e:
        raise CommandError(str(e)) from None
    except FileExistsError as e:
        raise CommandError(str(e)) from None
    except FileNotFoundError as e:
        raise CommandError(f"{args.model}: {e.strerror}: {e.filename}") from None
    print(
        f"repacked: {out} (re-run calibrate-experts there for a matching pin.json)", file=sys.stderr
    )
    return 0
