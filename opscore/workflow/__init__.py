"""Workflow definitions and the engine that runs them as sessions."""
