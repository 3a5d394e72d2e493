"""bench._perf: the CPU peak-memory counter that the benches rely on counts what it should."""

import pytest
import torch

from bench._perf import PeakMemory, fmt_bytes

MiB = 1 << 20


def test_peak_memory_counts_live_tensors_not_views_or_earlier_ones():
    before = torch.empty(MiB // 4)  # made before the block: not counted
    with PeakMemory("cpu") as mem:
        a = torch.empty(MiB)  # 4 MiB
        b = torch.empty(MiB // 2)  # 2 MiB
        _ = a.view(2, -1), a[:10], before.add_(1)  # views and in-place results add nothing
        del a, _  # the views went with it
        c = torch.empty(MiB // 4)  # 1 MiB, after a (4 MiB) is freed
    assert mem.peak_bytes == 6 * MiB
    assert b.numel() and c.numel()


def test_peak_memory_sees_activations_kept_for_backward_and_gradients():
    x = torch.randn(MiB // 4, requires_grad=True)  # 1 MiB
    with PeakMemory("cpu") as mem:
        y = x.exp()  # saved by autograd for exp's backward even after `del y`
        loss = (y * 2).sum()  # the product (1 MiB) is freed at once: mul saves only its scalar
        del y
        loss.backward()  # x.grad (1 MiB) and temporaries
    assert mem.peak_bytes >= 3 * MiB  # exp output + x.grad + at least one backward temporary
    assert mem.peak_bytes < 6 * MiB
    assert fmt_bytes(3 * MiB) == "3.0 MiB"


def test_bench_eval_runs_and_both_rankings_agree():
    from bench.eval import main, same_ranking

    r = main(["--layers", "1", "--dim", "64", "--images", "2", "--classes", "6", "--new-tokens", "3",
              "--batch-size", "4", "--repeats", "1", "--device", "cpu"])
    assert r["same_ranking"] and r["speedup"] > 0 and r["beam_cost"] > 0
    assert set(r["captioning"]) == {"greedy", "beam"} and set(r["ranking"]) == {"cached", "uncached"}
    assert same_ranking([3.0, 1.0, 2.0], [3.0, 1.0, 2.0 + 1e-6], tol=1e-3)
    assert not same_ranking([3.0, 1.0, 2.0], [3.0, 2.5, 2.0], tol=1e-3)


@pytest.mark.slow
def test_bench_data_measures_both_shard_sizes(capsys):
    from bench.data import main

    main(["--images", "40", "--repeats", "1", "--max-len", "256", "--latents", "4"])
    out = capsys.readouterr().out
    assert "256 px JPEG shards (256 px: resized)" in out and "224 px JPEG shards (pre-sized: decode only)" in out
    assert out.count("ratio pipeline/baseline images/s") == 2
