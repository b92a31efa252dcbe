"""``python -m stem_boost`` = the ``stem-boost`` command.

A launched worker (WORLD_SIZE > 1: torchrun, deepspeed) that finished cleanly leaves through
`os._exit` after flushing its output, without the interpreter's finalisation: there a gloo process
group's worker threads, even after `destroy_process_group`, can abort the process ("terminate called
without an active exception", exit code -6; seen twice in two-rank CPU runs of the test suite, once
after the group was destroyed explicitly). A worker that fails raises as usual.
"""

import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # what the atexit handler of `dist.init_from_env` would have done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
raise SystemExit(code)
