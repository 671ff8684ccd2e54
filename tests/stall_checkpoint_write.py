"""The real ``aligndistil`` CLI, with one checkpoint write stalled halfway, for crash tests.

Usage: ``python tests/stall_checkpoint_write.py STEP MARKER aligndistil-args...``

When the trainer writes the checkpoint of step ``STEP``, the trainer-state file (written last,
after the weights and the tokenizer) gets only the first half of its bytes, flushed to disk;
then ``MARKER`` is created and the process sleeps, so a test can SIGKILL it in the middle of
the write and find a torn file on disk. Nothing else is changed: this is test-only code, the
trainer itself has no such hook.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    stall_step, marker, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    real_save = torch.save

    def stalling_save(obj, f, *args, **kwargs):
        is_trainer_state = isinstance(obj, dict) and "optimizer" in obj and "step" in obj
        if not (is_trainer_state and obj["step"] == stall_step):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        marker.write_text(str(f))
        time.sleep(300)  # the test kills us here
        raise SystemExit("stall_checkpoint_write: nobody killed the process")

    torch.save = stalling_save
    from aligndistil.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
