"""papermill's command line (same arguments), with the kernel's ZeroMQ sockets encrypted.

ipykernel >= 7 warns at start-up that a kernel on TCP without encryption sends code and outputs in
plain text. jupyter_client >= 8.10 can provision CurveZMQ keys for kernels that declare support
(``KernelManager.transport_encryption = "auto"``), but papermill's command line has no way to pass
kernel-manager settings, so this wrapper hands papermill's ``execute_notebook`` that setting and runs
its command line unchanged. With an older jupyter_client (no such setting) it is plain papermill.

    python scripts/run_notebook.py IN.ipynb OUT.ipynb -k python3 -p profile smoke ...
"""

from __future__ import annotations

import functools
import sys


def encrypted_transport_config():
    """The traitlets Config turning on CurveZMQ for kernels that support it, or None where unsupported."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names() or not zmq.has("curve"):
        return None
    return Config({"KernelManager": {"transport_encryption": "auto"}})


def main() -> None:
    import papermill.cli

    config = encrypted_transport_config()
    if config is not None:
        # cli.papermill calls the module-level name; nbclient passes `config` on to its kernel manager
        papermill.cli.execute_notebook = functools.partial(papermill.cli.execute_notebook, config=config)
    papermill.cli.papermill(prog_name="papermill")


if __name__ == "__main__":
    sys.exit(main())
