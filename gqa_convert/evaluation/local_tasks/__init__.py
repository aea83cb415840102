"""lm-eval task YAML files and their data (see README.md): pass this folder to lm-eval as --include_path."""
