"""CollapseAccumulator: streaming equals one shot, resume, errors, and all_reduce over two gloo
processes on localhost."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import collapsekit as ck
from collapsekit import reference as ref


def data(n=503, d=17, c=11, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    y = torch.randint(0, c - 1, (n, 2) if soft else (n,), generator=g)  # class c-1 absent
    w = torch.rand(y.shape, generator=g, dtype=torch.float64) if soft else None
    return h, y, w


def run_passes(acc, h, y, w, batch=97):
    for lo in range(0, h.shape[0], batch):
        acc.update_means(h[lo:lo + batch], y[lo:lo + batch], None if w is None else w[lo:lo + batch])
    for lo in range(0, h.shape[0], batch):
        acc.update_variance(h[lo:lo + batch], y[lo:lo + batch], None if w is None else w[lo:lo + batch])


@pytest.mark.parametrize("soft", [False, True])
def test_streaming_equals_reference(soft):
    h, y, w = data(soft=soft)
    acc = ck.CollapseAccumulator(11, 17)
    run_passes(acc, h, y, w)
    means, counts = ref.class_means(h, y, 11, w)
    torch.testing.assert_close(acc.counts, counts)
    torch.testing.assert_close(acc.means, means, rtol=1e-6, atol=1e-6)
    assert acc.means.dtype == torch.float64 and (acc.means[10] == 0).all()
    torch.testing.assert_close(acc.variance_sums, ref.within_class_variance(h, y, means, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.covariance_sum, ref.within_class_covariance(h, y, means, w), rtol=1e-5, atol=1e-3)


def test_resume_mid_pass_and_errors():
    h, y, _ = data()
    full = ck.CollapseAccumulator(11, 17)
    run_passes(full, h, y, None)
    a = ck.CollapseAccumulator(11, 17)
    a.update_means(h[:200], y[:200])
    state = a.state_dict()                      # the job stops here ...
    b = ck.CollapseAccumulator(11, 17)
    b.load_state_dict(state)                    # ... and resumes without recounting
    b.update_means(h[200:], y[200:])
    b.update_variance(h[:300], y[:300])
    state2 = b.state_dict()
    c = ck.CollapseAccumulator(11, 17)
    c.load_state_dict(state2)
    c.update_variance(h[300:], y[300:])
    for key in ("counts", "means", "variance_sums", "covariance_sum"):
        torch.testing.assert_close(getattr(c, key), getattr(full, key), rtol=1e-5, atol=1e-3)  # fp32 batches split differently
    with pytest.raises(RuntimeError, match="means are frozen"):
        c.update_means(h, y)
    with pytest.raises(ValueError, match="state has num_classes=11 but this accumulator has num_classes=12"):
        ck.CollapseAccumulator(12, 17).load_state_dict(state)
    with pytest.raises(ValueError, match="state has dim=17 but this accumulator has dim=16"):
        ck.CollapseAccumulator(11, 16).load_state_dict(state)
    bad = dict(state, synced_counts=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"synced_counts must be a tensor of shape \(11,\)"):
        ck.CollapseAccumulator(11, 17).load_state_dict(bad)


def test_bad_batches():
    h, y, _ = data()
    acc = ck.CollapseAccumulator(11, 17)
    with pytest.raises(RuntimeError, match="call update_means over the data"):
        acc.update_variance(h, y)
    with pytest.raises(ValueError, match="features has D=16 but the accumulator was built for dim=17"):
        acc.update_means(h[:, :16], y)
    hn = h.clone()
    hn[[3, 7, 9], 2] = float("nan")
    hn[11, 0] = float("inf")
    with pytest.raises(ValueError, match=r"4 row\(s\) with NaN or Inf \(first: row 3\)"):
        acc.update_means(hn, y)
    with pytest.raises(ValueError, match=r"labels\[0\] = 11 is outside"):
        acc.update_means(h, torch.full_like(y, 11))
    assert acc.batches["means"] == 0 and acc.counts.sum() == 0  # rejected batches add nothing
    acc2 = ck.CollapseAccumulator(11, 17, covariance=False)
    run_passes(acc2, h, y, None)
    with pytest.raises(RuntimeError, match="covariance=False"):
        acc2.covariance_sum
    with pytest.raises(RuntimeError, match="not initialised"):
        acc2.all_reduce()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        h, y, w = data(soft=True)
        shard = slice(rank, None, world)           # each rank holds half the data
        acc = ck.CollapseAccumulator(11, 17)
        for lo in range(0, h[shard].shape[0], 50):
            acc.update_means(h[shard][lo:lo + 50], y[shard][lo:lo + 50], w[shard][lo:lo + 50])
        acc.all_reduce()
        for lo in range(0, h[shard].shape[0], 50):
            acc.update_variance(h[shard][lo:lo + 50], y[shard][lo:lo + 50], w[shard][lo:lo + 50])
        acc.all_reduce()
        acc.all_reduce()  # nothing new since the last one: must not count twice
        torch.save({k: getattr(acc, k) for k in ("counts", "means", "variance_sums", "covariance_sum")},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # one pass, in three rounds of update + all_reduce: rank 1 has nothing in the first (no mode
        # yet: it follows rank 0's), the later rounds merge into the synced totals
        one = ck.CollapseAccumulator(11, 17)
        hs, ys, ws = h[shard], y[shard], w[shard]
        half = hs.shape[0] // 2
        parts = [(hs[:half], ys[:half], ws[:half]), (hs[half:], ys[half:], ws[half:])]
        rounds = [[parts[0]], [parts[1]], []] if rank == 0 else [[], [parts[0]], [parts[1]]]
        for batches in rounds:
            for hb, yb, wb in batches:
                one.update(hb, yb, wb)
            one.all_reduce()
        assert one.mode == "one_pass"
        one.all_reduce()  # nothing new: must not count twice
        torch.save({k: getattr(one, k) for k in ("counts", "means", "variance_sums", "covariance_sum")},
                   os.path.join(out_dir, f"one{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    h, y, w = data(soft=True)
    single = ck.CollapseAccumulator(11, 17)
    run_passes(single, h, y, w)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in got.items():
            # exact up to fp32 rounding inside batches (the shards are batched differently)
            torch.testing.assert_close(value, getattr(single, key), rtol=1e-5, atol=1e-3, msg=f"rank {rank}: {key}")
        got = torch.load(tmp_path / f"one{rank}.pt")
        for key, value in got.items():
            torch.testing.assert_close(value, getattr(single, key), rtol=1e-5, atol=1e-3, msg=f"one-pass rank {rank}: {key}")
        assert torch.equal(got["covariance_sum"], torch.load(tmp_path / "one0.pt")["covariance_sum"])  # same on every rank
