"""Watching a deployed model: drift statistics of its own outputs against the baseline its
artifact records (:mod:`~kubeseg.monitoring.drift`), the alert rules built from them
(:mod:`~kubeseg.monitoring.alerts`), and the Alertmanager webhook that turns a drift alert
into a retraining run (:mod:`~kubeseg.monitoring.receiver`)."""
