"""MTT (Cazenavette et al. 2022): match segments of expert training trajectories.

Follows the reference's ``distill.py``. Each iteration draws an expert from the trajectory store
(rule ``buffer_experts``) and a start epoch below ``max_start_epoch``; the student starts at
the expert's parameters of that epoch and takes ``syn_steps`` SGD steps on batches of the
synthetic images (``batch_syn``, all of them by default), each augmented per image with DSA, at
a learnable learning rate ``syn_lr`` (initialised to ``lr_teacher``). The loss is
||theta_student - theta_target||^2 / ||theta_start - theta_target||^2 with theta_target the
expert ``expert_epochs`` epochs after the start. Images and ``syn_lr`` have their own SGD
optimisers (momentum 0.5, rates ``lr_img`` and ``lr_lr``). Images live in normalised space,
as in the reference, and are clamped to the valid pixel range after every step.

The student is unrolled with checkpointed segments (:func:`~histodistill.trajectories.unroll.unroll`),
exact gradients with memory growing as sqrt(syn_steps) instead of linearly.
"""

from __future__ import annotations

from typing import Any

import torch

from histodistill.distill.base import Distiller, register
from histodistill.trajectories.store import ExpertStore
from histodistill.trajectories.unroll import Plan, Student, unroll


def matching_loss(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor
                  ) -> torch.Tensor:
    """||student_end - target||^2 / ||start - target||^2 (MTT's normalised parameter loss)."""
    return ((student_end - target) ** 2).sum() / ((start - target) ** 2).sum().clamp_min(1e-30)


@register("mtt")
class MTT(Distiller):
    def init_state(self) -> None:
        c = self.cfg
        if self.ctx.experts is None:
            raise ValueError(f"{self.name} needs the expert trajectories (rule buffer_experts)")
        self.experts = ExpertStore(self.ctx.experts)
        self.experts.check(self.ctx.num_classes, self.ctx.im_size)
        self.check_epochs()
        self.student = Student(self.experts.build_net(self.ctx.device))
        self.iterations = int(c["iterations"])
        self.aug = self.augment()
        self.init_from_real()
        self.syn_lr = torch.tensor(float(c["lr_teacher"]), device=self.ctx.device,
                                   requires_grad=True)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=float(c["lr_lr"]), momentum=0.5)

    def check_epochs(self) -> None:
        """The farthest target must be in the store."""
        c = self.cfg
        last = int(c["max_start_epoch"]) - 1 + int(c["expert_epochs"])
        if int(c["max_start_epoch"]) < 1 or last > self.experts.epochs:
            raise ValueError(f"distill.methods.mtt: max_start_epoch {c['max_start_epoch']} and "
                             f"expert_epochs {c['expert_epochs']} reach epoch {last}, but "
                             f"{self.experts.path} holds epochs 0..{self.experts.epochs} "
                             "(trajectories.epochs)")

    def expert_point(self, expert: int, epoch: int) -> torch.Tensor:
        return self.experts.params(expert, epoch, self.ctx.device)

    def draw(self, n: int) -> int:
        """A seeded integer in [0, n)."""
        return int(torch.randint(n, (1,), generator=self.gen))

    def student_end(self, start: torch.Tensor, steps: int) -> torch.Tensor:
        """The student's parameters after ``steps`` SGD steps on the synthetic images from
        ``start`` (differentiable in the images and ``syn_lr``)."""
        batch = self.cfg["batch_syn"]
        plan = Plan.draw(len(self.images), steps, int(batch) if batch else None, self.aug, self.gen)
        return unroll(self.student, start, self.images, self.y_syn, self.syn_lr, plan, self.aug,
                      self.cfg["unroll_segment"])

    def update(self, loss: torch.Tensor) -> None:
        """One step of both optimisers (images, then the clamp; learning rate)."""
        self.opt_lr.zero_grad(set_to_none=True)
        self.image_step(loss)
        self.opt_lr.step()

    def step(self, it: int) -> float:
        c = self.cfg
        expert = self.draw(self.experts.experts)
        start_epoch = self.draw(int(c["max_start_epoch"]))
        start = self.expert_point(expert, start_epoch)
        target = self.expert_point(expert, start_epoch + int(c["expert_epochs"]))
        loss = matching_loss(self.student_end(start, int(c["syn_steps"])), start, target)
        self.update(loss)
        return loss.item()

    def extra_state(self) -> dict[str, Any]:
        return {"syn_lr": self.syn_lr.detach().cpu(), "opt_lr": self.opt_lr.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.syn_lr.device))
        self.opt_lr.load_state_dict(state["opt_lr"])
