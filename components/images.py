"""Container images the components run in (built from images/trainer and images/predictor).

The tag follows the kubeseg version, so a compiled pipeline always names the image holding the
same code that compiled it. Override the registry by editing these constants and recompiling
(``kubeseg compile``).
"""
from kubeseg import __version__

REGISTRY = "ghcr.io/kubeseg"
TRAINER_IMAGE = f"{REGISTRY}/trainer:{__version__}"
PREDICTOR_IMAGE = f"{REGISTRY}/predictor:{__version__}"
