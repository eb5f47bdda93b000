"""The defaults of drift monitoring that the command line shows.

Only constants, and no imports: ``kubeseg serve --help`` reads them without loading numpy.
:mod:`kubeseg.monitoring.drift` (where they are explained) and the alert rules use these same
objects.
"""

CONFIDENCE_BINS = 20  # of equal width over [0, 1]
LOW_CONFIDENCE_BELOW = 0.5  # a bin edge: pixels whose largest class probability is below it

# Chosen on CamVid with bench/drift_camvid.py (docs/monitoring.md has the table).
DEFAULT_WINDOW_IMAGES = 32
DEFAULT_CLASS_SHIFT_THRESHOLD = 0.25
DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD = 0.15
