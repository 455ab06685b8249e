"""Run a module with every file open recorded: ``python tests/open_audit.py -m MODULE ARGS...``.

For tests/test_cluster.py, which must show that each rank reads only files on its own node.
With ``CLIMSEG_OPEN_AUDIT=DIR`` each process appends the paths it opens (an audit hook sees
``open()`` and ``os.open()``, the loader's reads; a wrapper sees ``h5py.File``, whose opens
happen in C) to ``DIR/<rank>-<hostname>.txt``, the rank from ``SLURM_PROCID``. Test-only: it
changes nothing else about the run.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def install(folder: str) -> None:
    rank = os.environ.get("SLURM_PROCID", "x")
    # Opened before the hook exists, written with os.write: neither is itself an "open" event.
    fd = os.open(os.path.join(folder, f"{rank}-{socket.gethostname()}.txt"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            os.write(fd, os.fsencode(os.path.abspath(os.fsdecode(path))) + b"\n")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            record(args[0])

    sys.addaudithook(hook)
    import h5py

    opened = h5py.File.__init__

    def audited_init(self, name, *rest, **kwargs):
        record(name)
        opened(self, name, *rest, **kwargs)

    h5py.File.__init__ = audited_init


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: open_audit.py -m MODULE ARGS...")
    if os.environ.get("CLIMSEG_OPEN_AUDIT"):
        install(os.environ["CLIMSEG_OPEN_AUDIT"])
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
