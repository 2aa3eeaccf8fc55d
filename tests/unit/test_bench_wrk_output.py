"""bench.run's reading of wrk's text output, on outputs wrk printed (wrk 4.1, `--latency`)."""

from __future__ import annotations

import pytest

from bench.run import _ms, parse_wrk

# wrk against a server answering after 1.2 s: a latency in seconds is printed "1.24s " (wrk's print_units pads
# a one-letter unit with a space to line up with the two-letter ones), so its lines end in a space.
SECONDS = (
    "Running 3s test @ http://127.0.0.1:18761/\n"
    "  1 threads and 2 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     1.23s    17.22ms   1.24s   100.00%\n"
    "    Req/Sec     1.00      0.00     1.00    100.00%\n"
    "  Latency Distribution\n"
    "     50%    1.24s \n"
    "     75%    1.24s \n"
    "     90%    1.24s \n"
    "     99%    1.24s \n"
    "  4 requests in 3.01s, 452.00B read\n"
    "Requests/sec:      1.33\n"
    "Transfer/sec:     150.27B\n"
)

# the same under its usual load: two-letter units, no padding; socket errors and non-2xx answers
MILLISECONDS = (
    "Running 10s test @ https://127.0.0.1:8443/x\n"
    "  1 threads and 50 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     9.87ms    2.10ms  40.02ms   90.00%\n"
    "    Req/Sec     5.07k   300.00     5.50k    70.00%\n"
    "  Latency Distribution\n"
    "     50%    9.51ms\n"
    "     75%   10.80ms\n"
    "     90%   12.33ms\n"
    "     99%  850.00us\n"
    "  50512 requests in 10.00s, 55.23MB read\n"
    "  Socket errors: connect 0, read 3, write 1, timeout 2\n"
    "  Non-2xx or 3xx responses: 4\n"
    "Requests/sec:   5051.20\n"
    "Transfer/sec:      5.52MB\n"
)


def test_latencies_in_seconds_with_wrk_s_trailing_pad_are_read() -> None:
    """A p50 and p99 of a second or more ("1.24s ", padded) are read (was KeyError: '99' on a loaded machine)."""
    result = parse_wrk(SECONDS)
    assert (result.requests, result.seconds, result.p50_ms, result.p99_ms) == (4, 3.01, 1240.0, 1240.0)
    assert result.errors == 0


def test_latencies_in_milliseconds_and_microseconds_and_the_errors_are_read() -> None:
    """Two-letter units, and the socket errors and non-2xx answers summed."""
    result = parse_wrk(MILLISECONDS)
    assert (result.requests, result.seconds, result.p50_ms, result.errors) == (50512, 10.0, 9.51, 10)
    assert result.p99_ms == pytest.approx(0.85)


@pytest.mark.parametrize(
    ("text", "ms"), [("850.00us", 0.85), ("9.51ms", 9.51), ("1.24s", 1240.0), ("2.50m", 150_000.0), ("1.00h", 3.6e6)]
)
def test_every_unit_wrk_prints_a_time_in(text: str, ms: float) -> None:
    """us, ms, s, and past a minute m and h (wrk's format_time_us)."""
    assert _ms(text) == pytest.approx(ms)


def test_an_output_without_a_latency_distribution_names_what_wrk_said() -> None:
    """wrk's output lacking a percentile line is an error quoting that output, not a KeyError."""
    with pytest.raises(RuntimeError, match="Running 3s test"):
        parse_wrk(SECONDS.replace("     99%    1.24s \n", ""))
