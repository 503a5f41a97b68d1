"""Fair comparisons of losses: settings chosen on the select split (``selection``), and the CE control of a
meta-reweighted run (``control``)."""
