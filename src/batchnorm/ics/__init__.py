"""Measuring internal covariate shift (ICS), and what batch norm changes instead, on any model.

* :mod:`.recording`: the *distribution* view. :class:`InputRecorder` follows chosen layers'
  input distributions over training (Ioffe & Szegedy 2015, Figure 1).
* :mod:`.gradient`: the *gradient* view. :func:`gradient_ics` measures the change of a
  layer's gradient when the layers before it take their step (Santurkar et al. 2018, Def. 2.1).
* :mod:`.landscape`: the smoothness of the loss along the gradient, :func:`loss_landscape`
  (Santurkar et al. 2018, Figure 4).
* :mod:`.estimation`: how well a model's running statistics estimate the population they
  stand for, :func:`statistics_error`, and the gap between normalizing with batch and with
  population statistics, :func:`mode_gap` (Wu & Johnson 2021).
"""

from .estimation import LayerStatisticsError, ModeGap, mode_gap, statistics_error
from .gradient import LayerICS, gradient_ics, plot_ics
from .landscape import LandscapeProbe, loss_landscape
from .recording import InputRecorder, LayerHistory, plot_percentiles

__all__ = [
    "InputRecorder", "LandscapeProbe", "LayerHistory", "LayerICS", "LayerStatisticsError", "ModeGap", "gradient_ics",
    "loss_landscape", "mode_gap", "plot_ics", "plot_percentiles", "statistics_error",
]  # fmt: skip
