"""Spot-check verification: finding nodes that return wrong work (see engine.coordinator.verifier).

sketch     secret per-node random projections of hidden states, and their relative errors
trail      a node's record of every position it received and sent, per session
reference  the route's computation redone in one pass at the coordinator
judge      who is to blame, from where each view first deviates (pure)
compare    a route's records against the reference, into the judge
calibrate  emulated honest and perturbed routes (``kluster bench verify``, tests)
"""
