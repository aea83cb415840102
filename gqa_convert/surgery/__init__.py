"""Head surgery: head plans, the layout mechanism, the method and grouping registries, calibrated
merging, and pool / expand."""
