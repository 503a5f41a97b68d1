"""Offline reporting over finished run dirs (Table I/II, figures); the training loop only borrows the confusion image."""
