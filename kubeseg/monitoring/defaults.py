"""The defaults of drift monitoring that the command line shows.

Only constants, and no imports: ``kubeseg serve --help`` reads them without loading numpy.
:mod:`kubeseg.monitoring.drift` (where they are explained) and the alert rules use these same
objects.
"""

CONFIDENCE_BINS = 20  # of equal width over [0, 1]
LOW_CONFIDENCE_BELOW = 0.5  # a bin edge: pixels whose largest class probability is below it

# Chosen on CamVid with bench/drift_camvid.py (docs/monitoring.md has the tables). Windows of
# consecutive frames vary with the scene: over the training split's drives the class shift
# reached 0.312 in windows of 32 images, 0.281 in 64, 0.223 in 128 (0.227 in 32 on the
# validation drive), so the window is 128 images and the threshold 0.25: no window of
# unshifted images above it, night, fog, a colour cast and another dataset always above, dusk
# in 63% and rain in 44% of the windows. The low-confidence excess reached 0.078 on unshifted
# windows (of 32) and rises with a colour cast (0.45-0.57) and dusk.
DEFAULT_WINDOW_IMAGES = 128
DEFAULT_CLASS_SHIFT_THRESHOLD = 0.25
DEFAULT_LOW_CONFIDENCE_EXCESS_THRESHOLD = 0.15
