"""Checks of a cluster before the first pipeline run, as pure functions over the objects the
Kubernetes API returns (:mod:`.platform`, :mod:`.nodes`, :mod:`.credentials`, :mod:`.rbac`)."""
