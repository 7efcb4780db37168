"""Workloads, each a Flower app: settings, task (the science), client_app, server_app, run and CLI."""
