"""The worker process: pin, title, drop privileges, run the C loop."""
