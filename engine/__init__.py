"""Kluster engine: the shared core behind the CLI, the supplier tray app and the developer TUI.

Subpackages (dependencies point one way, top to bottom):
  errors      the one exception hierarchy; every user-facing failure is one of these
  protocol    pure data: wire messages and tensor framing, no I/O
  models      torch Llama-family model code, HF-folder loading, the embedded default model
  fragments   fragment packing/verification and the per-session executor
  transport   aiortc peer links: chunking, back-pressure, signaling glue
  coordinator aiohttp control plane: registry (SQLite), signaling relay, routes
  node        the supplier's worker process hosting fragments
  client      the developer side: routes, chained generation, local reference path
  cli         the `kluster` command
"""

__version__ = "0.1.0"
