"""The benchmark suite (bench/run.py). Every bench keeps its state directories on tmpfs, as
/run is on a real system (this VM's /tmp is ext4, where each record save pays an fsync)."""

import os
import tempfile

if os.path.isdir("/dev/shm"):
    tempfile.tempdir = "/dev/shm"
