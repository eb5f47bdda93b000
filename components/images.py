"""The images the components run in, as configured in :mod:`kubeseg.images`.

Read when the components are imported: ``KUBESEG_IMAGE_REGISTRY`` / ``KUBESEG_IMAGE_TAG`` (or
``kubeseg compile --registry R --tag T``, which sets them) decide the names in the compiled
pipeline; by default they are ``ghcr.io/kubeseg/<role>:<kubeseg version>``.
"""
from kubeseg.images import configured

IMAGES = configured()
TRAINER_IMAGE = IMAGES.trainer
