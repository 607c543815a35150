"""The report stage: what a run tells the world (the console's progress and tables, metrics.csv),
`summary`'s table, and `layers`' listing."""
