"""nm-policy-routing: per-connection policy routing for NetworkManager.

The public API the dispatcher hook, the daemon and the CLI call lives in
:mod:`nm_policy_routing.reconcile` (``Engine.reconcile``/``Engine.remove``).
This module stays import-light on purpose: the dispatcher hook imports it on
every NetworkManager event.
"""

__version__ = "0.3.1"
