"""ringd: a layer-4 TCP reverse proxy with an io_uring + splice data plane."""

__version__ = "0.1.0"

try:
    # written by the Debian build (debian/rules): the package version, so that
    # `ringd status` tells two builds of one release apart (ringd upgrade)
    from ._package import PACKAGE_VERSION
except ImportError:
    PACKAGE_VERSION = None
