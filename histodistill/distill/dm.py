"""DM (Zhao & Bilen 2023): match, per class, the mean embeddings of augmented real and
synthetic batches under a freshly initialised (untrained) network each iteration. As in the
reference, images live in normalised space and one step is taken on the loss summed over
classes; unlike it, they are clamped to the valid pixel range after each step."""

from __future__ import annotations

from histodistill.distill.base import Distiller, register


@register("dm")
class DM(Distiller):
    def init_state(self) -> None:
        self.iterations = int(self.cfg["iterations"])
        self.aug = self.augment()
        self.init_from_real()

    def step(self, it: int) -> float:
        c = self.cfg
        net = self.new_net(c["net"], c.get("net_kwargs"))
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        loss = self.images.new_zeros(())
        for k in self.classes:
            real = self.real_batch(k, int(c["batch_real"]))
            draw = self.aug.sample(self.gen)
            mean_real = net.embed(self.aug.apply(real, draw)).mean(0)
            mean_syn = net.embed(self.aug.apply(self.syn(k), draw)).mean(0)
            loss = loss + ((mean_real - mean_syn) ** 2).sum()
        self.image_step(loss)
        return loss.item()
