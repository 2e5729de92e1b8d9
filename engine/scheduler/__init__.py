"""Pure scheduling decisions (no I/O), unit-testable and reusable by a simulator.

placement   which fragment a joining node hosts; which nodes a request's route uses
"""
