"""The kvmits arm64 KVM testbed: Debian's arm64 kernel under qemu-system-aarch64 (TCG, EL2 emulated).

`tools/testbed` is the command; this package is its implementation, split so that the pure
logic (argument parsing, cache stamps, init script, console markers, job file selection) is
testable on any host without qemu. Standard library only: it runs on the host's python3.
See docs/testbed.md.
"""
