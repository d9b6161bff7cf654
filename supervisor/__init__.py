"""ringd: a layer-4 TCP reverse proxy with an io_uring + splice data plane."""

__version__ = "0.1.0"
