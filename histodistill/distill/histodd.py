"""Histo-DD: gradient matching with model augmentation and stain-aware siamese augmentation.

Per outer loop (K of them) one network is drawn from a pool of networks pre-trained on the real
data with different initialisations (rule ``pretrain_pool``) and perturbed (model augmentation:
d ~ N(0, 1) rescaled per filter to the filter's norm, theta += alpha d). Then U times: match,
per class, the layer-wise L1 distance between cross-entropy gradients of augmented real and
augmented synthetic batches (same augmentation parameters) and update the images; update the
network on a real batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histodistill.distill.base import Distiller, register
from histodistill.distill.matching import matched_params, model_augment


@register("histodd")
class HistoDD(Distiller):
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
        model_augment(net, float(c["alpha"]), self.gen)
        net.train()
        params = matched_params(net, "l1", bool(c.get("match_fc", False)))
        opt_net = torch.optim.SGD(net.parameters(), lr=float(c["lr_net"]), momentum=0.9,
                                  weight_decay=5e-4)
        total = 0.0
        for _ in range(int(c["inner_loop"])):
            total += self.match_step(net, params, "l1")
            # U: update the network on augmented real data between matches
            pick = torch.randint(len(self.ctx.x), (int(c["batch_net"]),), generator=self.gen)
            xb, yb = self.ctx.x[pick.to(self.ctx.device)], self.ctx.y[pick.to(self.ctx.device)]
            opt_net.zero_grad(set_to_none=True)
            F.cross_entropy(net(self.aug(xb, self.gen)), yb).backward()
            opt_net.step()
        return total / int(c["inner_loop"])
