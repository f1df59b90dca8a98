"""The exit codes of every ``medseg`` command: one place, documented in the README's table.

* :data:`EXIT_OK` -- everything succeeded (or was deliberately skipped, with a reason);
* :data:`EXIT_BAD_ARGS` -- bad arguments or unusable inputs (argparse's own code; the message on
  stderr names the input and what to do);
* :data:`EXIT_PARTIAL` -- some cases/series failed, every good one was still written;
* :data:`EXIT_TRACKING_UNREACHABLE` -- all outputs were written, but MLflow could not be reached;
* :data:`EXIT_INTERRUPTED` -- stopped by Ctrl-C (128 + SIGINT, the shell's convention); finished
  outputs are kept and rerunning the same command resumes.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_ARGS = 2
EXIT_PARTIAL = 3
EXIT_TRACKING_UNREACHABLE = 4
EXIT_INTERRUPTED = 130
