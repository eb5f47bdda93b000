"""What an evaluation shows: :mod:`~kubeseg.report.pictures` draws (masks, overlays, the
confusion matrix), :mod:`~kubeseg.report.pages` renders the Markdown and HTML report."""
