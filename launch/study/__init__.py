"""`metaloss study`: a grid of runs (config keys x train fractions x world sizes x seeds), run and summarised."""
