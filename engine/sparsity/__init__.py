"""Selective activation: measure how much each layer matters, then run fewer of them.

  importance  the calibration record (per-layer block influence) and its JSON form; no torch
  calibrate   measuring block influence of each layer and sub-block over a text
  budget      pure planning: which layers or sub-blocks a compute budget skips, FLOPs, hops
  runner      running a FragmentModel with a skip plan (whole layers, sub-blocks, FFN neurons)
  evaluate    the measured budget curve behind ``kluster bench sparsity``

This package's ``__init__`` imports nothing, so the manifest code can use ``importance`` without
pulling in torch.
"""
