"""Generator stages: a KL latent autoencoder, U-ViT latent diffusion (class-conditional with
classifier-free guidance for InfoDist, unconditional for HistoDiffusion), HistoDiffusion's decoder
fine-tuning and latent-classifier guidance, synthetic sampling into a patch store, and quality
metrics. Rule file ``workflow/rules/generate.smk``."""
