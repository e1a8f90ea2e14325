"""Train a small CNN on scikit-learn's 8x8 digits with ``batchnorm.SyncBatchNorm``
under DistributedDataParallel: CPUs with gloo, or one GPU per process with NCCL.

One machine, two processes on the CPU::

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py

Two machines, two processes each (run on both; HOST is the first machine)::

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=digits examples/ddp_train.py

Every process count sees the same global batches in the same order (each rank
takes its share of each), and the batch-norm statistics are those of the global
batch, so 1, 2 or 4 processes train the same model, up to floating-point
rounding (the sums over ranks are added in another order).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``N x 1 x 8 x 8`` in [0, 1]."""
    try:
        from batchnorm.experiments import datasets

        data = datasets.load("digits")
        arrays = data.x_train, data.y_train, data.x_test, data.y_test
    except ImportError:  # the demo's package is absent: the same data from scikit-learn
        from sklearn.datasets import load_digits as sk_load
        from sklearn.model_selection import train_test_split

        x, y = sk_load(return_X_y=True)
        x = (x / 16.0).reshape(-1, 1, 8, 8).astype("float32")
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
        arrays = x_train, y_train, x_test, y_test
    return tuple(torch.as_tensor(a) for a in arrays)  # type: ignore[return-value]


def small_cnn(seed: int) -> nn.Module:
    """The demo's CNN with batch norm (``batchnorm.experiments.models.cnn``), or the same shape here."""
    try:
        from batchnorm.experiments import models

        return models.cnn((1, 8, 8), 10, bn=True, seed=seed)
    except ImportError:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        c_in = 1
        for k, c_out in enumerate((16, 32, 32)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if k == 0 else 2, padding=1)]
            layers += [batchnorm.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="", metavar="FILE",
                        help="write the trained model's state_dict here (torch.save), with the keys of plain "
                        "torch.nn.BatchNorm2d layers")  # fmt: skip
    args = parser.parse_args()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.exit(2, "ddp_train.py starts one process per rank under torchrun; run it as\n"
                       "  torchrun --standalone --nproc_per_node=2 examples/ddp_train.py\n")  # fmt: skip

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # rank, world size, address: from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    x_train, y_train, x_test, y_test = load_digits()
    model = batchnorm.SyncBatchNorm.convert_sync_batchnorm(small_cnn(args.seed)).to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        start = time.perf_counter()
        ddp.train()
        # every rank draws the same permutation and takes its share of each global batch;
        # the last global batch is smaller and may leave a rank with fewer (or no) images
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        for begin in range(0, len(order), args.batch_size):
            batch = order[begin : begin + args.batch_size]
            mine = batch.tensor_split(world)[rank]
            images, labels = x_train[mine].to(device), y_train[mine].to(device)
            # the mean loss over the global batch: DDP averages the ranks' gradients
            loss = nn.functional.cross_entropy(ddp(images), labels, reduction="sum") * world / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        ddp.eval()  # running statistics: the same on every rank, no synchronization
        with torch.no_grad():
            mine = torch.arange(len(y_test)).tensor_split(world)[rank]
            correct = (model(x_test[mine].to(device)).argmax(1) == y_test[mine].to(device)).sum()
            counts = torch.stack([correct, torch.tensor(len(mine), device=device)]).to(torch.float64)
            dist.all_reduce(counts)
        if rank == 0:
            accuracy = (counts[0] / counts[1]).item()
            seconds = time.perf_counter() - start
            print(f"epoch {epoch + 1}: test accuracy {accuracy:.3f} ({world} ranks, {seconds:.1f} s)", flush=True)

    if args.save and rank == 0:
        plain = batchnorm.convert(model.cpu(), to="torch")  # SyncBatchNorm -> torch.nn.BatchNorm2d
        torch.save(plain.state_dict(), args.save)
        print(f"saved the model's state_dict to {args.save}")
    dist.barrier()  # the ranks tear down together: one leaving while another still saves can abort gloo's threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
