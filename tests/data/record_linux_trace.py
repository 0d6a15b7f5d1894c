"""Records tests/data/linux-boot-user-trace.jsonl.gz: `kvmits run --trace all` of the nested Linux
guest with the userspace ITS (4 vCPUs, a virtio-blk disk, virtio-rng, a job reading both), in
the arm64 testbed. It prints the gzip'ed trace as base64 between two marker lines:

    tools/testbed run -q -- python3 tests/data/record_linux_trace.py > /tmp/rec.out
    sed -n '/^TRACE-BEGIN$/,/^TRACE-END$/p' /tmp/rec.out | sed '1d;$d' | base64 -d \
        > tests/data/linux-boot-user-trace.jsonl.gz
"""

import base64
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmits.lab.linux_guest import LinuxGuest

JOB = """
dd if=/dev/vda of=/dev/null bs=4096 count=8 iflag=direct 2>/dev/null
dd if=/dev/hwrng bs=16 count=2 2>/dev/null | wc -c
"""

guest = LinuxGuest.find()
if guest is None:
    sys.exit(LinuxGuest.why_missing())
with tempfile.TemporaryDirectory() as d:
    disk, initrd, trace = Path(d, "disk.img"), Path(d, "initrd.cpio"), Path(d, "trace.jsonl")
    disk.write_bytes(bytes(1 << 20))
    initrd.write_bytes(guest.initrd(JOB))
    subprocess.run([sys.executable, "-m", "kvmits", "run", str(guest.image), "--cpus", "4", "--mem", "512M",
                    "--its", "user", "--initrd", str(initrd), "--append", "console=ttyAMA0 quiet panic=-1",
                    "--disk", str(disk), "--rng", "--trace", "all", "--trace-file", str(trace), "--timeout", "600"],
                   stdin=subprocess.DEVNULL, check=True, stdout=subprocess.DEVNULL)
    data = gzip.compress(trace.read_bytes(), 9, mtime=0)
print("TRACE-BEGIN")
print(base64.encodebytes(data).decode(), end="")
print("TRACE-END")
