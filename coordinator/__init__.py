"""Coordinator: hands out training plans, checks privacy budgets and merges updates."""
