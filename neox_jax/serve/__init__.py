"""An OpenAI-compatible HTTP server over a continuous-batching engine: `python -m neox_jax.serve`."""
