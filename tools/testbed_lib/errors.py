"""Exit statuses of tools/testbed and the one exception type that carries them.

`run` and `probe` exit with the guest command's own status (0-255) when the guest reported
one. The testbed's own failures use the two statuses that timeout(1) and container
runners use for the same purpose, and always say so on stderr, prefixed "testbed:":
"""

EXIT_OK = 0
EXIT_USAGE = 2        # bad command line (argparse's convention)
EXIT_GUEST_KERNEL = 123  # the guest kernel faulted (oops, BUG, panic, a WARNING in KVM): the
                         # run was ended within seconds of it, whatever the command did
EXIT_TIMEOUT = 124    # the time limit stopped qemu before the guest reported a status
EXIT_TESTBED = 125    # the testbed itself failed: host setup, image build, guest make,
                      # qemu, or the guest stopped without reporting a status (and
                      # without a kernel fault on the console)
EXIT_INTERRUPTED = 130  # Ctrl-C on the host (128 + SIGINT)
EXIT_TERMINATED = 143   # SIGTERM on the host (128 + SIGTERM)


class TestbedError(Exception):
    """A failure of the testbed itself (not of the command run inside), with its exit status."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, message: str, status: int = EXIT_TESTBED):
        super().__init__(message)
        self.status = status
