"""Data-parallel learner ranks: which rows of a batch a rank owns, and sums across the ranks.

Every rank receives the whole batch (one copy in the object store), scores and differentiates only its
own rows, and the update stays exact because every loss term is already a share of the whole
minibatch (`algorithms.Normaliser`): the ranks' gradients are *summed*, never averaged, and every rank
then takes the same optimizer step from the same state. Sequence-level quantities that couple rows
(GRPO groups, the REINFORCE baseline, PPO's advantage whitening) are gathered or reduced here.

The group is a `ray.util.collective` gloo group (torch.distributed underneath). LoRA gradients are a few
MB, so on GPU they are reduced through the same CPU group rather than a second NCCL one.
"""

from __future__ import annotations

import torch


class Ranks:
    """This learner's place in its group. `Ranks()` is a learner on its own: every reduction is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1, group_name: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size} learners")
        self.rank, self.world_size, self.group_name = rank, world_size, group_name

    @classmethod
    def join(cls, rank: int, world_size: int, group_name: str) -> "Ranks":
        """Join the learner group (call inside each learner actor; every rank must call it)."""
        if world_size > 1:
            from ray.util import collective

            collective.init_collective_group(world_size, rank, backend="gloo", group_name=group_name)
        return cls(rank, world_size, group_name)

    @property
    def alone(self) -> bool:
        return self.world_size == 1

    def rows(self, count: int) -> torch.Tensor:
        """The rows of a `count`-row batch this rank owns: one contiguous slice per rank."""
        return torch.tensor_split(torch.arange(count), self.world_size)[self.rank]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "SUM")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "MAX")

    def gather_rows(self, local: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
        """The [count, ...] tensor whose rows `rows` are this rank's `local` rows and the rest the other ranks'."""
        full = torch.zeros((count, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[rows.to(local.device)] = local
        return self.sum(full)

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0 writing a file the others then read)."""
        self.sum(torch.zeros(1))

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (a missing gradient counts as 0)."""
        if self.alone:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for parameter, grad in zip(parameters, grads):
            parameter.grad = flat[offset: offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.alone:
            return tensor
        from ray.util import collective
        from ray.util.collective.types import ReduceOp

        buffer = tensor.detach().to("cpu", torch.float64 if tensor.is_floating_point() else torch.int64).contiguous()
        collective.allreduce(buffer, self.group_name, getattr(ReduceOp, op))
        return buffer.to(tensor.device, tensor.dtype)


SINGLE = Ranks()
