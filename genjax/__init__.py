"""genjax: a JAX/Flax generative model zoo — diffusion, VAE, GAN and transformer LM families trained by one
shared loop (`genjax.train`), plus a jitted sampler library (`genjax.samplers`) that imports with jax alone."""
__version__ = "0.1.0"
