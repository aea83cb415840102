"""Calibrated merging: activations of the source model one layer at a time, the closed-form aligned
merge, similarity grouping, refinement, and the per-layer pass that ties them together."""
