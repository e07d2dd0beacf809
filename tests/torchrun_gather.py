"""A torchrun worker for tests/test_ssl.py: NT-Xent of one global batch split unevenly over the ranks (rank r holds
rows ROWS[r]), with the negatives gathered from every rank. Each rank backpropagates its share of the global loss
(its anchors' part, n_r / N of its own mean) and writes its loss and the gradient of its own rows to OUT.rank<r>.pt.

    torchrun --nproc-per-node 2 tests/torchrun_gather.py OUT
"""

import sys

import torch

from fgvc.engine.distributed import Distributed
from fgvc.ssl.losses import nt_xent

ROWS = [(0, 3), (3, 5)]  # rank 0 holds images 0-2, rank 1 images 3-4
TEMPERATURE = 0.3


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=generator, dtype=torch.float64), torch.randn(5, 4, generator=generator,
                                                                                   dtype=torch.float64)


def main(out: str) -> None:
    distributed = Distributed.from_environment("cpu")
    start, stop = ROWS[distributed.rank]
    z1, z2 = (z[start:stop].clone().requires_grad_(True) for z in global_batch())
    loss = nt_xent(z1, z2, TEMPERATURE, gather=distributed.gather_rows)
    share = (stop - start) / ROWS[-1][1]
    (share * loss).backward()
    torch.save({"loss": loss.detach(), "share": share, "grad1": z1.grad, "grad2": z2.grad},
               f"{out}.rank{distributed.rank}.pt")
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1])
