"""Run Celery, gunicorn or an agent so that a fault drill can kill it at an exact point of its work.

    python -m tests.e2e.faultpoint celery -A agora worker ...
    python -m tests.e2e.faultpoint gunicorn agora.wsgi ...
    python -m tests.e2e.faultpoint agora-worker run ...

A kill -9 at a random moment rarely lands inside a 100 ms aggregation of a tiny model; a drill wants it
there every time. So the program runs with a Python audit hook (``sys.addaudithook``, which sees every file
the process opens) that, while the file ``AGORA_FAULT_ARM`` exists, freezes the process (SIGSTOP to
itself) the first time it opens a file of the kind ``AGORA_FAULT_AT`` names, under ``AGORA_FAULT_ROOT``
(the checkpoint storage folder; for an agent, its cache folder):

- ``aggregation``: an uploaded update opened for reading; only aggregation reads updates, so the round is
  claimed (``aggregating``) and nothing of the step is written yet.
- ``blob-write``: a checkpoint (not an update, not an outer-optimizer state) opened for writing: the new
  weights of the step, their file (or its temporary file) created and still empty.
- ``upload``: an update opened for writing: the web process is storing a worker's upload, inside the
  transaction that records it.
- ``task``: (an agent) a file written into its cache: the round's checkpoint, just downloaded after the
  claim and before any training; a tiny model trains in a fraction of a second, so a kill timed from the
  outside often lands after the result is in.

It records its pid in ``AGORA_FAULT_HIT`` (created exclusively, so the fault fires once per drill, across
restarts and pool children) before stopping. The drill waits for that file and sends the real
``kill -9``. Nothing here changes what the program does until the moment it stops.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_busy = threading.local()


def _wants_write(mode, flags) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def _install(point: str, root: str, arm: str, hit: str) -> None:
    root = os.path.abspath(root) + os.sep  # FileSystemStorage names files by abspath(location) too
    updates, outer = root + "updates" + os.sep, root + "outer" + os.sep

    def hook(event: str, args: tuple) -> None:
        if event != "open" or getattr(_busy, "on", False):
            return
        path = args[0]
        if not isinstance(path, str):
            return
        path = os.path.abspath(path)
        if not path.startswith(root):
            return
        write = _wants_write(args[1], args[2] if len(args) > 2 else None)
        if point == "aggregation":
            wanted = path.startswith(updates) and not write
        elif point == "blob-write":  # checkpoints live in <sha[:2]>/ folders, beside updates/ and outer/
            wanted = write and not path.startswith(updates) and not path.startswith(outer)
        elif point == "upload":
            wanted = write and path.startswith(updates)
        else:  # task
            wanted = write
        if not wanted or not os.path.exists(arm):
            return
        _busy.on = True
        try:
            fd = os.open(hit, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        finally:
            _busy.on = False
        os.write(fd, f"{os.getpid()} {path}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)


def main() -> None:
    program, args = sys.argv[1], sys.argv[2:]
    point = os.environ.get("AGORA_FAULT_AT", "")
    if point:
        if point not in ("aggregation", "blob-write", "upload", "task"):
            raise SystemExit(f"AGORA_FAULT_AT={point!r}: expected aggregation, blob-write, upload or task")
        _install(point, os.environ["AGORA_FAULT_ROOT"], os.environ["AGORA_FAULT_ARM"], os.environ["AGORA_FAULT_HIT"])
    sys.argv = [program, *args]
    if program == "celery":
        from celery.__main__ import main as celery_main

        celery_main()
    elif program == "gunicorn":
        from gunicorn.app.wsgiapp import run

        sys.exit(run())
    elif program == "agora-worker":
        from workers.cli import main as agent_main

        sys.exit(agent_main())
    else:
        raise SystemExit(f"unknown program {program!r}")


if __name__ == "__main__":
    main()
