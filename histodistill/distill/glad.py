"""GLaD (Cazenavette et al., CVPR 2023; GeorgeCazenavette/glad ``distill_dc.py``): dataset
distillation in the latent space of a frozen generator. The synthetic images are the decoder's
output for learnable latents, and the latents, not the pixels, are optimised by the distillation
objective, here gradient matching with DC's per-channel cosine distance, DSA's siamese
augmentation and a freshly initialised network per iteration (DC/DSA's loop, :mod:`.dc`).

The generator's role (StyleGAN-XL in GLaD) is played by the pipeline's KL autoencoder (rule
``train_autoencoder``): latents are its scaled posterior means (the space the diffusion model
sees), images ``decoder(latent / scale)`` mapped from [-1, 1] to pixels and normalised on the way
into the network. Departures: latents start as the encodings of random real patches of the class
(GLaD starts from the mapping network's output for random noise; an autoencoder has no prior to
sample from), and there is no layer choice (GLaD distils StyleGAN's intermediate features); the
decoder is never updated. As in GLaD, latents take SGD steps with momentum 0.5
(``lr_latent``, GLaD's f-latent rate 1 by default; ``unit_grad`` as in :class:`Distiller`).
"""

from __future__ import annotations

import torch

from histodistill.distill.base import register
from histodistill.distill.dc import DC
from histodistill.generate.autoencoder import load_autoencoder


@register("glad")
class GLaD(DC):
    siamese = True
    space = "latent"  # self.images holds latents: decoded, then normalised, into the network

    def init_state(self) -> None:
        self.iterations = int(self.cfg["iterations"])
        self.aug = self.augment()
        if self.ctx.autoencoder is None:
            raise ValueError(f"{self.name} distils through the generator's autoencoder; none given")
        self.ae = load_autoencoder(self.ctx.autoencoder, self.ctx.device)
        pixels = self.ctx.real.pixels_of(self.random_rows())
        with torch.no_grad():
            z = torch.cat([self.ae.encode(p * 2 - 1).mode() for p in pixels.split(64)])
            z = z * self.ae.scale_factor
        if self.decode(z[:1]).shape[-1] != self.ctx.im_size:
            raise ValueError(f"the autoencoder decodes {self.decode(z[:1]).shape[-1]} px images, "
                             f"the patches are {self.ctx.im_size} px")
        self.images = z.clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=float(self.cfg["lr_latent"]), momentum=0.5)
        self.y_syn = self.labels().to(self.ctx.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in [0, 1] through the frozen decoder."""
        return (self.ae.images(latents) + 1) / 2

    def to_net(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ctx.stats.normalise(self.decode(latents))

    def clamp_(self) -> None:
        """Latents are unbounded; the decoder's output is clamped to the pixel range."""

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        return torch.cat([self.decode(z) for z in self.images.detach().split(64)]).clamp(0, 1)
