"""The experiment behind ``batchnorm demo``: datasets, the paper's networks, training, measurements, report.

Importing this package is cheap; the modules import torch and matplotlib
themselves (``demo`` only when the command runs).
"""
