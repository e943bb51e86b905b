"""The Pi0.5 model, its input and output transforms, checkpoint loading and the inference engine.

The only package that imports JAX.
"""
