"""sae_jax: distributed JAX training of sparse autoencoders on neural-network activations."""

__version__ = "0.1.0"
