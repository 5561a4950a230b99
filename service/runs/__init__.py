"""Runs that outlive connections: the run manager and its backends."""
