"""Load tests for the gateway (locust) and the sweep that finds each model's max sustainable rate."""
