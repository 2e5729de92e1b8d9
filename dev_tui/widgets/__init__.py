"""Reusable widgets: the route chain, and a helper that refreshes tables without losing the cursor."""
