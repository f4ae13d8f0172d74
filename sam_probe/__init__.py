"""sam-probe: see how SGD, SAM and friends shaped a solution, from its checkpoints."""
__version__ = "0.1.0"
