"""The daemon fixture turns a sanitizer report in the daemon's log into a failure
(what makes the sanitizer job fail on a report, see scripts/test-sanitizers.sh)."""

import subprocess

import pytest

from vhost_core.testing.daemon import VhostDaemon

ASAN = ("=================================================================\n"
        "==4242==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x602000000011\n"
        "WRITE of size 1 at 0x602000000011 thread T3\n")
UBSAN = "src/vhost_dev_scsi/scsi.c:612:31: runtime error: shift exponent 64 is too large\n"


def _daemon_that_printed(tmp_path, text: str) -> VhostDaemon:
    # A stand-in process: stop() reads the log whatever printed it.
    d = VhostDaemon(tmp_path)
    d._logf = open(d.log_path, "wb")
    d.proc = subprocess.Popen(["sh", "-c", "printf '%s' \"$0\"; exec sleep 30", text],
                              stdout=d._logf, stderr=subprocess.STDOUT)
    return d


@pytest.mark.parametrize("report", [ASAN, UBSAN], ids=["asan", "ubsan"])
def test_stop_fails_on_a_sanitizer_report_in_the_log(tmp_path, report):
    d = _daemon_that_printed(tmp_path, "vhost target ready\n" + report)
    d.wait_log("Sanitizer" if report is ASAN else "runtime error")
    with pytest.raises(AssertionError, match="sanitizer report") as exc:
        d.stop()
    assert report.strip().splitlines()[-1] in str(exc.value)


def test_stop_passes_a_clean_log(tmp_path):
    d = _daemon_that_printed(tmp_path, "NOTICE: Controller vhost.0: front-end disconnected\n")
    d.wait_log("disconnected")
    assert d.sanitizer_report() is None
    d.stop()
