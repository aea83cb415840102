"""What a run reports to people: metrics.jsonl read back (schema-checked) and the recovery curve drawn
from it (recovery.png; matplotlib, the `plot` extra)."""
