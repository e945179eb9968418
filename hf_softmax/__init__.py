"""HF-Softmax: massive classification with dynamically selected active classes.

Submodules: ``heads`` (margin heads), ``samplers`` (active-class selection), ``classifier``
(the sampled classifier with sparse row updates), ``backbones``, ``metrics``, ``module``.
Nothing heavy is imported here.
"""
