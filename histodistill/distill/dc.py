"""DC (Zhao et al. 2021) and DSA (Zhao & Bilen 2021): gradient matching with DC's
per-output-channel cosine distance on freshly initialised networks; DSA adds siamese
augmentation. Each iteration: ``outer_loop`` image updates, between which the network trains
``inner_loop`` steps on the synthetic set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histodistill.distill.base import Distiller, register
from histodistill.distill.matching import match_loss, matched_params


@register("dc")
class DC(Distiller):
    siamese = False

    def init_state(self) -> None:
        self.iterations = int(self.cfg["iterations"])
        self.aug = self.augment() if self.siamese else None
        self.init_from_real()

    def _aug(self, x: torch.Tensor, params: list) -> torch.Tensor:
        return self.aug.apply(x, params) if self.aug is not None else x

    def step(self, it: int) -> float:
        c = self.cfg
        net = self.new_net(c["net"], c.get("net_kwargs"))
        net.train()
        params = matched_params(net, "cos", True)
        opt_net = torch.optim.SGD(net.parameters(), lr=float(c["lr_net"]), momentum=0.5)
        total = 0.0
        for ol in range(int(c["outer_loop"])):
            loss = self.images.new_zeros(())
            for k in range(self.ctx.num_classes):
                real = self.real_batch(k, int(c["batch_real"]))
                p = self.aug.sample(self.gen) if self.aug is not None else []
                loss = loss + match_loss(net, params, self._aug(real, p),
                                         torch.full((len(real),), k, device=real.device),
                                         self._aug(self.syn(k), p), self.y_syn[self.syn_slice(k)], "cos")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item()
            if ol == int(c["outer_loop"]) - 1:
                break
            syn = self.images.detach()
            for _ in range(int(c["inner_loop"])):
                opt_net.zero_grad(set_to_none=True)
                x = self.aug(syn, self.gen) if self.aug is not None else syn
                F.cross_entropy(net(x), self.y_syn).backward()
                opt_net.step()
        return total / int(c["outer_loop"])


@register("dsa")
class DSA(DC):
    siamese = True
