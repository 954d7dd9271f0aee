"""Launchers: a run's processes on this machine, on Cloud TPU slices, on GPU hosts."""
