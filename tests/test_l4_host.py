"""The loader set for an L4 host: which CPUs stand in for a g6.xlarge's 4 vCPUs, the verdict on who
sets the pace, and the config field that picks nvJPEG's Huffman decoder by image size."""
from __future__ import annotations

import pytest

from dali_imagenet.config import ConfigError, load_config


def test_the_l4_host_cpus_and_verdict():
    from benchmarks.l4_host import host_cpus, verdict

    smt = {0: "0,8", 1: "1,9", 2: "2,10", 8: "0,8", 9: "1,9", 10: "2,10"}
    assert host_cpus(smt) == ([0, 1, 8, 9], "2 cores + their SMT siblings: CPUs 0,1,8,9")
    assert host_cpus({0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})[0] == [0, 1, 2, 3]
    cpus, words = host_cpus({0: "0", 1: "1", 2: "2"})
    assert cpus == [0, 1] and "no SMT siblings" in words

    def row(size, threads, rate, wait, threshold=0):
        return {"image_size": size, "threads": threads, "images_per_s": rate, "data_wait": wait,
                "hybrid_huffman_threshold": threshold}

    loader_bound = verdict([row(160, 4, 700, 0.6), row(160, 4, 750, 0.55, 1_000_000), row(160, 3, 900, 0.5),
                            row(192, 4, 690, 0.5)], 4)
    assert loader_bound["pace"][160] == {"loader_images_per_s": 750, "loader_bound_here": True,
                                         "sets_pace": "the loader", "threshold": 1_000_000}
    assert loader_bound["expected_loader_images_per_s"] == 690 and "short of the 925" in loader_bound["result"]
    step_bound = verdict([row(160, 4, 2500, 0.02), row(192, 4, 2000, 0.03)], 4)
    assert {p["sets_pace"] for p in step_bound["pace"].values()} == {"the step"}
    assert "loader >= 2,500 img/s" in step_bound["result"] and "enough for the 925" in step_bound["result"]
    assert verdict([], 4)["result"] == "no loader-fed rows at 4 threads"


def test_hybrid_huffman_threshold_is_a_checked_config_field():
    assert load_config(None, ["hybrid_huffman_threshold=0"]).hybrid_huffman_threshold == 0
    assert load_config(None).hybrid_huffman_threshold == 1_000_000  # DALI's own default
    for bad in ("-1", "2000000000"):
        with pytest.raises(ConfigError, match=r"hybrid_huffman_threshold must be in \[0, 1e9\] px"):
            load_config(None, [f"hybrid_huffman_threshold={bad}"])
