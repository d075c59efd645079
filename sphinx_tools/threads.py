"""The OpenMP threading policy: threads that wait sleep instead of spinning.

Torch's CPU kernels run on OpenMP threads. With the default wait policy, a thread that finishes
its share of an operation spins, waiting for the others; when another process competes for the
cores, the thread it waits for is not scheduled and every small operation (a decode step is a
few hundred of them) costs a scheduler time slice instead of microseconds. With
``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep at once, so decoding degrades gracefully on a
busy machine and gives its cores back when it is idle. Results do not depend on the wait policy.

The OpenMP runtime reads the variable once, when torch loads it, so :func:`apply` must run before
the first ``import torch``: importing this module calls it, and ``import sphinx_tools`` (which
the command line, ``serve`` and notebooks do first) imports this module before anything else.
It only sets a default: a value the user set wins. Set ``OMP_WAIT_POLICY=ACTIVE`` to get
spinning threads back (a dedicated, otherwise idle machine).
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"


def apply() -> bool:
    """Set ``OMP_WAIT_POLICY`` to ``PASSIVE`` unless it is set already.

    Returns:
        True when the policy governs this process: the variable is ``PASSIVE`` (set here or by
        the user) and torch was not loaded before it was set.
    """
    torch_loaded = "torch" in sys.modules  # then only the processes it starts get the default
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return not torch_loaded and os.environ["OMP_WAIT_POLICY"].upper() == WAIT_POLICY


apply()
