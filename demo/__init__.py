"""The end-to-end CPU demo: toy data -> tiny VAE -> latent cache -> USP pretraining -> probe and
DiT/SiT generation (USP init vs scratch) -> toy metrics -> report.md. Entry point: scripts/demo.sh."""
