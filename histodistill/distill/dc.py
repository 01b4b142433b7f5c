"""DC (Zhao et al. 2021) and DSA (Zhao & Bilen 2021): gradient matching with DC's
per-output-channel cosine distance on freshly initialised networks; DSA adds siamese
augmentation. Each iteration: ``outer_loop`` image updates on the loss summed over classes,
between which the network trains ``inner_loop`` epochs on the synthetic set (SGD without
momentum, per-image augmentation for DSA), as in the reference code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histodistill.augment import Augment
from histodistill.distill.base import Distiller, register
from histodistill.distill.matching import matched_params


@register("dc")
class DC(Distiller):
    siamese = False

    def init_state(self) -> None:
        self.iterations = int(self.cfg["iterations"])
        # without siamese augmentation: an augmenter with no ops (identity, draws no numbers)
        self.aug = self.augment() if self.siamese else Augment.identity()
        self.init_from_real()

    def step(self, it: int) -> float:
        c = self.cfg
        net = self.new_net(c["net"], c.get("net_kwargs"))
        net.train()
        params = matched_params(net, "cos", True)
        opt_net = torch.optim.SGD(net.parameters(), lr=float(c["lr_net"]))
        batch = int(c["batch_train"])
        total = 0.0
        for ol in range(int(c["outer_loop"])):
            total += self.match_step(net, params, "cos", per_class=False)
            if ol == int(c["outer_loop"]) - 1:
                break
            syn = self.to_net(self.images.detach())
            for _ in range(int(c["inner_loop"])):  # epochs on the synthetic set
                for idx in torch.randperm(len(syn), generator=self.gen).split(batch):
                    idx = idx.to(syn.device)
                    opt_net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(self.aug(syn[idx], self.gen)), self.y_syn[idx]).backward()
                    opt_net.step()
        return total / int(c["outer_loop"])


@register("dsa")
class DSA(DC):
    siamese = True
