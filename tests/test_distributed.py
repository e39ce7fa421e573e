"""Data-parallel training and sharded evaluation under torchrun, on the CPU with gloo: 2 processes give the same
weights as 1 process with the same global batch, and the same AP; plus the pieces (sampler, gradient averaging,
CPU SyncBatchNorm) against single-process references."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fa_train import distributed as D
from fa_train.checkpoint import load_checkpoint

# FA (clean pass with gradient reuse, attack per rank, teacher on every rank, fused alignment loss), BatchNorm in
# training mode synchronised over ranks. --train-eps 0 keeps the adversarial images equal to the clean ones: a sign
# step flips wherever a gradient element is within float noise of zero, and the order of floating-point sums differs
# between 1 and 2 processes (as it does between thread counts), so with eps > 0 a handful of pixels can differ.
ARGS = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125", "--depth-mult", "0.2",
        "--workers", "0", "--max-images", "16", "--max-test-images", "11", "--quiet", "--eval-every", "1",
        "--epochs", "1", "--lr", "0.00003", "--warmup-iters", "0", "--method", "fa", "--train-eps", "0", "--no-amp",
        "--sync-bn"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, module, args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", module, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    init, one, two = (tmp_path_factory.mktemp(n) for n in ("init", "one", "two"))
    _torchrun(1, "fa_train.cli", ARGS + ["--out", str(one)])
    _torchrun(2, "fa_train.cli", ARGS + ["--out", str(two)])
    # the starting weights: the same run with a learning rate of 0
    _torchrun(1, "fa_train.cli", ARGS + ["--lr", "0", "--max-images", "4", "--eval-every", "0", "--out", str(init)])
    return init, one, two


def test_two_processes_train_the_same_weights_as_one(runs):
    init, one, two = runs
    a, b = load_checkpoint(str(one / "last.pt")), load_checkpoint(str(two / "last.pt"))
    w0 = load_checkpoint(str(init / "last.pt"))["model"]
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["step"] == b["step"] == 4  # 16 images / global batch 4
    params = [k for k in a["model"] if a["model"][k].is_floating_point() and "running" not in k]
    moved = max(float((a["model"][k] - w0[k]).abs().max()) for k in params)
    diff = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in params)
    assert moved > 1e-3  # the weights did move: the comparison is not vacuous
    assert diff < 0.01 * moved, (diff, moved)  # measured: 2.5e-5 against 1.2e-2 (without --sync-bn: > moved)
    for k in a["model"]:
        if a["model"][k].is_floating_point():
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=2e-4, msg=k)


def test_only_rank_zero_writes_and_the_sharded_eval_matches(runs):
    _, one, two = runs
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"epoch"' in l and '"event"' not in l]) == 1  # one writer, one record
    ea, eb = json.loads((one / "eval.json").read_text()), json.loads((two / "eval.json").read_text())
    assert eb["clean"]["images"] == ea["clean"]["images"] == 11  # 6 + 5 images, none counted twice
    assert eb["world_size"] == 2


def test_fa_bench_sharded_over_two_ranks_gives_the_same_table(runs, tmp_path):
    _, one, _ = runs
    w = str(one / "last.pt")
    args = ["--weights", w, "--steps", "1,2", "--max-images", "11", "--batch-size", "4", "--quiet"]
    _torchrun(1, "fa_deploy.cli", args + ["--json", str(tmp_path / "one.json")])
    _torchrun(2, "fa_deploy.cli", args + ["--json", str(tmp_path / "two.json")])
    ja, jb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for k in ("clean", "PGD-1", "PGD-2", "advAP", "acAP"):
        assert jb["rows"][0][k] == pytest.approx(ja["rows"][0][k], abs=1e-9), k
    da, db = ja["details"][0], jb["details"][0]
    assert db["images"] == da["images"] == 11
    for name in ("clean", "PGD-1", "PGD-2"):
        # every detection of every rank reached pycocotools once: same count, same 12 COCO statistics
        assert da["details"][name]["num_detections"] > 0
        assert db["details"][name]["num_detections"] == da["details"][name]["num_detections"], name
        assert db["details"][name]["stats"] == pytest.approx(da["details"][name]["stats"], abs=1e-9), name


def test_global_batch_sampler_slices_the_same_batches():
    full = list(D.GlobalBatchSampler(22, 6, shuffle=True, drop_last=True, seed=5, rank_=0, world=1))
    parts = [list(D.GlobalBatchSampler(22, 6, shuffle=True, drop_last=True, seed=5, rank_=r, world=3))
             for r in range(3)]
    assert len(full) == 3 and all(len(p) == 3 for p in parts)
    for b, batch in enumerate(full):
        assert sum((p[b] for p in parts), []) == batch  # rank slices of the same global batch, seeds included
    with pytest.raises(ValueError, match="--batch-size 6 .* divisible"):
        D.GlobalBatchSampler(22, 6, world=4, rank_=0)
    shards = [list(D.ShardSampler(11, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(11))


def test_augmentation_depends_on_the_sample_seed_only(shapes_devkit):
    from fa_train.data import build_dataset

    ds = build_dataset("synth:60", "train", 64, log=None)
    flips = {torch.equal(ds[(0, s)][0], ds[(0, s)][0]) for s in range(8)}
    assert flips == {True}
    images = {bool(torch.equal(ds[(0, s)][0], ds[(0, 0)][0])) for s in range(16)}
    assert images == {True, False}  # some seeds flip, some do not


def _bn_case():
    """8 images, a BatchNorm with non-trivial affine parameters, per-channel loss weights (float64)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return x, bn, torch.arange(1.0, 4.0, dtype=torch.float64).view(1, 3, 1, 1)


def _worker_avg(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, bn, w = _bn_case()
        sync = D.convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
        mine = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        (sync(mine) * w).pow(2).sum().backward()
        D.average_gradients(sync.parameters())
        # numpy copies, not tensors: a tensor crosses the queue as a shared-memory handle that the receiver opens
        # through this process, which may have exited by then (FileNotFoundError on a loaded machine)
        q.put((rank, *(t.detach().numpy().copy() for t in (mine.grad, sync[0].weight.grad, sync[0].running_mean,
                                                           sync[0].running_var))))
    finally:
        torch.distributed.destroy_process_group()


def test_cpu_sync_batchnorm_and_gradient_averaging_match_one_batch():
    """Two ranks x 4 images through CpuSyncBatchNorm == BatchNorm on all 8 (float64): outputs' input gradients,
    parameter gradients (averaged over ranks = the mean of the two rank losses) and running statistics."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker_avg, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r[0], [torch.from_numpy(a) for a in r[1:]]) for r in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    x, bn, w = _bn_case()
    x.requires_grad_(True)
    (bn(x) * w).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), x.grad)
    torch.testing.assert_close(got[0][1], bn.weight.grad / 2)  # the mean over ranks of the per-rank losses
    torch.testing.assert_close(got[1][1], bn.weight.grad / 2)
    torch.testing.assert_close(got[0][2], bn.running_mean)
    torch.testing.assert_close(got[0][3], bn.running_var)
