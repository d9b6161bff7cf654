"""Configuration: one TOML file in, frozen dataclasses out.

The file is parsed once with ``tomllib`` and every key is checked here, so
the rest of ringd never sees a raw dict. ``ringd check`` and reload both go
through ``load``. The package depends on the standard library only:

  model.py    the dataclasses; every key is one field carrying its default,
              its converter and a one-line doc
  values.py   the converters (durations, sizes, addresses, networks, ...)
  scanner.py  key paths -> line numbers, over the raw text
  checker.py  walks the document with the model; rules that span keys
  load.py     reading, decoding, parsing, the order of the errors
  issues.py   ConfigIssue / ConfigError and how key paths are written
"""
from .issues import ConfigError, ConfigIssue
from .load import MAX_CONFIG_BYTES, load, loads, read_file
from .model import (ADMIN_KEYS, HEALTH_KEYS, LISTENER_KEYS, RING_KEYS, RINGD_KEYS, ROUTE_KEYS,
                    SERVER_KEYS, TOP_KEYS, UPSTREAM_KEYS, AdminSettings, Config, HealthCheck,
                    Listener, RingdSettings, RingSettings, Route, Server, Upstream)
from .values import (BALANCE_METHODS, LOG_FORMATS, LOG_LEVELS, MAX_WEIGHT, MAX_WORKERS, Address,
                     parse_duration)

__all__ = [
    "ADMIN_KEYS", "Address", "AdminSettings", "BALANCE_METHODS", "Config", "ConfigError",
    "ConfigIssue", "HEALTH_KEYS", "HealthCheck", "LISTENER_KEYS", "LOG_FORMATS", "LOG_LEVELS",
    "Listener", "MAX_CONFIG_BYTES", "MAX_WEIGHT", "MAX_WORKERS", "RINGD_KEYS", "RING_KEYS",
    "ROUTE_KEYS", "RingSettings", "RingdSettings", "SERVER_KEYS", "Server", "TOP_KEYS", "UPSTREAM_KEYS",
    "Route", "Upstream", "load", "loads", "parse_duration", "read_file",
]
