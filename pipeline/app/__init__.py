"""What users drive: the CLI's body, compare, demo, report, viewer."""
