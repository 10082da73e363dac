"""scripts/initcheck_summary.py, which decides whether the GPU script's
initcheck step passes, on small logs in compute-sanitizer's format."""
import importlib.util
import pathlib

_path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "initcheck_summary.py"
_spec = importlib.util.spec_from_file_location("initcheck_summary", _path)
initcheck_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(initcheck_summary)


def report(kernel, size=2):
    return [f"========= Uninitialized __global__ memory read of size {size} bytes",
            f"=========     at {kernel}+0x760 in file.cu:83",
            "=========     by thread (1,0,0) in block (0,0,0)",
            "=========     Address 0x7ff33d408fd8", "========= "]


THEIRS = "void at::native::elementwise_kernel<(int)128, (int)4>(int, T3)"
OURS = "void nanoblock::cuda::<unnamed>::load_tile<c10::BFloat16, float>(T2 *, int)"
OVERFLOW = "========= Warning: Error buffer overflow has been detected. Some records have been dropped"


def summarize(lines):
    printed = []
    found = initcheck_summary.summarize([line + "\n" for line in lines], printed.append)
    return found, "\n".join(printed)


def test_reports_in_other_kernels_pass_and_are_counted_per_test():
    log = (["tests/test_cuda.py::test_a[1] PASSED"]
           + ["tests/test_cuda.py::test_b[200] " + report(THEIRS)[0]] + report(THEIRS)[1:]
           + report(THEIRS) + [OVERFLOW, "PASSED"])
    found, text = summarize(log)
    assert found == 0
    assert "2 report(s) in 1 kernel(s); 0 in nanoblock's kernels or not placed" in text
    assert "2  tests/test_cuda.py::test_b[200]" in text
    assert "after the reports of: 0 in nanoblock's kernels or not placed" in text


def test_a_report_in_a_nanoblock_kernel_fails():
    found, text = summarize(report(THEIRS) + report(OURS, 16) + report(THEIRS))
    assert found == 1
    assert "3 report(s) in 2 kernel(s); 1 in nanoblock's kernels or not placed" in text
    assert "nanoblock or not placed: Uninitialized __global__ memory read of size 16 bytes" in text


def test_records_dropped_after_a_nanoblock_report_fail():
    found, text = summarize(report(THEIRS) + report(OURS) + [OVERFLOW] + report(THEIRS))
    assert found == 2  # the report and the records dropped after it
    assert "after the reports of: 1 in nanoblock's kernels or not placed" in text


def test_a_nanoblock_device_frame_counts_as_nanoblock():
    frames = report("c10::BFloat16::operator float() const")
    frames.insert(2, f"=========     Device Frame: {OURS}")
    found, _ = summarize(frames)
    assert found == 1


def test_a_report_in_an_unplaced_device_function_fails():
    """Without backtraces a read inside a device function names only that
    function; it cannot be told apart from one of ours."""
    found, text = summarize(report("c10::BFloat16::operator float() const"))
    assert found == 1
    assert "1 in nanoblock's kernels or not placed" in text
