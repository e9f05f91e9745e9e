"""Small GPT-2-architecture checkpoints trained by bayescirc (installed as ``bayescirc._models``)."""
