"""What a person and a machine read: report.json / .md / .html, notes, plots."""
