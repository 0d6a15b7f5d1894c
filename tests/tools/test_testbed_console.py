from testbed_lib.console import EXIT, START, ConsoleFilter, new_token

TOKEN = "0123456789abcdef"


def console_bytes(*lines: str) -> bytes:
    # what the serial line delivers: ONLCR turns each \n into \r\n
    return "".join(line + "\n" for line in lines).replace("\n", "\r\n").encode()


def feed_all(f: ConsoleFilter, data: bytes, chunk: int) -> str:
    shown = "".join(f.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return shown + f.finish()


RUN = console_bytes(
    "[    0.58] kvm [1]: VHE mode initialized successfully",
    f"{START} {TOKEN} uptime=2.31",
    "hello from the guest",
    "ünïcødé ok",
    f"{EXIT} {TOKEN} 3 uptime=4.00",
    "[    4.60] reboot: Power down",
)


def test_status_found_whatever_the_chunking():
    for chunk in (1, 2, 3, 7, 64, len(RUN)):
        f = ConsoleFilter(TOKEN)
        shown = feed_all(f, RUN, chunk)
        assert f.started and f.status == 3, chunk
        assert "\r" not in shown
        assert shown == RUN.decode().replace("\r", "")


def test_quiet_shows_only_the_commands_output():
    f = ConsoleFilter(TOKEN, quiet=True)
    assert feed_all(f, RUN, 5) == "hello from the guest\nünïcødé ok\n"
    assert f.status == 3


def test_markers_with_another_token_are_command_output():
    fake = console_bytes(f"{START} {TOKEN}", f"{EXIT} deadbeefdeadbeef 0", "still running",
                         f"{EXIT} {TOKEN} 1")
    f = ConsoleFilter(TOKEN, quiet=True)
    shown = feed_all(f, fake, 4)
    assert f.status == 1
    assert shown == f"{EXIT} deadbeefdeadbeef 0\nstill running\n"


def test_exit_before_start_still_counts_but_output_needs_start():
    f = ConsoleFilter(TOKEN, quiet=True)
    assert feed_all(f, console_bytes("boot noise", f"{EXIT} {TOKEN} 125"), 3) == ""
    assert not f.started and f.status == 125


def test_output_without_final_newline_shares_the_marker_line():
    data = console_bytes(f"{START} {TOKEN}", f"no newline{EXIT} {TOKEN} 0 uptime=1")
    f = ConsoleFilter(TOKEN, quiet=True)
    assert feed_all(f, data, 6) == "no newline\n"
    assert f.status == 0


def test_only_the_first_exit_marker_counts():
    f = ConsoleFilter(TOKEN)
    feed_all(f, console_bytes(f"{START} {TOKEN}", f"{EXIT} {TOKEN} 4", f"{EXIT} {TOKEN} 0"), 9)
    assert f.status == 4


def test_no_marker_no_status_and_panic_is_noted():
    data = console_bytes("[    1.9] Kernel panic - not syncing: VFS: Unable to mount root fs",
                         "[    1.9] ---[ end Kernel panic ]---")
    f = ConsoleFilter(TOKEN)
    feed_all(f, data, 10)
    assert f.status is None and not f.started
    assert f.panic == "[    1.9] Kernel panic - not syncing: VFS: Unable to mount root fs"


def test_partial_line_at_the_end_is_flushed_in_quiet_mode():
    f = ConsoleFilter(TOKEN, quiet=True)
    shown = f.feed(console_bytes(f"{START} {TOKEN}") + b"dots....")
    assert shown == ""
    assert f.finish() == "dots....\n"


def test_invalid_utf8_is_replaced_not_fatal():
    f = ConsoleFilter(TOKEN)
    assert "\ufffd" in f.feed(b"\xff\xfe bad\r\n")


def test_tokens_are_random_and_marker_safe():
    a, b = new_token(), new_token()
    assert a != b and a.isalnum() and len(a) == 16
