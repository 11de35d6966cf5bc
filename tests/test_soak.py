"""bench/bench_soak.py's verdicts and /proc sampling (on this process and a child it starts)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="needs PyAV")  # bench_soak imports the loader and the bench videos
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")

from bench import bench_soak as soak  # noqa: E402

CLIP_MB = 32 * 256 * 340 * 3 / soak.MB  # the decoded frames of one 32-frame Kinetics-sized clip


def test_slope_of_a_line_and_of_a_flat_series():
    assert soak.least_squares_slope([0, 1, 2, 3], [5.0, 7.0, 9.0, 11.0]) == pytest.approx(2.0)
    assert soak.least_squares_slope([10, 11, 12], [17, 17, 17]) == 0.0  # exactly: counts are held to 0
    with pytest.raises(ValueError):
        soak.least_squares_slope([3], [1.0])


def test_a_leaked_clip_per_epoch_fails_and_noise_passes():
    rng = np.random.default_rng(0)
    epochs = np.arange(40)
    noise = rng.normal(0, 2.0, 40)  # +-2 MB from one sample to the next, as allocators give
    flat = [(int(e), 900 + n) for e, n in zip(epochs, noise)]
    leaking = [(int(e), 900 + CLIP_MB * e + n) for e, n in zip(epochs, noise)]
    assert soak.check_series(flat, 40, 0.5)["verdict"] == "PASS"
    fitted = soak.check_series(leaking, 40, 0.5)
    assert fitted["verdict"] == "FAIL" and fitted["slope"] == pytest.approx(CLIP_MB, abs=0.5)
    assert fitted["points"] == 20  # the second half only


def test_growth_in_the_first_half_is_not_fitted():
    warming = [(e, 100.0 + 10 * min(e, 5)) for e in range(20)]  # allocators reach their size, then stay
    assert soak.check_series(warming, 20, 0.5)["verdict"] == "PASS"


def test_counts_must_stay_exactly_flat():
    flat = [(e, 17) for e in range(10)]
    one_more = [(e, 17 + (e == 9)) for e in range(10)]  # one descriptor left open, once
    assert soak.check_series(flat, 10, 0.0)["verdict"] == "PASS"
    assert soak.check_series(one_more, 10, 0.0)["verdict"] == "FAIL"
    assert soak.check_series(flat[:5], 10, 0.0)["verdict"] == "n/a"  # nothing in the second half


def test_series_names_and_bounds():
    stats = dict(pid=1, rss_mb=3.0, anon_mb=1.5, pss_mb=2.0, uss_mb=1.0, fds=7, threads=2)
    sample = dict(scenario="full", point="end", epoch=4, main=stats, workers=[stats, stats], children=3,
                  live_pipelines=1, gc_objects=1000, dali_shm_mb=64.0, gpu={"device_used_mb": 512.0})
    series = soak.series_of([sample])
    assert series["full/end main pss_mb"] == [(4, 2.0)]
    assert series["full/end worker1 fds"] == [(4, 7)]
    assert series["full/end gpu device_used_mb"] == [(4, 512.0)]
    args = SimpleNamespace(bound_mb=0.5, bound_worker_mb=2.0, bound_objects=1.0)
    assert soak.bound_of("full/end main rss_mb", args) == 0.5
    assert soak.bound_of("full/end worker0 anon_mb", args) == 2.0
    assert soak.bound_of("full/end worker0 uss_mb", args) is None  # shown, no verdict
    assert soak.check_series([(e, 1.0 + e) for e in range(4)], 4, None)["verdict"] == "info"
    assert soak.bound_of("full/end main threads", args) == 0.0
    assert soak.bound_of("full/end main live_pipelines", args) == 0.0
    assert soak.bound_of("full/end main gc_objects", args) == 1.0


def test_process_stats_of_this_process_see_memory_and_files():
    before = soak.process_stats(os.getpid())
    assert 0 < before["uss_mb"] <= before["rss_mb"] and 0 < before["pss_mb"] <= before["rss_mb"]
    assert 0 < before["anon_mb"] <= before["rss_mb"]
    assert before["threads"] >= 1
    block = np.ones(64 * soak.MB, np.uint8)  # 64 MB, every page written
    with open(__file__) as f:
        after = soak.process_stats(os.getpid())
        assert after["fds"] == before["fds"] + 1
        assert f.readable()
    assert after["uss_mb"] - before["uss_mb"] > 48 and after["anon_mb"] - before["anon_mb"] > 48
    del block


def test_child_processes_are_found_and_classified():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = dict(soak.child_processes(os.getpid()))
        assert found.get(child.pid) == "other"
        assert soak.cpu_ticks([child.pid, 2**22 + 1]) >= 0  # a pid that does not exist counts 0
    finally:
        child.kill()
        child.wait()
    assert child.pid not in dict(soak.child_processes(os.getpid()))


def test_svg_is_well_formed(tmp_path):
    path = tmp_path / "soak.svg"
    soak.write_svg(path, [("full", [("main PSS", [(e, 900.0 + e % 3) for e in range(10)])]),
                          ("abandon", [("main PSS", [(e, 950.0) for e in range(10)])])], 10)
    root = ET.parse(path).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
