"""Training: the latent-diffusion trainer and its earlier stages, data sources and filters, demo data."""
