"""Command-line entry points (run as scripts from the repository root)."""
