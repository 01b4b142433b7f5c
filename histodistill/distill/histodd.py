"""Histo-DD: gradient matching with model augmentation and stain-aware siamese augmentation.

Follows Algorithm 1 and the Acc-DD/IDC code it builds on. Per outer loop (K of them) one
early-stage checkpoint is drawn from the pool (rule ``pretrain_pool``) and perturbed (model
augmentation, :func:`~histodistill.distill.matching.model_augment`). Then U times: for each
class, the layer-wise L1 distance between the cross-entropy gradients of an augmented real batch
and the class's augmented synthetic images (same augmentation parameters) drives one image step;
then the network trains on a pass over ``n_data`` real patches (per-image augmentation), as
IDC's ``train_epoch`` does. Images live in pixels, are normalised before the network and are
clamped to [0, 1] after every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from histodistill.distill.base import Distiller, register
from histodistill.distill.matching import matched_params, model_augment


@register("histodd")
class HistoDD(Distiller):
    space = "pixel"

    def init_state(self) -> None:
        if not self.ctx.pool:
            raise ValueError("histodd needs the pre-trained network pool (rule pretrain_pool)")
        self.iterations = int(self.cfg["outer_loop"])
        self.aug = self.augment()
        self.init_from_real()

    def step(self, it: int) -> float:
        c = self.cfg
        pool = self.ctx.pool
        net = self.new_net(pool["net"], pool["net_kwargs"])
        net.load_state_dict(pool["states"][int(torch.randint(len(pool["states"]), (1,), generator=self.gen))])
        model_augment(net, c["alpha"], self.gen, directions=int(c["directions"]))
        net.train()
        params = matched_params(net, "l1", bool(c["match_fc"]))
        opt_net = torch.optim.SGD(net.parameters(), lr=float(c["lr_net"]), momentum=0.9,
                                  weight_decay=5e-4)
        batch = int(c["batch_net"])
        total = 0.0
        for _ in range(int(c["inner_loop"])):
            total += self.match_step(net, params, "l1", per_class=True)
            for _ in range(math.ceil(int(c["n_data"]) / batch)):  # a pass over n_data real patches
                xb, yb = self.ctx.real.mixed(batch)
                opt_net.zero_grad(set_to_none=True)
                F.cross_entropy(net(self.aug(xb, self.gen)), yb).backward()
                opt_net.step()
        return total / int(c["inner_loop"])
