"""Head surgery: head plans, the layout mechanism, the method and grouping registries, recipes, the
calibrated merge (aligned/) and its pass over the layers, and pool / expand."""
