"""init_parallel outside torchrun opens a one-rank group on a loopback port picked free; another process can take
that port before the store binds it (seen under `make test`: convert failed with EADDRINUSE). A taken port is retried."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import socket
    import torch
    import omni_model.runtime.parallel as parallel

    held = socket.socket()  # a port another process holds
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    free = parallel._free_port
    handed = []

    def racing_free_port():  # the first two picks lose the race to the holder
        handed.append(taken if len(handed) < 2 else free())
        return handed[-1]

    parallel._free_port = racing_free_port
    parallel.init_parallel()
    print("handed", *handed, "world", torch.distributed.get_world_size())
""")



def test_a_port_taken_between_picking_and_binding_is_retried():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    handed = words[words.index("handed") + 1:words.index("world")]
    assert len(handed) == 3 and handed[0] == handed[1] != handed[2] and words[-1] == "1"
