"""Schedulers: complexity-adaptive windows, segmentation, memory-budget placement, step batching.

Schedulers take numbers (log-probs, byte counts, queue contents) as data and never import the model.
"""
